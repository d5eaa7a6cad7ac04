"""The weights-only checkpoint: small, loadable safely, and it exports to the same model as the full one."""

from __future__ import annotations

import numpy as np
import torch

from ddpm_export.checkpoint import load_checkpoint
from ddpm_export.slim import slim_checkpoint


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
