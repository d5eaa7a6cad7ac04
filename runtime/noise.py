"""Noise that depends only on (seed, image index): one independent N(0, I) stream per image.

Image k's x_T and every later noise draw come from its own Philox generator keyed by ``SeedSequence([seed, k])``,
so image k is the same whether it is made alone, in a batch of 256, or in another shard or process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def image_generator(seed: int, index: int) -> np.random.Generator:
    """The random stream of image ``index`` under ``seed`` (both non-negative integers)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and image index must be non-negative, got {seed}, {index}")
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, index])))


class NoiseStreams:
    """Draws (B, C, H, W) float32 standard normals, row b from image ``indices[b]``'s own stream."""

    def __init__(self, seed: int, indices: Sequence[int], shape: tuple[int, int, int]) -> None:
        self.shape = tuple(shape)
        self._generators = [image_generator(seed, int(k)) for k in indices]

    def next(self) -> np.ndarray:
        """The next draw of every image's stream: (B, *shape) float32."""
        out = np.empty((len(self._generators), *self.shape), dtype=np.float32)
        for row, g in zip(out, self._generators):
            g.standard_normal(self.shape, dtype=np.float32, out=row)
        return out
