"""Shared fixtures: tiny data sets, toy ONNX predictors and tiny trained checkpoints made on the spot.

Tests never touch the network. Tests that need torch carry the ``needs_torch`` marker: every test under
``TORCH_DIRS``, and the runtime tests that compare with torch (``pytestmark`` in their module). Without torch
those files are not even collected, and ``pytest -m "not needs_torch"`` runs the rest on the base install;
runtime tests use the torch-free toy predictors of ``tests/toy_onnx.py``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import pytest

# The tests' models are tiny: one thread is fastest, and it keeps OpenMP's spinning threads from
# stalling when another process holds a core. Set before torch is imported (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

TORCH_DIRS = ("training", "export", "benchmarks")  # every test in these folders needs torch
TORCH_FILES = ("runtime/test_eager_agreement.py",)  # runtime tests that compare with torch
HAS_TORCH = importlib.util.find_spec("torch") is not None
collect_ignore = [] if HAS_TORCH else [*TORCH_DIRS, *TORCH_FILES]


def pytest_collection_modifyitems(config, items) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(item.path).relative_to(here).parts[0] in TORCH_DIRS:
            item.add_marker(pytest.mark.needs_torch)


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


@pytest.fixture(scope="session")
def uncond_onnx(tmp_path_factory) -> Path:
    """A toy (torch-free) unconditional predictor: 1 channel, 16×16, T = 100."""
    from tests.toy_onnx import make_toy_predictor

    return make_toy_predictor(tmp_path_factory.mktemp("toy") / "uncond.onnx", channels=1, image_size=16)


@pytest.fixture(scope="session")
def cond_onnx(tmp_path_factory) -> Path:
    """A toy (torch-free) class-conditional predictor: 3 channels, 16×16, 3 classes, T = 100."""
    from tests.toy_onnx import make_toy_predictor

    return make_toy_predictor(tmp_path_factory.mktemp("toy") / "cond.onnx", channels=3, image_size=16, num_classes=3)


@pytest.fixture(scope="session")
def latent_onnx(tmp_path_factory) -> Path:
    """A toy (torch-free) class-conditional latent model: a predictor on 2×4×4 latents (ε, then as many variance
    channels), 3 classes, T = 100, and its decoder to 3×8×8 images beside it (``latent.decoder.onnx``)."""
    from tests.toy_onnx import make_toy_latent

    return make_toy_latent(tmp_path_factory.mktemp("toy") / "latent.onnx", num_classes=3)


@pytest.fixture(scope="session")
def slow_onnx(tmp_path_factory) -> Path:
    """A toy unconditional predictor with T = 1000 at 32×32, so a DDPM run lasts long enough to interrupt."""
    from tests.toy_onnx import make_toy_predictor

    return make_toy_predictor(tmp_path_factory.mktemp("toy") / "slow.onnx", channels=1, image_size=32, timesteps=1000)


def _export(ckpt: Path, fmt: str) -> Path:
    from ddpm_export.export import ExportOptions, export_checkpoint

    (artifact,) = export_checkpoint(ExportOptions(ckpt, (fmt,), verify=False, log=lambda m: None))
    return artifact.path


@pytest.fixture(scope="session")
def cond_export_onnx(cond_rgb_ckpt) -> Path:
    """The tiny conditional U-Net exported to ONNX (needs torch)."""
    return _export(cond_rgb_ckpt, "onnx")


@pytest.fixture(scope="session")
def cond_torchscript(cond_rgb_ckpt) -> Path:
    return _export(cond_rgb_ckpt, "torchscript")
