"""The weights-only checkpoint: small, loadable safely, and it exports to the same model as the full one."""

from __future__ import annotations

import numpy as np
import torch

import runtime
from ddpm_export.checkpoint import load_checkpoint
from ddpm_export.slim import slim_checkpoint
from runtime.bundled import assets_dir
from runtime.tolerances import TOLERANCES


def test_slim_checkpoint_keeps_the_ema_model(uncond_ckpt, tmp_path):
    out = tmp_path / "slim.ckpt"
    size = slim_checkpoint(uncond_ckpt, out)
    assert size < uncond_ckpt.stat().st_size / 2
    full, slim = load_checkpoint(uncond_ckpt), load_checkpoint(out)
    assert slim.has_ema and slim.global_step == full.global_step and slim.hparams == full.hparams
    assert not any(k.startswith("unet.") for k in slim.state_dict)
    a, _ = full.build_unet("ema")
    b, used_ema = slim.build_unet()
    assert used_ema
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 90])
    with torch.no_grad():
        np.testing.assert_array_equal(a(x, t).numpy(), b(x, t).numpy())


def test_shipped_slim_checkpoint_is_the_bundled_model():
    ckpt = assets_dir() / "fashion-mnist.ckpt"
    assert ckpt.stat().st_size <= 15 * 2**20
    net, used_ema = load_checkpoint(ckpt).build_unet()
    assert used_ema
    model = runtime.load("fashion-mnist", "cpu").backend
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    t, y = np.array([0, 500, 999]), np.array([7, 0, 10])
    with torch.no_grad():
        ref = net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    tol = TOLERANCES["fp32"]
    np.testing.assert_allclose(model.predict_eps(x, t, y), ref, atol=tol.atol, rtol=tol.rtol)


def test_the_bundled_checkpoint_exports_to_a_model_that_samples_like_the_bundled_onnx(tmp_path):
    """The checkpoint carries the run settings its model recommends, so its export recommends them too: by default
    (no settings given) both models make the same images."""
    from ddpm_export.export import ExportOptions, export_checkpoint

    (artifact,) = export_checkpoint(ExportOptions(assets_dir() / "fashion-mnist.ckpt", ("onnx",),
                                                  out=tmp_path / "m.onnx", verify=False, log=lambda m: None))
    exported, bundled = runtime.load(artifact.path, "cpu"), runtime.load("fashion-mnist", "cpu")
    assert exported.contract.run_defaults == bundled.contract.run_defaults
    assert exported.plan().run_settings() == bundled.plan().run_settings()  # dpmpp-2m 15, w = 2 on [0, 400]
    got, want = exported.generate(4, seed=3), bundled.generate(4, seed=3)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16)).max()
    assert diff <= TOLERANCES["fp32-same-math"].max_levels, diff
