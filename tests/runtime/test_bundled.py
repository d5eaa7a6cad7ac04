"""The bundled default model: its contract, generation with no model argument, and the shipped slim checkpoint."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

import runtime
from ddpm_export.checkpoint import load_checkpoint
from runtime.cli import main
from runtime.models import assets_dir, resolve


def test_bundled_model_contract():
    path, name = resolve(None)
    assert name == "fashion-mnist"
    c = runtime.load(path, "cpu").contract
    assert (c.image_size, c.channels, c.num_classes) == (32, 1, 10)
    assert c.class_names[7] == "Sneaker" and c.null_class == 10 and c.ema
    assert (c.schedule.name, c.schedule.timesteps, c.variance) == ("linear", 1000, "beta")
    assert c.provenance.dataset == "fashion-mnist" and c.provenance.training_steps >= 4000


def test_generate_with_no_model_argument_and_a_class_name(tmp_path):
    r = CliRunner().invoke(main, ["-n", "3", "--sampler", "ddim", "--steps", "4", "--class", "sneaker",
                                  "--guidance", "2", "--out", str(tmp_path / "s"), "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    assert "using the bundled model fashion-mnist" in r.output
    records = [json.loads(line) for line in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert [(x["class"], x["class_name"]) for x in records] == [(7, "Sneaker")] * 3


def test_shipped_slim_checkpoint_is_the_bundled_model():
    ckpt = assets_dir() / "fashion-mnist.ckpt"
    assert ckpt.stat().st_size <= 15 * 2**20
    net, used_ema = load_checkpoint(ckpt).build_unet()
    assert used_ema
    model = runtime.load(resolve("fashion-mnist")[0], "cpu").backend
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    t, y = np.array([0, 500, 999]), np.array([7, 0, 10])
    with torch.no_grad():
        ref = net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(model(x, t, y), ref, atol=1e-4, rtol=1e-3)


def test_bundled_model_draws_the_requested_classes():
    """Two images per class at DDIM-10, guidance 2: the shipped classifier must recognise the requested class."""
    from runtime.evaluate import FeatureExtractor

    images = runtime.load(resolve(None)[0], "cpu").generate(20, sampler="ddim", steps=10, guidance=2.0, batch_size=20)
    requested = np.arange(20) % 10  # classes cycle over the images by default
    predicted = FeatureExtractor()(images)[0].argmax(1)
    assert (predicted == requested).mean() >= 0.8, list(zip(requested, predicted))
