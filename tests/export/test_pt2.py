"""``ddpm-export --format pt2``: the AOTInductor package carries its contract, verifies, and runs in the runtime
(host loop and device loop) like the other formats. The tiny model is compiled once per session (~30 s here)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import runtime
from ddpm_export.checkpoint import load_checkpoint
from ddpm_export.cli import main
from runtime.backends.pt2_model import TARGET_FILE
from runtime.backends.registry import model_format
from runtime.errors import ModelError
from runtime.sampling.samplers import SAMPLERS
from runtime.tolerances import TOLERANCES

FP32, SAME = TOLERANCES["fp32"], TOLERANCES["fp32-same-math"]


@pytest.fixture(scope="session")
def cond_pt2(cond_rgb_ckpt, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pt2") / "cond.pt2"
    r = CliRunner().invoke(main, [str(cond_rgb_ckpt), "--format", "pt2", "--out", str(out)])
    return out, r.output


def test_pt2_export_is_verified_and_self_describing(cond_pt2, cond_rgb_ckpt, cond_export_onnx):
    path, output = cond_pt2
    assert "verification: passed" in output, output
    assert model_format(path) == "pt2" and model_format(cond_export_onnx) == "onnx"
    report = json.loads(path.with_name(path.name + ".report.json").read_text())
    (result,) = report["checks"]["results"]
    assert result["backend"] == "pt2:cpu:fp32" and result["passed"]
    assert result["eps"]["max_abs_diff"] <= FP32.atol and result["trajectory"]["max_level_diff"] <= FP32.max_levels
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        target = json.loads(z.read(next(n for n in names if n.endswith("/" + TARGET_FILE))))
    assert target["device"] == "cpu" and target["precision"] == "fp32"
    model = runtime.load(path, "cpu")
    expected = load_checkpoint(cond_rgb_ckpt).contract(ema=True)
    assert model.contract.provenance.exporter.startswith("torch._inductor")
    assert (model.contract.image_size, model.contract.channels, model.contract.num_classes) == (16, 3, 3)
    assert model.contract.schedule == expected.schedule and model.provider == "pt2:cpu:fp32"


@pytest.mark.parametrize("settings", [dict(sampler="ddim", steps=6, eta=0.5, guidance=2.0),
                                      dict(sampler="dpmpp-2m-sde", steps=6, guidance=2.0, guidance_interval=(20, 80)),
                                      dict(sampler="unipc", steps=6, guidance=2.0)])
def test_pt2_generates_what_onnx_generates(cond_pt2, cond_export_onnx, settings):
    path, _ = cond_pt2
    settings = dict(settings, batch_size=3, seed=4)
    onnx_images = runtime.load(cond_export_onnx, "cpu").generate(5, **settings)
    pt2 = runtime.load(path, "cpu")
    host = pt2.generate(5, fused=False, **settings)
    device = pt2.generate(5, fused=True, **settings)  # the torch loop: x, update and noise as tensors
    assert np.abs(host.astype(int) - onnx_images).max() <= FP32.max_levels
    assert np.abs(device.astype(int) - host).max() <= SAME.max_levels


@pytest.mark.parametrize("settings", [dict(sampler="ddpm", steps=8, guidance=1.5), dict(sampler="dpmpp-2m", steps=8),
                                      *(dict(sampler=name, steps=s.min_steps + 4, guidance=2.0)  # h1 … hH as tensors
                                        for name, s in SAMPLERS.items() if s.history > 1)])
def test_torchscript_device_loop_equals_its_host_loop(cond_torchscript, settings):
    model = runtime.load(cond_torchscript, "cpu")
    settings = dict(settings, batch_size=4, seed=1)
    host, device = (model.generate(4, fused=f, **settings) for f in (False, True))
    assert np.abs(device.astype(int) - host).max() <= SAME.max_levels


def test_pt2_bad_requests_are_one_line_errors(cond_rgb_ckpt, cond_pt2, fresh_copy, tmp_path):
    import torch

    ckpt = fresh_copy(cond_rgb_ckpt)
    r = CliRunner().invoke(main, [str(ckpt), "--format", "onnx", "--dtype", "bf16"])
    assert r.exit_code != 0 and "--dtype bf16 applies to pt2 (not onnx)" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, [str(ckpt), "--format", "pt2", "--device", "cuda"])
        assert r.exit_code != 0 and "torch sees no CUDA device" in r.output and "Traceback" not in r.output
        assert not list(ckpt.parent.glob("*.pt2")) and not list(ckpt.parent.glob(".*tmp*"))
    with pytest.raises(ModelError, match="compiled for cpu; it cannot run on cuda"):
        runtime.load(cond_pt2[0], "cuda")
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(cond_pt2[0].read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        runtime.load(broken, "cpu")


@pytest.mark.gpu
def test_pt2_cuda_export_runs_on_the_gpu(cond_rgb_ckpt, fresh_copy, cond_pt2):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ckpt = fresh_copy(cond_rgb_ckpt)
    r = CliRunner().invoke(main, [str(ckpt), "--format", "pt2", "--device", "cuda"])
    assert r.exit_code == 0 and "verification: passed" in r.output, r.output
    gpu = runtime.load(ckpt.with_suffix(".pt2"), "auto")
    assert gpu.provider == "pt2:cuda:fp32"
    settings = dict(sampler="ddim", steps=6, guidance=2.0, batch_size=5)
    cpu_images = runtime.load(cond_pt2[0], "cpu").generate(5, **settings)
    assert np.abs(gpu.generate(5, **settings).astype(int) - cpu_images).max() <= FP32.max_levels


def test_a_package_of_a_bounded_batch_range_runs_larger_batches_in_even_chunks():
    """A network that branches on the batch size (diffusers' Upsample2D at 64) compiles for batch 1 ... 63; the
    backend splits what is larger into the fewest even chunks and joins the results in order."""
    import torch

    from runtime.backends.pt2_model import Pt2Model

    calls = []

    def runner(x, t):
        calls.append(x.shape[0])
        assert x.shape[0] <= 63
        return x * 2 + t.view(-1, 1, 1, 1)

    model = object.__new__(Pt2Model)
    model.runner, model.max_batch, model.torch = runner, 63, torch
    x, t = torch.randn(130, 1, 2, 2), torch.arange(130)
    assert torch.equal(model.net(x, t), x * 2 + t.view(-1, 1, 1, 1))
    assert calls == [44, 44, 42]
    calls.clear()
    model.net(x[:63], t[:63])
    assert calls == [63]
