"""The U-Net: shapes, conditioning, configuration errors, independence of batch items."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from runtime.tolerances import TOLERANCES
from training.unet import UNet, UNetConfig

SAME = TOLERANCES["fp32-same-math"]  # a batch vs its rows: the same float32 math

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)


@pytest.mark.parametrize("channels, size", [(1, 32), (3, 32), (3, 64)])
def test_output_shape_matches_input(channels, size):
    net = UNet(UNetConfig(image_size=size, in_channels=channels, **TINY))
    x = torch.randn(3, channels, size, size)
    eps = net(x, torch.tensor([0, 500, 999]))
    assert eps.shape == x.shape and eps.dtype == torch.float32


def test_conditional_needs_labels_and_uses_them():
    torch.manual_seed(0)
    net = UNet(UNetConfig(num_classes=4, **TINY)).eval()
    for p in net.parameters():  # zero-initialised output layers would hide the label's effect
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 10])
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)
    a = net(x, t, torch.tensor([0, 0]))
    b = net(x, t, torch.tensor([1, 4]))  # 4 = the null class
    assert not torch.allclose(a, b)
    assert torch.allclose(a[0], net(x[:1], t[:1], torch.tensor([0]))[0], atol=SAME.atol, rtol=SAME.rtol)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(UNetConfig(**TINY))(x, t, torch.tensor([0, 0]))


def test_batch_items_are_independent_in_eval_mode():
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(5, 1, 32, 32), torch.tensor([1, 2, 3, 4, 999])
    full = net(x, t)
    for i in range(5):
        torch.testing.assert_close(net(x[i:i + 1], t[i:i + 1]), full[i:i + 1], atol=SAME.atol, rtol=SAME.rtol)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=36, channel_mult=(1, 2, 2, 2)), "not divisible by 8"),
        (dict(in_channels=2), "1 or 3"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(base_channels=6, num_heads=4), "attention heads"),
    ],
)
def test_bad_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_unet_module_does_not_import_lightning():
    """Nor do the model's config, eval_mode, and export's checkpoint reader that uses them."""
    modules = "training.unet, training.config, training.eval_mode, ddpm_export.checkpoint"
    code = f"import sys, {modules}; print(any('lightning' in m for m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
