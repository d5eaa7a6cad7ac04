"""Conversion of model-space images (float, [-1, 1]) to 8-bit pixels; defined once for every tool."""

from __future__ import annotations

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) float in [−1, 1] -> (B, H, W, C) uint8 with p = round((x + 1)·127.5), clipped to 0…255."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected images shaped (B, C, H, W), got {x.shape}")
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
