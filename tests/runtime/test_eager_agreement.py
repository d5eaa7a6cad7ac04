"""The runtime against the eager U-Net and the TorchScript backend, on identical noise (needs torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from ddpm_export.checkpoint import load_checkpoint
from runtime.backends.torch_loop import torch_ops
from runtime.sampling.engine import sample
from runtime.sampling.finish import to_uint8
from runtime.sampling.noise import NoiseStreams
from runtime.tolerances import TOLERANCES
from training.predictor import eps_predictor

pytestmark = pytest.mark.needs_torch
MAX_LEVELS = TOLERANCES["fp32"].max_levels


def eager_images(ckpt, g, n, plan, seed=0, classes=None):
    """The same run through the eager U-Net in torch, with the runtime's noise streams injected."""
    net, _ = load_checkpoint(ckpt).build_unet()
    c = g.contract
    indices = list(range(n))
    streams = NoiseStreams(seed, indices, (c.channels, c.image_size, c.image_size))
    labels = g.labels(indices, classes)
    y = None if labels is None else torch.from_numpy(labels)
    x_T = torch.from_numpy(streams.next())
    with torch.no_grad():
        x0 = sample(eps_predictor(net), x_T, plan.coefs, lambda i: torch.from_numpy(streams.next()),
                    labels=None if y is None else y.tolist(), null_class=c.null_class, ops=torch_ops("cpu"))
    return to_uint8(x0.numpy())


@pytest.mark.parametrize("sampler, steps, guidance", [("ddpm", None, 2.0), ("ddim", 10, 1.0), ("ddpm", 10, 3.0),
                                                      ("dpmpp-2m", 8, 2.0), ("dpmpp-2m-sde", 8, 1.5)])
def test_runtime_agrees_with_the_eager_model_on_identical_noise(cond_rgb_ckpt, cond_export_onnx, sampler, steps,
                                                                guidance):
    g = runtime.load(cond_export_onnx, "cpu")
    plan = g.plan(sampler=sampler, steps=steps, guidance=guidance)
    ours = g.generate(6, sampler=sampler, steps=steps, guidance=guidance, batch_size=4)
    ref = eager_images(cond_rgb_ckpt, g, 6, plan)
    assert ours.shape == (6, 16, 16, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref).max() <= MAX_LEVELS


def test_torchscript_backend_matches_onnx(cond_export_onnx, cond_torchscript):
    a = runtime.load(cond_export_onnx, "cpu").generate(4, sampler="ddim", steps=6, guidance=2.0)
    b = runtime.load(cond_torchscript, "cpu").generate(4, sampler="ddim", steps=6, guidance=2.0)
    assert np.abs(a.astype(int) - b).max() <= MAX_LEVELS
