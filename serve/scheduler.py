"""Continuous batching: one loop owns the model; every image in flight, from any request, advances one step per
predictor call, at its own timestep, with its own plan, class and guidance.

The images live in one batch engine (``runtime.sampling.engine.Engine``), each tracked by its request. Each tick the
loop picks up to ``max_batch`` of them and the engine makes one predictor call for them (the guided ones doubled in
the same call with the null class, only on their guided steps) and one step each, with its own row of its own
plan's table and its own noise stream (``runtime.sampling.noise``): an image comes out as
``runtime.load(model).generate`` makes it, and one predictor call mixes images of any samplers. Which images: a
quarter of the slots (at least one) to the oldest request, so that no request starves; the rest shortest remaining
work first, aged by waiting — the images of the request with the least ``image-steps left − AGING × ticks since it
arrived`` (ties: the older request) —, so a short request overtakes a long one at the next tick instead of waiting
for it, and a request that is neither the shortest nor the oldest still gains AGING image-steps on every newcomer
for each tick it waits, instead of waiting behind a stream of smaller ones; an image that sits out a tick keeps its
x and its history and goes on later, unchanged. New requests join at the next tick; finished images leave at once.
``batching=False`` is the naive server for comparison: one request at a time, through ``Pipeline.generate_batches``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from runtime.backends.backend import host_engine
from runtime.errors import GenerationError
from runtime.pipeline import Pipeline
from runtime.sampling.noise import NoiseStreams
from runtime.sampling.plan import SamplingPlan
from runtime.sampling.settings import RunSettings
from serve.errors import Cancelled, QueueFull

AGING = 2  # image-steps of priority a request gains for every tick (predictor call) it has waited
RECENT = 2048  # how many batch sizes and latencies stats() keeps (the metrics see every call: ``on_call``)


@dataclass(frozen=True)
class ImageResult:
    index: int  # image index k (its noise stream is SeedSequence([seed, k]))
    seed: int
    label: int | None  # class index, None for unconditional models
    image: np.ndarray  # (H, W, C) uint8


class Job:
    """One submitted request: ``plan`` and ``labels`` are its resolved settings.

    ``result(timeout)`` blocks until all its images are done: list[ImageResult] in index order; it raises
    ``GenerationError`` (e.g. NaN in one of its images), ``Cancelled`` or ``TimeoutError``. ``await job.wait()``
    does the same from asyncio. ``cancel()`` drops its images at the next step.
    """

    def __init__(self, n: int, seed: int, start_index: int, plan: SamplingPlan, labels: np.ndarray | None,
                 arrived: int = 0) -> None:
        self.n, self.seed, self.plan, self.labels = n, seed, plan, labels
        self.indices = list(range(start_index, start_index + n))
        self.results: list[ImageResult | None] = [None] * n
        self.remaining = n
        self.cancelled = False
        self.submitted = time.monotonic()
        self.arrived = arrived  # the scheduler's predictor calls when it was submitted (its age in ticks: aging)
        self._future: concurrent.futures.Future = concurrent.futures.Future()

    @property
    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> list[ImageResult]:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the request did not finish within {timeout} s") from None

    async def wait(self) -> list[ImageResult]:
        return await asyncio.wrap_future(self._future)

    def cancel(self) -> None:
        self.cancelled = True

    def _finish(self, error: BaseException | None = None) -> None:
        if not self._future.done():
            if error is None:
                self._future.set_result(list(self.results))
            else:
                self._future.set_exception(error)


class Scheduler:
    """The loop that owns the model; see the module docstring.

    ``submit(n, *, seed, start_index, classes, settings, **run_settings) -> Job`` (run settings: the fields of
    ``runtime.sampling.settings.RunSettings``) validates the settings with the pipeline's plan (``SettingsError``, one
    line; None takes the model's recommendation, as ``Pipeline.generate`` does) and raises ``QueueFull`` beyond
    ``queue_limit`` images waiting or in flight, ``Cancelled`` once stopping. ``max_batch``: images per predictor call
    (guided ones count once but make two rows); on a CPU a few dozen rows per call are fastest, a GPU wants thousands.
    ``stats()``: queue_depth, images_in_flight, images_done, requests_done, predictor_calls, batch_fill (rows per recent
    call), latencies (seconds of recent requests). ``on_call``: functions called with the rows of every predictor call
    (the metrics' batch-fill histogram), from the loop's thread.
    """

    def __init__(self, pipeline: Pipeline, *, max_batch: int = 256, queue_limit: int = 1024,
                 batching: bool = True) -> None:
        if max_batch < 1 or queue_limit < 1:
            raise ValueError("max_batch and queue_limit must be positive")
        self.pipeline, self.max_batch, self.queue_limit, self.batching = pipeline, max_batch, queue_limit, batching
        c = pipeline.contract
        self.shape = c.latent_shape
        self._waiting: collections.deque[Job] = collections.deque()  # submitted, not yet turned into images
        # the live images of admitted requests (``Image.owner``: the request), advanced by one predictor call a tick
        self.engine = host_engine(pipeline.backend)
        self._flight: list = []  # the images of the current (or last) predictor call that are still live
        self._alone_flight = 0  # batching=False: the images of the batch being denoised
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.images_done = self.requests_done = self.predictor_calls = 0
        self.batch_fill: collections.deque[int] = collections.deque(maxlen=RECENT)
        self.latencies: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.on_call: list[Callable[[int], None]] = []

    # -- admission -----------------------------------------------------------------------------------------------
    def submit(self, n: int, *, seed: int = 0, start_index: int = 0, classes=None, settings: RunSettings | None = None,
               **run_settings) -> Job:
        if n < 1 or seed < 0 or start_index < 0:
            raise GenerationError("n must be positive, seed and start_index non-negative")
        plan = self.pipeline.plan(settings, **run_settings)
        indices = range(start_index, start_index + n)
        job = Job(n, seed, start_index, plan, self.pipeline.labels(indices, classes), arrived=self.predictor_calls)
        with self._cond:
            if self._stopping:
                raise Cancelled("the server is stopping")
            if self._pending_images() + n > self.queue_limit:
                raise QueueFull(f"{self._pending_images()} images are queued or in flight (limit {self.queue_limit})")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def _pending_images(self) -> int:
        return sum(j.n for j in self._waiting) + len(self.engine)

    def stats(self) -> dict:
        with self._cond:
            flight = len(self._flight) + self._alone_flight
            return {"queue_depth": self._pending_images() - flight, "images_in_flight": flight,
                    "images_done": self.images_done,
                    "requests_done": self.requests_done, "predictor_calls": self.predictor_calls,
                    "batch_fill": list(self.batch_fill), "latencies": list(self.latencies)}

    # -- the loop ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ddpm-scheduler", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 30.0) -> None:
        """Refuse new requests, let those admitted finish for up to ``grace`` seconds, cancel the rest, end."""
        deadline = time.monotonic() + grace
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            while (self._waiting or self.engine.images) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
            for job in [*self._waiting, *{im.owner for im in self.engine.images}]:
                job.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, grace))

    def _run(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled()
                if self.batching:
                    self._admit()
                while not self.engine.images and not self._waiting:
                    if self._stopping:
                        return
                    self._cond.wait(timeout=0.5)
                    self._drop_cancelled()
                    if self.batching:
                        self._admit()
                job = None if self.batching else (self._waiting[0] if self._waiting else None)
            if self.batching:
                if self.engine.images:
                    self._tick()
            elif job is not None:
                self._run_alone(job)
            with self._cond:
                self._cond.notify_all()

    def _admit(self) -> None:
        """Waiting requests become live images (x_T drawn), to be picked by ``_select`` (called under the lock)."""
        while self._waiting:
            job = self._waiting.popleft()
            coefs = job.plan.coefs
            streams = [NoiseStreams(job.seed, [k], self.shape, draws=coefs.draws, threads=0) for k in job.indices]
            self.engine.add(coefs, job.indices, streams, job.labels, owner=job)

    def _select(self) -> list[int]:
        """The positions of up to ``max_batch`` live images (called under the lock): the reserved slots
        (``max_batch // 4``, at least one from 2 on) to the oldest request's images, so that a long request is never
        starved by a stream of short ones; the rest shortest remaining work first, aged by the ticks waited."""
        pool = self.engine.images
        if len(pool) <= self.max_batch:
            return list(range(len(pool)))
        reserved = self.max_batch // 4 or min(1, self.max_batch - 1)
        oldest = sorted(range(len(pool)), key=lambda p: (pool[p].owner.submitted, pool[p].index))[:reserved]
        taken = set(oldest)
        left: dict[Job, int] = collections.Counter()
        for im in pool:
            left[im.owner] += im.i + 1
        now = self.predictor_calls
        shortest = sorted((p for p in range(len(pool)) if p not in taken),
                          key=lambda p: (left[pool[p].owner] - AGING * (now - pool[p].owner.arrived),
                                         pool[p].owner.submitted, pool[p].index))
        return oldest + shortest[:self.max_batch - len(oldest)]

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave: their images stop, the caller gets ``Cancelled`` (called under the lock)."""
        gone = {j for j in self._waiting if j.cancelled} | {im.owner for im in self.engine.images if im.owner.cancelled}
        if not gone:
            return
        self._waiting = collections.deque(j for j in self._waiting if j not in gone)
        self.engine.remove([p for p, im in enumerate(self.engine.images) if im.owner in gone])
        self._flight = [im for im in self._flight if im.owner not in gone]
        for job in gone:
            job._finish(Cancelled("the request was cancelled"))

    def _tick(self) -> None:
        """One predictor call for the selected images, one step each (the batch engine), then their requests."""
        with self._cond:
            positions = self._select()
            self._flight = [self.engine.images[p] for p in positions]
        tick = self.engine.tick(positions)
        self.predictor_calls += 1
        self.batch_fill.append(tick.rows)
        for observe in self.on_call:
            observe(tick.rows)
        with self._cond:
            for im, problem in tick.failed:
                job = im.owner
                job._finish(GenerationError(f"{problem} for image {im.index}; nothing was returned"))
                job.cancel()
            for b, im in enumerate(tick.finished):
                job = im.owner
                if job.done:
                    continue
                k = im.index - job.indices[0]
                job.results[k] = ImageResult(im.index, job.seed, im.label, tick.out[b])
                job.remaining -= 1
                self.images_done += 1
                if job.remaining == 0:
                    self._complete(job)
            self._flight = [im for im in self._flight if im.i >= 0 and not im.owner.done]
            self._drop_cancelled()

    def _complete(self, job: Job) -> None:
        self.requests_done += 1
        self.latencies.append(time.monotonic() - job.submitted)
        job._finish()

    def _run_alone(self, job: Job) -> None:
        """The naive server: the whole request through the offline pipeline, one request at a time. A cancelled
        request (client gone, deadline, shutdown) stops at the next sampler step, as in the batching loop."""

        def step_done(batch: int) -> None:
            if job.cancelled:
                raise Cancelled("the request was cancelled")
            with self._cond:
                self._alone_flight = batch

        try:
            out = []
            for idx, y, images in self.pipeline.generate_batches(job.indices, job.plan, seed=job.seed,
                                                                 batch_size=self.max_batch, labels=job.labels,
                                                                 progress=step_done):
                out += [ImageResult(i, job.seed, None if y is None else int(y[k]), images[k])
                        for k, i in enumerate(idx)]
            job.results = out
            with self._cond:
                self._alone_flight = 0
                self.images_done += job.n
                self.predictor_calls += len(job.plan.coefs.timesteps) * -(-job.n // self.max_batch)
                self._waiting.popleft()
                self._complete(job)
        except (GenerationError, Cancelled) as e:
            with self._cond:
                self._alone_flight = 0
                if self._waiting and self._waiting[0] is job:
                    self._waiting.popleft()
            job._finish(e)
