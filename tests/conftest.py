"""Shared fixtures: tiny data sets and tiny trained checkpoints made on the spot (tests never touch the network)."""

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


TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)


def make_checkpoint(path: Path, channels: int, num_classes: int, ema_decay: float = 0.9, steps: int = 4) -> Path:
    """A 16×16, T = 100 DiffusionModel trained a few steps on random data, saved by Lightning."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from training.model import DiffusionModel

    torch.manual_seed(0)
    model = DiffusionModel(16 * 16, 100, channels, num_classes=num_classes, ema_decay=ema_decay, lr=5e-3, **TINY)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, channels, 16, 16, generator=g) * 2 - 1
    y = torch.randint(0, max(num_classes, 1), (16,), generator=g)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=path.parent)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def uncond_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("uncond") / "uncond.ckpt", channels=1, num_classes=0)


@pytest.fixture(scope="session")
def cond_rgb_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cond") / "cond.ckpt", channels=3, num_classes=3)


@pytest.fixture(scope="session")
def no_ema_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("noema") / "noema.ckpt", channels=1, num_classes=0, ema_decay=0.0,
                           steps=1)


@pytest.fixture
def fresh_copy(tmp_path):
    """Copy a checkpoint into this test's own folder, so artifacts written next to it do not collide."""

    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        dst.write_bytes(src.read_bytes())
        return dst

    return copy


def _export(ckpt: Path, fmt: str) -> Path:
    from ddpm_export.export import ExportOptions, export_checkpoint

    (artifact,) = export_checkpoint(ExportOptions(ckpt, (fmt,), verify=False, log=lambda m: None))
    return artifact.path


@pytest.fixture(scope="session")
def uncond_onnx(uncond_ckpt) -> Path:
    return _export(uncond_ckpt, "onnx")


@pytest.fixture(scope="session")
def cond_onnx(cond_rgb_ckpt) -> Path:
    return _export(cond_rgb_ckpt, "onnx")


@pytest.fixture(scope="session")
def cond_torchscript(cond_rgb_ckpt) -> Path:
    return _export(cond_rgb_ckpt, "torchscript")
