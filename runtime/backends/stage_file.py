"""A stage in a file of its own beside the model file (a latent model's decoder in an ONNX model): found by the name
the contract gives it and bound to the contract by its SHA-256, so a missing or swapped file is one line at load."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ModelError
from runtime.files import sha256_file
from runtime.metadata import Stage


def stage_file(model: Path, stage: Stage) -> Path:
    """The file of ``stage`` beside ``model``, once its SHA-256 is the one the contract records."""
    if stage.file is None:
        raise ModelError(f"{model}: its contract names no file for its {stage.name} stage (an ONNX latent model "
                         "keeps it in a file beside it)")
    path = model.parent / stage.file
    if not path.is_file():
        raise ModelError(f"{model}: its {stage.name} stage {path} is missing (a latent model is its model file and "
                         f"{stage.file} beside it: copy both)")
    if sha256_file(path) != stage.sha256:
        raise ModelError(f"{path} is not the {stage.name} {model.name} was exported with (its SHA-256 differs from "
                         f"the one in the model's contract): put back the {stage.file} exported with it, or export "
                         "the model again")
    return path
