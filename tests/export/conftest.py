"""Tiny trained checkpoints for the export tests (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.model import DiffusionModel

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)


def make_checkpoint(path: Path, channels: int, num_classes: int, ema_decay: float = 0.9, steps: int = 4) -> Path:
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
