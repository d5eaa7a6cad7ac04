"""runtime.sampling.noise: the per-image streams stay bit-identical to one NumPy call per image per draw, whatever the
threads and block sizes; pinned hashes; threads end after use and after errors (torch-free)."""

from __future__ import annotations

import gc
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import runtime.sampling.noise as noise
from runtime.errors import GenerationError
from runtime.metadata import SamplingContract
from runtime.pipeline import Pipeline
from runtime.sampling.engine import sample
from runtime.sampling.finish import to_uint8
from runtime.sampling.noise import NoiseStreams, image_generator


def reference(seed: int, indices, shape, n: int) -> np.ndarray:
    """(n, B, *shape) float32: the streams as first written, one ``standard_normal`` call per image per draw."""
    gens = [np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, k]))) for k in indices]
    return np.stack([np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens]) for _ in range(n)])


def digest(draws: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(draws, dtype="<f4").tobytes()).hexdigest()


def wait_for_threads(count: int, timeout: float = 5.0) -> int:
    end = time.monotonic() + timeout
    while threading.active_count() > count and time.monotonic() < end:
        time.sleep(0.01)
    return threading.active_count()


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 5), (1, 32, 32), (2, 3, 7)])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_a_bulk_draw_equals_successive_draws(shape, k):
    """What the blocks rely on: NumPy keeps Philox's unused 32-bit half between calls (odd sizes included)."""
    for seed, index in ((0, 0), (7, 3), (123456789, 2**40)):
        one_by_one, bulk = image_generator(seed, index), image_generator(seed, index)
        successive = np.stack([one_by_one.standard_normal(shape, dtype=np.float32) for _ in range(k)])
        assert np.array_equal(bulk.standard_normal((k, *shape), dtype=np.float32), successive)
        # and the streams go on identically afterwards
        assert np.array_equal(bulk.standard_normal(shape, dtype=np.float32),
                              one_by_one.standard_normal(shape, dtype=np.float32))


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 5), (1, 32, 32)])
@pytest.mark.parametrize("threads", [0, 1, 2, 5])
@pytest.mark.parametrize("declared", [True, False])
def test_streams_match_the_reference_bit_for_bit(shape, threads, declared, monkeypatch):
    monkeypatch.setattr(noise, "PART_ELEMENTS", 1)  # split even tiny batches among all threads
    for seed, start, batch, n in ((0, 0, 1, 1), (7, 0, 10, 12), (3, 5, 7, 40), (11, 1000, 33, 9)):
        indices = list(range(start, start + batch))
        with NoiseStreams(seed, indices, shape, draws=n if declared else None, threads=threads) as streams:
            got = [streams.next() for _ in range(n)]
        assert all(d.shape == (batch, *shape) and d.dtype == np.float32 and d.flags.c_contiguous for d in got)
        assert np.array_equal(np.stack(got), reference(seed, indices, shape, n)), (seed, start, batch, n)


def test_non_contiguous_indices_and_blocks_of_one():
    with NoiseStreams(5, [9, 2, 2, 40], (3, 5, 5), threads=2) as streams:  # repeated and unordered indices
        got = np.stack([streams.next() for _ in range(6)])
    assert np.array_equal(got, reference(5, [9, 2, 2, 40], (3, 5, 5), 6))
    with NoiseStreams(5, [1, 2], (3, 64, 64), draws=4) as streams:  # one draw per NumPy call (large images)
        got = np.stack([streams.next() for _ in range(4)])
    assert np.array_equal(got, reference(5, [1, 2], (3, 64, 64), 4))


def test_pinned_hashes_of_fixed_seed_streams():
    """Literal hashes computed with ``reference`` when the streams were introduced: a change of the streams
    themselves fails here even if the reference and the implementation change together."""
    pinned = {(7, range(10), (1, 32, 32)): "62b7414d5f6768ffcfe3d68bdb364baa760c31e9201e27f27f26e1960198b35f",
              (7, range(3, 8), (3, 5, 5)): "b388fcda6f87cb35faa2ff3651bb2690b5ad33620e253be367948ffcfd1b9653"}
    for (seed, indices, shape), expected in pinned.items():
        assert digest(reference(seed, indices, shape, 6)) == expected
        with NoiseStreams(seed, indices, shape, draws=6) as streams:  # x_T and 5 draws
            assert digest(np.stack([streams.next() for _ in range(6)])) == expected


def test_draws_no_more_than_declared():
    streams = NoiseStreams(1, range(4), (1, 8, 8), draws=3)
    for _ in range(3):
        streams.next()
    with pytest.raises(RuntimeError, match="all 3 declared draws"):
        streams.next()
    streams.close()
    fresh = image_generator(1, 0)
    fresh.standard_normal((3, 1, 8, 8), dtype=np.float32)
    for g in streams._generators[:1]:  # nothing drawn in vain: the stream goes on where 3 draws left it
        assert np.array_equal(g.standard_normal(5, dtype=np.float32), fresh.standard_normal(5, dtype=np.float32))
    with NoiseStreams(1, range(4), (1, 8, 8), draws=0) as none:
        with pytest.raises(RuntimeError):
            none.next()
    with pytest.raises(RuntimeError, match="closed"):
        streams.next()


def test_threads_end_after_use_after_errors_and_when_dropped():
    baseline = threading.active_count()
    with NoiseStreams(0, range(64), (1, 32, 32), threads=2) as streams:
        for _ in range(10):
            streams.next()
        assert threading.active_count() > baseline  # it did use threads
    assert threading.active_count() == baseline
    with pytest.raises(ZeroDivisionError):
        with NoiseStreams(0, range(64), (1, 32, 32), threads=2) as streams:
            streams.next()
            1 / 0
    assert threading.active_count() == baseline
    streams = NoiseStreams(0, range(64), (1, 32, 32), threads=2)
    streams.next()
    del streams
    gc.collect()
    assert wait_for_threads(baseline) == baseline


class NumpyBackend:
    """A torch-free stand-in backend: ε = 0.1·x, or NaN from ``nan_below`` down (a model that fails mid-run)."""

    provider, precision, device, prefers_device_loop = "numpy", "fp32", "cpu", False

    def __init__(self, nan_below: int = -1) -> None:
        self.path = Path("numpy-backend")
        self.contract = SamplingContract(image_size=6, channels=3)
        self.nan_below = nan_below

    def predict_eps(self, x, t, y=None):
        return np.full_like(x, np.nan) if t[0] < self.nan_below else 0.1 * x

    def device_engine(self):
        raise AssertionError("a numpy backend has no device")


@pytest.mark.parametrize("settings", [dict(sampler="ddpm", steps=20), dict(sampler="ddim", steps=10, eta=0.5),
                                      dict(sampler="ddim", steps=10, eta=0.0)])
def test_the_pipeline_uses_the_streams_in_order(settings):
    """Images from ``generate_batches`` equal the sampling loop fed by the reference streams, draw by draw."""
    pipeline = Pipeline(NumpyBackend(), log=lambda msg: None)
    plan = pipeline.plan(**settings, model_defaults=False)
    indices, shape = list(range(3, 10)), (3, 6, 6)
    got = np.concatenate([im for _, _, im in pipeline.generate_batches(indices, plan, seed=4, batch_size=4)])
    expected = []
    for batch in (indices[:4], indices[4:]):
        draws = iter(reference(4, batch, shape, 1 + int(np.count_nonzero(plan.coefs.noise_coef))))
        expected.append(to_uint8(sample(pipeline.backend.predict_eps, next(draws), plan.coefs, lambda i: next(draws))))
        assert next(draws, None) is None  # every declared draw was used
    assert np.array_equal(got, np.concatenate(expected))


def test_the_pipeline_leaves_no_threads_behind_also_on_nan():
    baseline = threading.active_count()
    pipeline = Pipeline(NumpyBackend(), log=lambda msg: None)
    plan = pipeline.plan(sampler="ddpm", steps=100, model_defaults=False)
    list(pipeline.generate_batches(range(5), plan, seed=0, batch_size=2))
    assert threading.active_count() == baseline
    failing = Pipeline(NumpyBackend(nan_below=500), log=lambda msg: None)
    with pytest.raises(GenerationError, match="NaN or Inf at sampler step 51 of 100"):
        list(failing.generate_batches(range(5), plan, seed=0, batch_size=2))
    assert threading.active_count() == baseline
