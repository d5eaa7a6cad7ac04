"""Shared fixtures: tiny data sets written on the spot (tests never touch the network)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

# The tests' models are tiny: one thread is fastest, and it keeps OpenMP's spinning threads from
# stalling when another process holds a core. Set before torch is imported (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _write_idx_gz(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    """A flat folder of IDX .gz files laid out like Debian's dataset-fashion-mnist: 64 train, 16 test images.

    Image i is a bright square whose position depends on its label (label = i % 10), on a dark background.
    """
    root = tmp_path / "fashion"
    root.mkdir()
    for prefix, n in (("train", 64), ("t10k", 16)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, y in enumerate(labels):
            r, c = 2 + 2 * (y // 5) * 5, 2 + 5 * (y % 5)
            images[i, r:r + 8, c:c + 5] = 200 + i % 50
        _write_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz", 0x803, images)
        _write_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz", 0x801, labels)
    return root
