"""SampleGrid: guidance only for conditional models, and a grid that appears whole under its final name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from training.callbacks import SampleGrid
from training.model import DiffusionModel

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)
TRAINER = SimpleNamespace(global_step=5, is_global_zero=True)


@pytest.mark.parametrize("num_classes, n_images", [(0, 4), (2, 6)])
def test_writes_a_png_grid_and_nothing_else(tmp_path, num_classes, n_images):
    model = DiffusionModel(16 * 16, 10, 1, num_classes=num_classes, ema_decay=0.0, **TINY)
    calls = []
    model.sample = lambda n, **kw: calls.append((n, kw)) or torch.zeros(n, 1, 16, 16)
    out = tmp_path / "samples"
    SampleGrid(out, n_samples=4, per_class=3, steps=2, guidance=3.0).write(TRAINER, model, out / "last.png")
    (n, kw), = calls
    assert n == n_images and kw["steps"] == 2 and kw["sampler"] == "dpmpp-2m"  # fast by default
    assert kw["guidance"] == (3.0 if num_classes else 1.0)  # an unconditional model cannot be guided
    assert [p.name for p in out.iterdir()] == ["last.png"]  # no temporary file left behind
    assert Image.open(out / "last.png").format == "PNG"


def test_unconditional_grid_with_guidance_samples(tmp_path):
    model = DiffusionModel(16 * 16, 10, 1, ema_decay=0.0, **TINY)
    SampleGrid(tmp_path, n_samples=4, steps=2, guidance=3.0).write(TRAINER, model, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size == (2 * 17 + 1, 2 * 17 + 1)  # 2×2 images of 16 px, 1 px padding


def test_the_grid_is_fast_by_default_and_the_sampler_can_be_chosen(tmp_path):
    """By default a grid is DPM-Solver++(2M) at its 20 steps, not DDPM at all T; --sample-sampler and --sample-steps
    choose otherwise. Counted in predictor calls of a real model (T = 100, unconditional: one call a step)."""
    from training import model as model_module

    model = DiffusionModel(16 * 16, 100, 1, ema_decay=0.0, **TINY)
    calls = []
    real = model_module.eps_predictor

    def counting(*args, **kwargs):
        predict = real(*args, **kwargs)
        return lambda *a: calls.append(1) or predict(*a)

    model_module.eps_predictor = counting
    try:
        for options, expected in (({}, 20), ({"sampler": "ddim", "steps": 7}, 7), ({"sampler": "ddpm"}, 100)):
            calls.clear()
            SampleGrid(tmp_path, n_samples=1, **options).write(TRAINER, model, tmp_path / "g.png")
            assert len(calls) == expected, (options, len(calls))
    finally:
        model_module.eps_predictor = real
