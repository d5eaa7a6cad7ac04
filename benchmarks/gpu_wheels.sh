#!/usr/bin/env bash
# Wheels of the server's packages for the GPU machine (Python 3.12, no network, no fastapi there), into .whl/ of the
# repository root: run here, then name .whl in the device tool's carry; benchmarks/gpu_suite.sh installs them into
# /tmp/site before its serve step. The versions are this checkout's (.venv), so the server there is the one tested here.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
pins=$($PY - <<'PY'
from importlib.metadata import version
names = ["fastapi", "starlette", "pydantic", "pydantic_core", "uvicorn", "h11", "anyio", "annotated-types",
         "typing-inspection", "typing_extensions", "idna", "prometheus-client"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
mkdir -p .whl
grep -qx '.whl/' .git/info/exclude 2>/dev/null || echo '.whl/' >> .git/info/exclude
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
du -sh .whl >&2
