"""runtime.load / Pipeline.generate on toy predictors: batch, start-index and thread independence, the fused step,
classes, providers (torch-free; agreement with the eager U-Net is in test_eager_agreement.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import runtime
from runtime.errors import ModelError
from runtime.sampling import samplers
from runtime.tolerances import TOLERANCES


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
                   dict(sampler="ddpm", steps=8, clip_denoised=True), dict(sampler="dpmpp-2m", steps=10, guidance=2.0),
                   dict(sampler="dpmpp-2m-sde", steps=10, guidance=1.5, guidance_interval=(30, 70)),
                   dict(sampler="dpmpp-2m", steps=7, clip_denoised=True),
                   dict(sampler="ddim", steps=9, guidance=3.0, guidance_interval=(0, 50)),
                   # every sampler that keeps more history, from the registry: h1 … hH through the graph
                   *(dict(sampler=name, steps=s.min_steps + 5, guidance=2.0, guidance_interval=(20, 80))
                     for name, s in samplers.SAMPLERS.items() if s.history > 1)):
        plan = g.plan(**kwargs)
        labels = g.labels(range(5), None)
        runs = [np.concatenate([im for _, _, im in g.generate_batches(range(5), plan, seed=2, batch_size=3,
                                                                       labels=labels, fused=fused)])
                for fused in (False, True)]
        assert np.abs(runs[0].astype(int) - runs[1]).max() <= TOLERANCES["fp32-same-math"].max_levels, kwargs


def test_classes_by_name_and_index(cond_onnx):
    g = runtime.load(cond_onnx, "cpu")
    assert g.labels([0, 1, 2, 3, 4], None).tolist() == [0, 1, 2, 0, 1]  # cycle by image index
    assert g.labels([7, 8], 2).tolist() == [2, 2]
    assert g.labels([0, 1], [1, "0"]).tolist() == [1, 0]
    with pytest.raises(runtime.GenerationError, match="out of range"):
        g.labels([0], 3)  # 3 is the null label, not a class


@pytest.mark.parametrize("gpu", [False, True])
def test_provider_auto_reports_what_ran(uncond_onnx, monkeypatch, gpu):
    """GPU providers that did not start are news only where a GPU is visible (``gpu_visible``, patched here)."""
    import runtime.backends.onnx_model

    monkeypatch.setattr(runtime.backends.onnx_model, "gpu_visible", lambda: gpu)
    messages = []
    g = runtime.load(uncond_onnx, "auto", log=messages.append)
    assert g.provider in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
    if g.provider == "CPUExecutionProvider":
        reported = [m for m in messages if "did not start" in m and "CPUExecutionProvider" in m]
        assert len(reported) == int(gpu), messages


@pytest.mark.gpu
def test_cuda_fused_iobinding_matches_cpu(cond_onnx):
    try:
        cuda = runtime.load(cond_onnx, "cuda")
    except ModelError as e:
        pytest.skip(f"no CUDA provider here ({e})")
    cpu = runtime.load(cond_onnx, "cpu").generate(8, sampler="ddpm", steps=20, guidance=2.0)
    plan = cuda.plan(sampler="ddpm", steps=20, guidance=2.0)
    fused = np.concatenate([im for _, _, im in cuda.generate_batches(range(8), plan, seed=0, batch_size=8,
                                                                       labels=cuda.labels(range(8), None), fused=True)])
    assert np.abs(cpu.astype(int) - fused).max() <= TOLERANCES["fp32"].max_levels


def test_the_fused_engine_keeps_x_and_the_history_as_ort_values(cond_onnx):
    """The device form of the fused path (x and h1 … hH as OrtValues, IOBinding, NaN checks every 25 steps), run on
    the CPU's OrtValues: the same images as the host loop, for every sampler with history."""
    from runtime.backends.fused import FusedStep, fused_ops
    from runtime.sampling.engine import Engine
    from runtime.sampling.noise import NoiseStreams

    g = runtime.load(cond_onnx, "cpu")
    c = g.contract
    for name, s in samplers.SAMPLERS.items():
        plan = g.plan(sampler=name, steps=max(s.min_steps, 6), guidance=2.0, guidance_interval=(10, 60))
        labels = g.labels(range(4), None)
        host = np.concatenate([im for _, _, im in g.generate_batches(range(4), plan, seed=5, batch_size=4,
                                                                       labels=labels, fused=False)])
        engine = Engine(None, fused_ops("cpu"), null_class=c.null_class,
                        fused=FusedStep(g.backend._step_session, on_device=True))
        with NoiseStreams(5, range(4), (c.channels, c.image_size, c.image_size), draws=plan.coefs.draws) as streams:
            engine.add(plan.coefs, range(4), streams, labels)
            while (tick := engine.tick()).out is None:
                assert not tick.failed
        assert len(engine) == 0 and engine.history == []
        assert np.abs(tick.out.astype(int) - host).max() <= TOLERANCES["fp32-same-math"].max_levels, name
