"""The finish: model-space images (float, [-1, 1]) to 8-bit pixels, defined once for every tool, and the engine's
finish for a model (a latent model's decoder first)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) float in [−1, 1] -> (B, H, W, C) uint8 with p = round((x + 1)·127.5), clipped to 0…255."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected images shaped (B, C, H, W), got {x.shape}")
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def finisher(contract, decode: Callable[[Any], Any] | None = None,
             download: Callable[[Any], np.ndarray] = np.asarray) -> Callable[[Any], np.ndarray]:
    """The batch engine's finish for a model with ``contract``: finished x (the engine's arrays) → uint8 (B, H, W, C)
    on the host (``download``). A latent model's x goes through its decoder first, once:
    ``decode(x / scaling_factor + shift)``, ``decode`` the backend's decoder on the engine's arrays."""
    if contract.decoder is None:
        return lambda x: to_uint8(download(x))
    return lambda x: to_uint8(download(decode(decoder_input(contract, x))))


def decoder_input(contract, x):
    """What a latent model's decoder takes for finished latents ``x`` (numpy or torch): ``x / scaling_factor +
    shift``, in x's dtype."""
    stage = contract.decoder
    z = x / stage.scaling_factor
    return z + stage.shift if stage.shift else z
