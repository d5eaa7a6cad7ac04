"""A model source: the network, its sampling contract and where it came from: all that export and verification need.

Three sources make one: a ``ddpm-train`` checkpoint (``ddpm_export.checkpoint.checkpoint_source``), a diffusers
folder (``ddpm_export.diffusers_source.diffusers_source``) and any ``nn.Module`` with a contract given through the
API (``ddpm_export.export.export_module``). ``open_source`` picks the first two by what a path is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm_export.errors import CheckpointError, SourceError
from runtime.metadata import SamplingContract


@dataclass
class ModelSource:
    """``network(x, t[, y])`` (x float32 (B, C, H, W), t int64 (B,), y int64 (B,)) returns what
    ``contract.prediction`` names (ε, v or x̂₀) for every row at its own timestep.

    ``stem``: where artifacts go by default (``<stem>.onnx`` …); ``description``: one line for the log;
    ``details``: what the reports record about the source (its path, kind, weights …). ``decoder``: a latent model's
    decoder stage, ``decoder(z)`` → the image (z the latent as ``contract.decoder`` scales it), or None.
    """

    network: Any  # torch.nn.Module
    contract: SamplingContract
    stem: Path | None
    description: str
    details: dict[str, Any] = field(default_factory=dict)
    decoder: Any = None  # torch.nn.Module


def open_source(path: str | Path, *, weights: str | None = None, scheduler_config: str | Path | None = None,
                null_class: int | None = None) -> ModelSource:
    """The source at ``path``: a folder (or its ``model_index.json``/``config.json``) is a diffusers model, a file a
    ``ddpm-train`` checkpoint. Raises ``SourceError``/``CheckpointError`` with one line."""
    path = Path(path)
    in_folder = path.suffix in (".safetensors", ".bin") and (path.parent / "config.json").is_file()
    if path.is_file() and (path.name in ("model_index.json", "config.json") or in_folder):
        path = path.parent  # a file of a diffusers folder: the folder
    if path.is_dir():
        if weights is not None:
            raise SourceError("--weights applies to ddpm-train checkpoints (EMA or raw); a diffusers folder has one "
                              "set")
        try:
            from ddpm_export.diffusers_source import diffusers_source
        except ImportError as e:
            raise SourceError(f"{path} is a folder: reading diffusers models needs the interop extra "
                              f"(pip install 'ddpm-toolkit[interop]'; {e})") from None

        return diffusers_source(path, scheduler_config=scheduler_config, null_class=null_class)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a ddpm-train checkpoint or a diffusers model folder)")
    if scheduler_config is not None or null_class is not None:
        raise SourceError("--scheduler-config and --null-class apply to diffusers folders; a ddpm-train checkpoint "
                          "states its schedule and reserves its null class itself")
    from ddpm_export.checkpoint import checkpoint_source

    return checkpoint_source(path, weights)
