"""The GPU suite (``benchmarks/gpu_suite.sh``), prepared on the CPU: its dry run says what it would run and checks
that every command line parses; without a GPU the real run refuses in one line; what it brings back fits the device
tool's limits (at most 8 files of 16 MB). And the piece of its GPU path that runs on a CPU: the ``.pt2`` device loop at
batch 2048 over a package compiled for batches of at most 63."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime

pytestmark = pytest.mark.needs_torch  # as all of tests/benchmarks (its dry run imports torch's modules)
REPO = Path(runtime.__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
STEPS = ("export-fp32", "export-bf16", "loop", "e2e-ddpm1000", "e2e-ddim50", "e2e-recommended", "serve", "ort")


def suite(tmp_path: Path, *args: str, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": python, "TMPDIR": str(tmp_path), **env}
    return subprocess.run(["bash", str(SUITE), *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=240)


def test_the_dry_run_says_what_it_would_run_and_every_command_parses(tmp_path):
    r = suite(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    for step in STEPS:
        assert any(line.startswith(f"{step}: would run (<= ") for line in lines), (step, lines)
    assert "FAILS" not in r.stderr and lines[-1].endswith("every step ok")
    back = list((tmp_path / "out").iterdir())
    assert sorted(p.name for p in back) == ["e2e.tar.gz", "results.tar.gz", "summary.txt"]
    assert len(back) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in back)
    assert not [p for p in tmp_path.iterdir() if p.name != "out"], "its work folder is removed"


def test_a_command_that_does_not_parse_fails_the_dry_run(tmp_path):
    """A Python whose every command fails: each step says FAILS TO PARSE and the dry run exits 1."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Error: No such option: --device' >&2\nexit 2\n")
    fake.chmod(0o755)
    r = suite(tmp_path, "--dry-run", "--only", "export,e2e", python=str(fake))
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert r.returncode == 1
    failing = [line for line in lines if "FAILS TO PARSE" in line]
    assert len(failing) == 5 and all("No such option: --device" in line for line in failing), lines
    assert not any(line.startswith(("loop:", "serve:")) for line in lines)  # --only


def test_without_a_gpu_the_real_run_refuses_in_one_line(tmp_path):
    r = suite(tmp_path)
    assert r.returncode == 2 and "torch sees no CUDA device here; use --dry-run" in r.stderr, r.stderr


def test_an_unknown_argument_is_one_line(tmp_path):
    r = suite(tmp_path, "--fast")
    assert r.returncode == 2 and r.stderr.strip() == ("gpu_suite.sh: unknown argument --fast (expected --dry-run, "
                                                       "--only STEP,...)")


def test_the_pt2_device_loop_runs_batch_2048_over_a_package_of_at_most_63(cond_onnx):
    """The device loop's batch goes through the package in the fewest chunks (2048 = 32 × 63 + 32) and gives the host
    loop's images: the network here is the toy ONNX model run by onnxruntime behind a fake runner."""
    import torch

    from runtime.backends.pt2_model import Pt2Model

    onnx_model = runtime.load(cond_onnx, "cpu")
    sizes = []

    def runner(x, t, y):
        assert x.shape[0] <= 63
        sizes.append(x.shape[0])
        return torch.from_numpy(onnx_model.backend.predict_eps(x.numpy(), t.numpy(), y.numpy()))

    model = object.__new__(Pt2Model)
    model.runner, model.max_batch, model.torch = runner, 63, torch
    model.contract, model.device, model.path, model.precision = onnx_model.contract, "cpu", cond_onnx, "fp32"
    model.provider = "pt2:cpu:fp32"
    pipeline = runtime.Pipeline(model)
    settings = dict(sampler="ddim", steps=3, guidance=1.0, batch_size=2048)
    device = pipeline.generate(2048, fused=True, **settings)
    assert sizes == ([63] * 32 + [32]) * 3  # three steps
    assert np.array_equal(device, onnx_model.generate(2048, **settings))
