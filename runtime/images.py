"""Images as files: one image's PNG bytes, a PNG read back, and the grid of many (what ``ddpm-generate`` writes,
``ddpm-serve`` answers and ``ddpm-eval`` reads)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of one (H, W, C) uint8 image (C = 1 is written as grayscale)."""
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: Path, channels: int) -> np.ndarray:
    """A PNG as (H, W, C) uint8 (grayscale with ``channels`` = 1 gets its channel axis back)."""
    arr = np.asarray(Image.open(path))
    return arr[:, :, None] if channels == 1 and arr.ndim == 2 else arr


def make_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 → one (rows·(H+pad)+pad, columns·(W+pad)+pad, C) image, row-major."""
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return grid
