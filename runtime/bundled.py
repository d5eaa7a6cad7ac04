"""Models bundled with the package (``runtime/assets/``), found by name; ``ddpm-generate`` with no MODEL uses the
default."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from runtime.errors import ModelError

BUNDLED = {"fashion-mnist": "fashion-mnist.onnx"}  # name -> file in runtime/assets/
DEFAULT = "fashion-mnist"


def assets_dir() -> Path:
    return Path(str(resources.files("runtime") / "assets"))


def resolve(model: str | None) -> tuple[Path, str | None]:
    """The model file for a path or a bundled name (None: the default); returns (path, bundled name or None).

    An existing file always wins over a bundled name of the same spelling.
    """
    if model is not None and (Path(model).exists() or model.lower() not in BUNDLED):
        return Path(model), None
    name = DEFAULT if model is None else model.lower()
    path = assets_dir() / BUNDLED[name]
    if not path.is_file():
        raise ModelError(f"the bundled model {name!r} is not part of this installation (expected {path}); "
                         "pass the path of an exported model")
    return path, name
