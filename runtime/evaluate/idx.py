"""IDX files (MNIST, FashionMNIST), plain or gzipped, read with NumPy only: used by training and by ddpm-eval."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from runtime.errors import IdxError

IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a (possibly gzipped) IDX file of unsigned bytes into a ``uint8`` array shaped by its header."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise IdxError(f"cannot read IDX file {path}: {e}") from None
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise IdxError(f"bad magic number in IDX file {path}: expected {magic:#010x}, "
                       f"got {'none (file too short)' if found is None else f'{found:#010x}'}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"truncated header in IDX file {path}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) - header != int(np.prod(dims)):
        raise IdxError(f"IDX file {path} has {len(data) - header} data bytes, expected {int(np.prod(dims))} "
                       f"for dims {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_split(places: list[Path], train: bool) -> tuple[Path, Path] | None:
    """The first place holding both the image and the label file of the split."""
    prefix = "train" if train else "t10k"
    for folder in places:
        images = idx_file(folder, f"{prefix}-images-idx3-ubyte")
        labels = idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return images, labels
    return None


def read_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``uint8 [N]``, checked against each other."""
    images, labels = read_idx(images_path, IMAGE_MAGIC), read_idx(labels_path, LABEL_MAGIC)
    if len(images) != len(labels):
        raise IdxError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and labels.max() >= num_classes:
        raise IdxError(f"{labels_path} holds label {labels.max()}, expected 0..{num_classes - 1}")
    return images, labels


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """``uint8 [N, 28, 28]`` → ``uint8 [N, 32, 32]`` with 2 background (0) pixels on every side."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))
