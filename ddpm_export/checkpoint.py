"""Safe checkpoint loading: a checkpoint is data, never code.

``training.safe_load`` reads it with ``torch.load(..., weights_only=True)``, which only rebuilds tensors and
plain containers; a file that carries a pickled callable (a code payload) is refused before anything in it
runs (``ddpm-train --resume`` refuses it with the same words). The saved hyperparameters are read
into a ``training.config.ModelConfig``, which rebuilds the U-Net (given the EMA or the raw weights) and states
the sampling contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ddpm_export.errors import CheckpointError
from ddpm_export.source import ModelSource
from runtime.errors import reason
from runtime.metadata import Provenance, SamplingContract
from training.config import REQUIRED_HPARAMS, ModelConfig
from training.safe_load import explain_load_error, load_data
from training.unet import UNet, UNetConfig

RAW_PREFIX, EMA_PREFIX = "unet.", "ema.module."


@dataclass(frozen=True)
class Checkpoint:
    """What a ``ddpm-train`` checkpoint holds that export needs."""

    path: Path
    hparams: dict
    state_dict: dict[str, torch.Tensor]
    global_step: int | None

    @property
    def has_ema(self) -> bool:
        return any(k.startswith(EMA_PREFIX) for k in self.state_dict)

    @property
    def config(self) -> ModelConfig:
        """The model's configuration, read from the hyperparameters (``load_checkpoint`` checked that it reads)."""
        return ModelConfig.from_hparams(self.hparams)

    def unet_config(self) -> UNetConfig:
        """The saved U-Net's shape (``ModelConfig.unet_config``)."""
        return self.config.unet_config()

    def build_unet(self, weights: Literal["ema", "raw"] | None = None) -> tuple[UNet, bool]:
        """The U-Net in eval mode with the chosen weights (default: EMA when present); returns (net, used_ema)."""
        if weights is None:
            weights = "ema" if self.has_ema else "raw"
        if weights == "ema" and not self.has_ema:
            raise CheckpointError(f"{self.path} has no EMA weights; use --weights raw")
        prefix = EMA_PREFIX if weights == "ema" else RAW_PREFIX
        sd = {k[len(prefix):]: v for k, v in self.state_dict.items() if k.startswith(prefix)}
        try:
            net = UNet(self.unet_config())
            net.load_state_dict(sd, strict=True)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.path}: the {weights} weights do not fit the saved U-Net configuration "
                                  f"({reason(e)})") from None
        return net.eval(), weights == "ema"

    def contract(self, *, ema: bool, exporter: str | None = None) -> SamplingContract:
        """The sampling contract of this checkpoint's model, with where it came from as provenance."""
        import ddpm_export

        cfg = self.config
        return cfg.contract(ema=ema, provenance=Provenance(
            dataset=cfg.dataset, training_steps=self.global_step, package="ddpm-toolkit",
            package_version=ddpm_export.__version__, torch_version=torch.__version__,
            exporter=exporter, exporter_version=torch.__version__ if exporter else None,
        ))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint with ``weights_only=True``; any problem is a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = load_data(path)
    except Exception as e:  # noqa: BLE001 - explain_load_error classifies it
        raise CheckpointError(explain_load_error(path, e)) from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(f"{path} is not a ddpm-train checkpoint (no state_dict)")
    hp = data.get("hyper_parameters")
    missing = [k for k in REQUIRED_HPARAMS if not isinstance(hp, dict) or k not in hp]
    if missing:
        raise CheckpointError(f"{path} lacks this project's hyperparameters (missing {', '.join(missing)}); "
                              "was it written by ddpm-train?")
    if not any(k.startswith(RAW_PREFIX) or k.startswith(EMA_PREFIX) for k in data["state_dict"]):
        raise CheckpointError(f"{path} holds no U-Net weights")
    try:
        ModelConfig.from_hparams(hp)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has unusable hyperparameters: {reason(e)}") from None
    step = data.get("global_step")
    return Checkpoint(path, dict(hp), data["state_dict"], int(step) if step is not None else None)


def checkpoint_source(path: str | Path, weights: Literal["ema", "raw"] | None = None) -> ModelSource:
    """A ``ddpm-train`` checkpoint as a model source: its U-Net with the chosen weights (default: EMA where present)."""
    ckpt = load_checkpoint(path)
    net, used_ema = ckpt.build_unet(weights)
    contract = ckpt.contract(ema=used_ema)
    return ModelSource(
        net, contract, ckpt.path.with_suffix(""),
        f"{ckpt.path}: step {ckpt.global_step}, {'EMA' if used_ema else 'raw'} weights, {contract.channels}x"
        f"{contract.image_size}x{contract.image_size}, {contract.num_classes} classes",
        {"checkpoint": str(ckpt.path), "source": "ddpm-train checkpoint", "weights": "ema" if used_ema else "raw"})
