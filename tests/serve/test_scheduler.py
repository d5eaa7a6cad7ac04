"""The continuous-batching scheduler: images of requests at different steps share predictor calls and still come out
as offline generation makes them; cancellation, queue limits, NaN isolation, the naive mode."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import runtime
import serve.scheduler as scheduler_module
from runtime.errors import GenerationError, SettingsError
from runtime.sampling.samplers import SAMPLERS
from runtime.tolerances import TOLERANCES
from serve.errors import Cancelled, QueueFull
from serve.scheduler import Scheduler

LEVELS = TOLERANCES["fp32-same-math"].max_levels
REQUESTS = [  # mixed samplers, steps, guidance, classes and clipping in flight together
    dict(n=3, seed=1, sampler="ddpm", steps=12, guidance=2.0),
    dict(n=2, seed=2, sampler="ddim", steps=5, eta=0.0, guidance=1.0, classes=2),
    dict(n=4, seed=3, sampler="ddim", steps=9, eta=0.7, guidance=3.0, start_index=5),
    dict(n=1, seed=4, sampler="ddpm", steps=7, clip_denoised=True, guidance=1.5),
    dict(n=2, seed=5, sampler="dpmpp-2m", steps=6, guidance=2.0),  # multistep: each image keeps its last x̂₀
    dict(n=2, seed=6, sampler="dpmpp-2m-sde", steps=8, guidance=1.5, guidance_interval=(20, 70), classes=1),
    dict(n=1, seed=7, sampler="ddim", steps=10, guidance=3.0, guidance_interval=(0, 40), clip_denoised=True),
    dict(n=2, seed=12, sampler="dpmpp-2m", timesteps=(90, 61, 30, 7), guidance=1.5),  # an explicit list
    dict(n=1, seed=13, sampler="ddim", steps=6, spacing="logsnr", guidance=2.5),
    # every sampler with more history, from the registry: h1 … hH kept while an image sits out a tick
    *(dict(n=2, seed=8 + k, sampler=name, steps=s.min_steps + 3 + k, guidance=2.0 + k / 2, guidance_interval=(10, 70))
      for k, (name, s) in enumerate((name, s) for name, s in SAMPLERS.items() if s.history > 1)),
]


def offline(model, n, **settings):
    return model.generate(n, batch_size=n, **settings)


@pytest.fixture
def cond_model(cond_onnx):
    return runtime.load(cond_onnx, "cpu")


def run(scheduler, requests):
    scheduler.start()
    try:
        jobs = [scheduler.submit(**r) for r in requests]
        return [[im.image for im in job.result(timeout=60)] for job in jobs]
    finally:
        scheduler.stop(grace=5)


@pytest.mark.parametrize("batching", [True, False])
def test_images_equal_offline_generation(cond_model, batching):
    scheduler = Scheduler(cond_model, max_batch=6, batching=batching)
    results = run(scheduler, REQUESTS)
    for request, images in zip(REQUESTS, results):
        expected = offline(cond_model, **request)
        assert np.abs(np.stack(images).astype(int) - expected).max() <= LEVELS, request
    stats = scheduler.stats()
    assert stats["images_done"] == sum(r["n"] for r in REQUESTS) and stats["requests_done"] == len(REQUESTS)
    if batching:  # requests shared calls: fewer calls than the requests' steps added up
        assert stats["predictor_calls"] < sum(r.get("steps") or len(r["timesteps"]) for r in REQUESTS)
        assert max(stats["batch_fill"]) > 6  # guided images doubled in the same call


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_v_and_x0_models_serve_what_they_generate_offline(tmp_path, prediction):
    from tests.toy_onnx import make_toy_predictor

    model = runtime.load(make_toy_predictor(tmp_path / "m.onnx", channels=3, image_size=16, num_classes=3,
                                            prediction=prediction), "cpu")
    requests = REQUESTS[:3] + REQUESTS[4:6]
    for request, images in zip(requests, run(Scheduler(model, max_batch=6), requests)):
        assert np.abs(np.stack(images).astype(int) - offline(model, **request)).max() <= LEVELS, request


@pytest.mark.parametrize("batching", [True, False])
def test_a_latent_model_serves_what_it_generates_offline(latent_onnx, batching):
    """Each finished image goes through the decoder stage once, in the tick that finished it, batched with the images
    that finished with it."""
    model = runtime.load(latent_onnx, "cpu")
    calls = []
    decode = model.backend.decode
    model.backend.decode = lambda z: (calls.append(len(z)), decode(z))[1]
    requests = REQUESTS[:6]
    results = run(Scheduler(model, max_batch=6, batching=batching), requests)
    model.backend.decode = decode
    for request, images in zip(requests, results):
        assert np.stack(images).shape[1:] == (8, 8, 3)
        assert np.abs(np.stack(images).astype(int) - offline(model, **request)).max() <= LEVELS, request
    assert sum(calls) == sum(r["n"] for r in requests) and len(calls) < sum(r["n"] for r in requests)


def test_a_short_request_overtakes_a_long_one(cond_model):
    scheduler = Scheduler(cond_model, max_batch=8)
    long = scheduler.submit(2, sampler="ddpm", steps=100)
    short = scheduler.submit(1, sampler="ddim", steps=3)
    scheduler.start()  # both join the first call
    try:
        short.result(timeout=60)
        assert not long.done
        long.result(timeout=60)
    finally:
        scheduler.stop(grace=5)


class Paused:
    """Wraps a backend: after ``after`` predictor calls it signals ``reached`` and waits for ``go``."""

    def __init__(self, backend, after: int) -> None:
        self.backend, self.after, self.calls = backend, after, 0
        self.reached, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def predict_eps(self, x, t, y=None):
        self.calls += 1
        if self.calls == self.after:
            self.reached.set()
            self.go.wait(timeout=60)
        return self.backend.predict_eps(x, t, y)


def test_cancel_mid_flight_drops_the_images_and_the_rest_goes_on(cond_model):
    paused = Paused(cond_model.backend, after=3)
    scheduler = Scheduler(runtime.Pipeline(paused, log=lambda m: None), max_batch=8)
    doomed = scheduler.submit(3, sampler="ddpm", steps=100)
    other = scheduler.submit(1, sampler="ddpm", steps=100, seed=9)
    scheduler.start()
    try:
        assert paused.reached.wait(timeout=60)
        assert scheduler.stats()["images_in_flight"] == 4  # both requests are in the batch
        doomed.cancel()
        paused.go.set()
        with pytest.raises(Cancelled):
            doomed.result(timeout=60)
        assert np.abs(other.result(timeout=60)[0].image.astype(int)
                      - offline(cond_model, 1, sampler="ddpm", steps=100, seed=9)[0]).max() <= LEVELS
        stats = scheduler.stats()
        assert stats["images_done"] == 1 and stats["batch_fill"][-1] == 1  # only `other` was left in the calls
    finally:
        paused.go.set()
        scheduler.stop(grace=5)


def test_queue_limit_and_bad_settings(cond_model, uncond_onnx):
    scheduler = Scheduler(cond_model, queue_limit=4)  # not started: nothing leaves the queue
    scheduler.submit(3, steps=5)
    with pytest.raises(QueueFull, match="limit 4"):
        scheduler.submit(2, steps=5)
    with pytest.raises(SettingsError, match="unconditional"):
        Scheduler(runtime.load(uncond_onnx, "cpu")).submit(1, guidance=2.0)
    with pytest.raises(SettingsError, match="eta"):
        scheduler.submit(1, sampler="ddim", eta=5.0)
    scheduler.stop(grace=0)
    with pytest.raises(Cancelled, match="stopping"):
        scheduler.submit(1, steps=5)


class NanBelow:
    """Wraps a backend: NaN for the rows of label 1 (one request's images), the real ε for the others."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def predict_eps(self, x, t, y=None):
        eps = self.backend.predict_eps(x, t, y)
        eps[y == 1] = np.nan
        return eps


def test_nan_fails_that_request_only(cond_model):
    model = runtime.Pipeline(NanBelow(cond_model.backend), log=lambda m: None)
    scheduler = Scheduler(model, max_batch=8)
    scheduler.start()
    try:
        bad = scheduler.submit(1, classes=1, sampler="ddim", steps=5)
        good = scheduler.submit(2, classes=0, sampler="ddim", steps=5)
        with pytest.raises(GenerationError, match="NaN or Inf at sampler step 1 of 5"):
            bad.result(timeout=60)
        assert len(good.result(timeout=60)) == 2
    finally:
        scheduler.stop(grace=5)


def test_stop_drains_admitted_work_and_refuses_new(cond_model):
    scheduler = Scheduler(cond_model, max_batch=4)
    scheduler.start()
    job = scheduler.submit(2, sampler="ddpm", steps=60)
    stopper = threading.Thread(target=scheduler.stop, kwargs={"grace": 30})
    stopper.start()
    assert len(job.result(timeout=60)) == 2  # finished within the grace period
    stopper.join(timeout=60)
    assert not stopper.is_alive()


@pytest.mark.parametrize("long_sampler, long_steps", [("ddpm", 100), ("dpmpp-2m-sde", 60)])
def test_with_a_full_batch_a_short_request_takes_a_long_ones_slot_and_both_are_right(cond_model, long_sampler,
                                                                                     long_steps):
    scheduler = Scheduler(cond_model, max_batch=2)  # the long request alone fills the batch
    long = scheduler.submit(4, sampler=long_sampler, steps=long_steps, seed=5)
    short = scheduler.submit(1, sampler="ddim", steps=3, seed=6)
    scheduler.start()
    try:
        first = short.result(timeout=60)
        assert not long.done  # it overtook: shortest remaining work first
        assert scheduler.stats()["batch_fill"][:3] == [2, 2, 2]  # never more than max_batch images per call
        rest = long.result(timeout=60)  # paused images resume unchanged
    finally:
        scheduler.stop(grace=5)
    assert (np.abs(first[0].image.astype(int) - offline(cond_model, 1, sampler="ddim", steps=3, seed=6)[0]).max()
            <= LEVELS)
    expected = offline(cond_model, 4, sampler=long_sampler, steps=long_steps, seed=5)
    assert np.abs(np.stack([im.image for im in rest]).astype(int) - expected).max() <= LEVELS


def test_the_batch_fill_histogram_counts_every_call_however_many_come_between_scrapes(cond_model):
    """More predictor calls than the stats' recent window (RECENT) between two scrapes: all are counted."""
    pytest.importorskip("prometheus_client", reason="needs the serve extra")
    from serve.metrics import Metrics
    from serve.scheduler import RECENT

    scheduler = Scheduler(cond_model, max_batch=1)  # one image per call: calls = images x steps
    metrics = Metrics(scheduler, 1)
    steps = cond_model.contract.schedule.timesteps  # DDPM at all T
    n_jobs = RECENT // steps + 1
    run(scheduler, [dict(n=1, seed=k, sampler="ddpm", guidance=1.0) for k in range(n_jobs)])
    calls = scheduler.stats()["predictor_calls"]
    assert calls > RECENT
    text = metrics.render().decode()
    assert f"ddpm_serve_batch_fill_count {float(calls)}" in text, [ln for ln in text.splitlines() if "count" in ln]


def test_a_stream_of_short_requests_never_starves_a_long_one(cond_model):
    """The batch stays full of short requests; the oldest request keeps a reserved slot, so the long one ends long
    before the shorts do (shortest-remaining-work-first alone would make it wait for every one of them)."""
    scheduler = Scheduler(cond_model, max_batch=4, queue_limit=10_000)  # one slot reserved
    long = scheduler.submit(1, sampler="ddpm", steps=100, seed=1)
    shorts = [scheduler.submit(3, sampler="ddim", steps=3, seed=10 + k) for k in range(100)]  # 900 image-steps
    scheduler.start()
    try:
        long.result(timeout=60)
        assert sum(not s.done for s in shorts) > 50  # 100 ticks in: about a third of the shorts' work is done
        for s in shorts:
            s.result(timeout=60)
    finally:
        scheduler.stop(grace=5)


@pytest.mark.parametrize("aging", [0, scheduler_module.AGING], ids=["no-aging", "aging"])
def test_a_mid_sized_request_is_not_starved_by_a_stream_of_smaller_ones(cond_model, monkeypatch, aging):
    """One slot is the oldest request's (a long one), the other three go to the least remaining work. A stream of
    small requests, one arriving with every predictor call, keeps those three busy: by remaining work alone a
    request of three 20-step images waits behind every one of them until the long one ends; aged by its waiting
    it gains on every newcomer and ends long before the long one."""
    monkeypatch.setattr(scheduler_module, "AGING", aging)
    scheduler = Scheduler(cond_model, max_batch=4, queue_limit=10_000)
    long = scheduler.submit(1, sampler="ddpm", steps=100, seed=1)
    medium = scheduler.submit(3, sampler="ddim", steps=20, seed=2)
    stream = []
    scheduler.on_call.append(lambda rows: long.done or stream.append(
        scheduler.submit(1, sampler="ddim", steps=3, seed=10 + len(stream))))
    scheduler.start()
    try:
        medium_images = medium.result(timeout=60)
        medium_done_at = scheduler.predictor_calls
        long.result(timeout=60)
        long_done_at = scheduler.predictor_calls
        for s in stream:
            s.result(timeout=60)
    finally:
        scheduler.stop(grace=5)
    if aging:
        assert medium_done_at < 0.7 * long_done_at, (medium_done_at, long_done_at)
        expected = cond_model.generate(3, seed=2, sampler="ddim", steps=20)
        assert np.array_equal(np.stack([r.image for r in medium_images]), expected)
    else:  # what the aging is for
        assert medium_done_at >= long_done_at - 1, (medium_done_at, long_done_at)
