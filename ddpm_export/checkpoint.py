"""Safe checkpoint loading: a checkpoint is data, never code.

``torch.load(..., weights_only=True)`` only rebuilds tensors and plain containers; a file that carries a
pickled callable (a code payload) is refused before anything in it runs. The U-Net is rebuilt from the
saved hyperparameters and given the EMA or the raw weights.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from runtime.metadata import Provenance, SamplingContract, ScheduleSpec
from runtime.schedule import default_params
from training.unet import UNet, UNetConfig

RAW_PREFIX, EMA_PREFIX = "unet.", "ema.module."
REQUIRED_HPARAMS = ("in_size", "t_range", "img_depth", "schedule", "base_channels", "channel_mult",
                    "num_res_blocks", "attention_resolutions", "num_classes")


class CheckpointError(ValueError):
    """A checkpoint that cannot (or must not) be loaded; the message is one line."""


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

    def unet_config(self) -> UNetConfig:
        hp = self.hparams
        size = int(round(hp["in_size"] ** 0.5))
        return UNetConfig(
            image_size=size, in_channels=hp["img_depth"], base_channels=hp["base_channels"],
            channel_mult=tuple(hp["channel_mult"]), num_res_blocks=hp["num_res_blocks"],
            attention_resolutions=tuple(hp["attention_resolutions"]), num_heads=hp.get("num_heads", 1),
            dropout=hp.get("dropout", 0.0), num_classes=hp["num_classes"],
        )

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
                                  f"({str(e).splitlines()[0]})") from None
        return net.eval(), weights == "ema"

    def contract(self, *, ema: bool, exporter: str | None = None) -> SamplingContract:
        """The sampling contract of this checkpoint's model."""
        hp = self.hparams
        cfg = self.unet_config()
        params = dict(hp.get("schedule_params") or default_params(hp["schedule"]))
        import ddpm_export

        return SamplingContract(
            image_size=cfg.image_size, channels=cfg.in_channels,
            schedule=ScheduleSpec(hp["schedule"], hp["t_range"], params),
            num_classes=hp["num_classes"], class_names=list(hp.get("class_names") or []), ema=ema,
            provenance=Provenance(
                dataset=hp.get("dataset"), training_steps=self.global_step, package="ddpm-toolkit",
                package_version=ddpm_export.__version__, torch_version=torch.__version__,
                exporter=exporter, exporter_version=torch.__version__ if exporter else None,
            ),
        )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint with ``weights_only=True``; any problem is a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - classify below
        raise CheckpointError(_explain_load_error(path, e)) from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(f"{path} is not a ddpm-train checkpoint (no state_dict)")
    hp = data.get("hyper_parameters")
    missing = [k for k in REQUIRED_HPARAMS if not isinstance(hp, dict) or k not in hp]
    if missing:
        raise CheckpointError(f"{path} lacks this project's hyperparameters (missing {', '.join(missing)}); "
                              "was it written by ddpm-train?")
    if not any(k.startswith(RAW_PREFIX) or k.startswith(EMA_PREFIX) for k in data["state_dict"]):
        raise CheckpointError(f"{path} holds no U-Net weights")
    step = data.get("global_step")
    return Checkpoint(path, dict(hp), data["state_dict"], int(step) if step is not None else None)


def _explain_load_error(path: Path, e: Exception) -> str:
    text = str(e)
    if isinstance(e, __import__("pickle").UnpicklingError) and "weights_only" in text.lower():
        found = re.search(r"(?:GLOBAL|global)\s+([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"refusing to load {path}: it contains pickled code or objects{what}, and a checkpoint "
                "must hold only tensors and plain data")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format is a zip archive
    if is_zip or isinstance(e, zipfile.BadZipFile):
        return f"{path} is truncated or corrupt (a damaged torch.save archive)"
    return f"{path} is not a PyTorch checkpoint (expected a torch.save archive)"
