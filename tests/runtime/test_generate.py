"""runtime.load / Generator.generate: agreement with the eager model, batch and thread independence, backends."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import runtime
from ddpm_export.checkpoint import load_checkpoint
from runtime.images import to_uint8
from runtime.noise import NoiseStreams
from runtime.samplers import sample
from training.predictor import eps_predictor


def eager_images(ckpt, g, n, plan, seed=0, classes=None):
    """The same run through the eager U-Net in torch, with the runtime's noise streams injected."""
    net, _ = load_checkpoint(ckpt).build_unet()
    c = g.contract
    indices = list(range(n))
    streams = NoiseStreams(seed, indices, (c.channels, c.image_size, c.image_size))
    labels = g.labels(indices, classes)
    y = None if labels is None else torch.from_numpy(labels)
    predict = eps_predictor(net, y, guidance=plan.guidance, null_class=c.null_class)
    x_T = torch.from_numpy(streams.next())
    with torch.no_grad():
        x0 = sample(predict, x_T, plan.coefs, lambda i: torch.from_numpy(streams.next()))
    return to_uint8(x0.numpy())


@pytest.mark.parametrize("sampler, steps, guidance", [("ddpm", None, 2.0), ("ddim", 10, 1.0), ("ddpm", 10, 3.0)])
def test_runtime_agrees_with_the_eager_model_on_identical_noise(cond_rgb_ckpt, cond_onnx, sampler, steps, guidance):
    g = runtime.load(cond_onnx, "cpu")
    plan = g.plan(sampler, steps, guidance=guidance)
    ours = g.generate(6, sampler=sampler, steps=steps, guidance=guidance, batch_size=4)
    ref = eager_images(cond_rgb_ckpt, g, 6, plan)
    assert ours.shape == (6, 16, 16, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref).max() <= 2


def test_images_do_not_depend_on_batch_size_or_start_index(uncond_onnx):
    g = runtime.load(uncond_onnx, "cpu")
    runs = [g.generate(16, sampler="ddim", steps=8, eta=1.0, batch_size=b, seed=3) for b in (1, 5, 16)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    tail = g.generate(6, sampler="ddim", steps=8, eta=1.0, seed=3, start_index=10)
    assert np.array_equal(tail, runs[0][10:])
    other_seed = g.generate(2, sampler="ddim", steps=8, eta=1.0, seed=4)
    assert not np.array_equal(other_seed, runs[0][:2])


def test_eight_threads_give_the_same_images_as_one(cond_onnx):
    g = runtime.load(cond_onnx, "cpu")
    expected = g.generate(16, sampler="ddim", steps=6, guidance=2.0, batch_size=4)
    results, errors = {}, []

    def work(k: int) -> None:
        try:
            results[k] = g.generate(2, sampler="ddim", steps=6, guidance=2.0, start_index=2 * k, batch_size=1)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert np.array_equal(np.concatenate([results[k] for k in range(8)]), expected)


def test_fused_step_graph_agrees_with_the_unfused_loop(cond_onnx):
    g = runtime.load(cond_onnx, "cpu")
    for kwargs in (dict(sampler="ddpm", steps=12, guidance=2.5), dict(sampler="ddim", steps=6, eta=0.5),
                   dict(sampler="ddpm", steps=8, clip_denoised=True)):
        plan = g.plan(**kwargs)
        labels = g.labels(range(5), None)
        runs = [np.concatenate([im for _, _, im in g.generate_batches(range(5), plan, seed=2, batch_size=3,
                                                                       labels=labels, fused=fused)])
                for fused in (False, True)]
        assert np.abs(runs[0].astype(int) - runs[1]).max() <= 1, kwargs


def test_classes_by_name_and_index(cond_onnx):
    g = runtime.load(cond_onnx, "cpu")
    assert g.labels([0, 1, 2, 3, 4], None).tolist() == [0, 1, 2, 0, 1]  # cycle by image index
    assert g.labels([7, 8], 2).tolist() == [2, 2]
    assert g.labels([0, 1], [1, "0"]).tolist() == [1, 0]
    with pytest.raises(runtime.GenerationError, match="out of range"):
        g.labels([0], 3)  # 3 is the null label, not a class


def test_torchscript_backend_matches_onnx(cond_onnx, cond_torchscript):
    a = runtime.load(cond_onnx, "cpu").generate(4, sampler="ddim", steps=6, guidance=2.0)
    b = runtime.load(cond_torchscript, "cpu").generate(4, sampler="ddim", steps=6, guidance=2.0)
    assert np.abs(a.astype(int) - b).max() <= 2


def test_provider_auto_reports_what_ran(uncond_onnx):
    messages = []
    g = runtime.load(uncond_onnx, "auto", log=messages.append)
    assert g.provider in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
    if g.provider == "CPUExecutionProvider" and not torch.cuda.is_available():
        assert any("did not start" in m and "CPUExecutionProvider" in m for m in messages)


@pytest.mark.gpu
def test_cuda_fused_iobinding_matches_cpu(cond_onnx):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = runtime.load(cond_onnx, "cpu").generate(8, sampler="ddpm", steps=20, guidance=2.0)
    cuda = runtime.load(cond_onnx, "cuda")
    plan = cuda.plan("ddpm", 20, guidance=2.0)
    fused = np.concatenate([im for _, _, im in cuda.generate_batches(range(8), plan, seed=0, batch_size=8,
                                                                       labels=cuda.labels(range(8), None), fused=True)])
    assert np.abs(cpu.astype(int) - fused).max() <= 2
