"""Continuous batching: one loop owns the model; every image in flight, from any request, advances one step per
predictor call, at its own timestep, with its own plan, class and guidance.

Each tick the loop stacks up to ``max_batch`` live images into one predictor call with per-image ``t`` and labels;
the guided images are doubled in the same call with the null class. Which images: a quarter of the slots (at least
one) to the oldest request, so that no request starves; the rest shortest remaining work first — the images of
the request with the fewest steps left to make (ties: the older request) —, so a short request overtakes a long
one at the next tick instead of waiting for it; an image that sits out a tick keeps its state
and goes on later, unchanged (its x and its solver state, the previous x̂₀ of a multistep sampler). Then every
image takes its own step with its own plan's coefficients (``runtime.sampling.step.step`` with per-image coefficient arrays),
its own guidance scale on this step (``runtime.sampling.samplers.guided_eps``; only images whose step is guided are doubled,
so a guidance interval halves their rows outside it) and its own noise stream (``runtime.sampling.noise``): an image comes
out as ``runtime.load(model).generate`` makes it, and one predictor call mixes images of any samplers. New requests join at the next tick; finished images leave at once.
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

from runtime.errors import GenerationError
from runtime.generation.images import to_uint8
from runtime.sampling.noise import NoiseStreams
from runtime.pipeline import Pipeline
from runtime.sampling.plan import NOISE_COLUMN, TABLE_COLUMNS, SamplingPlan
from runtime.sampling.samplers import guided_eps
from runtime.sampling.settings import RunSettings
from runtime.sampling.step import step

RECENT = 2048  # how many batch sizes and latencies stats() keeps (the metrics see every call: ``on_call``)


class QueueFull(RuntimeError):
    """More images waiting than ``queue_limit``: the caller should retry later (HTTP 429 with Retry-After)."""


class Cancelled(RuntimeError):
    """The request was cancelled (client gone, deadline passed, or the server stopping) before it finished."""


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

    def __init__(self, n: int, seed: int, start_index: int, plan: SamplingPlan, labels: np.ndarray | None) -> None:
        self.n, self.seed, self.plan, self.labels = n, seed, plan, labels
        self.indices = list(range(start_index, start_index + n))
        self.table = plan.coefs.table()  # (K, 8) float32: the same float32 values the offline loop multiplies by
        self.guidance = plan.coefs.guidance.astype(np.float32)  # (K,) w per step
        self.results: list[ImageResult | None] = [None] * n
        self.remaining = n
        self.cancelled = False
        self.submitted = time.monotonic()
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


class _Image:
    """One image in flight: its request, its step ``i`` (K−1 … 0, −1 when done), x, its solver state x0 (the last
    step's x̂₀, zeros before the first) and its noise stream."""

    def __init__(self, job: Job, k: int, shape: tuple[int, int, int]) -> None:
        coefs = job.plan.coefs
        self.job, self.k = job, k
        self.table = job.table
        self.timesteps = coefs.timesteps
        self.label = None if job.labels is None else int(job.labels[k])
        self.i = len(self.table) - 1
        draws = 1 + int(np.count_nonzero(coefs.noise_coef))
        self.noise = NoiseStreams(job.seed, [job.indices[k]], shape, draws=draws, threads=0)
        self.x = self.noise.next()[0]
        self.x0 = np.zeros_like(self.x)


class Scheduler:
    """The loop that owns the model; see the module docstring.

    ``submit(n, *, seed, start_index, classes, settings, **run_settings) -> Job`` (run settings: the fields of
    ``runtime.sampling.settings.RunSettings``) validates the settings with the pipeline's plan (``SettingsError``, one line; None takes the model's
    recommendation, as ``Pipeline.generate`` does) and raises ``QueueFull`` beyond ``queue_limit`` images waiting
    or in flight, ``Cancelled`` once stopping. ``max_batch``: images per predictor call (guided ones count once
    but make two rows); on a CPU a few dozen rows per call are fastest, a GPU wants thousands. ``stats()``: queue_depth, images_in_flight, images_done, requests_done, predictor_calls,
    batch_fill (rows per recent call), latencies (seconds of recent requests). ``on_call``: functions called with
    the rows of every predictor call (the metrics' batch-fill histogram), from the loop's thread.
    """

    def __init__(self, pipeline: Pipeline, *, max_batch: int = 256, queue_limit: int = 1024,
                 batching: bool = True) -> None:
        if max_batch < 1 or queue_limit < 1:
            raise ValueError("max_batch and queue_limit must be positive")
        self.pipeline, self.max_batch, self.queue_limit, self.batching = pipeline, max_batch, queue_limit, batching
        c = pipeline.contract
        self.shape = (c.channels, c.image_size, c.image_size)
        self._waiting: collections.deque[Job] = collections.deque()  # submitted, not yet turned into images
        self._pool: list[_Image] = []  # live images of admitted requests
        self._flight: list[_Image] = []  # the images of the current (or last) predictor call
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
        job = Job(n, seed, start_index, plan, self.pipeline.labels(indices, classes))
        with self._cond:
            if self._stopping:
                raise Cancelled("the server is stopping")
            if self._pending_images() + n > self.queue_limit:
                raise QueueFull(f"{self._pending_images()} images are queued or in flight (limit {self.queue_limit})")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def _pending_images(self) -> int:
        return sum(j.n for j in self._waiting) + len(self._pool)

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
            while (self._waiting or self._pool) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
            for job in [*self._waiting, *{im.job for im in self._pool}]:
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
                while not self._pool and not self._waiting:
                    if self._stopping:
                        return
                    self._cond.wait(timeout=0.5)
                    self._drop_cancelled()
                    if self.batching:
                        self._admit()
                job = None if self.batching else (self._waiting[0] if self._waiting else None)
            if self.batching:
                if self._pool:
                    self._tick()
            elif job is not None:
                self._run_alone(job)
            with self._cond:
                self._cond.notify_all()

    def _admit(self) -> None:
        """Waiting requests become live images (x_T drawn), to be picked by ``_select`` (called under the lock)."""
        while self._waiting:
            job = self._waiting.popleft()
            self._pool += [_Image(job, k, self.shape) for k in range(job.n)]

    def _select(self) -> list[_Image]:
        """Up to ``max_batch`` live images (called under the lock): the reserved slots (``max_batch // 4``, at least
        one from 2 on) to the oldest request's images, so that a long request is never starved by a stream of short
        ones; the rest shortest remaining work first."""
        if len(self._pool) <= self.max_batch:
            return list(self._pool)
        reserved = self.max_batch // 4 or min(1, self.max_batch - 1)
        oldest = sorted(self._pool, key=lambda im: (im.job.submitted, im.k))[:reserved]
        taken = set(map(id, oldest))
        left: dict[Job, int] = collections.Counter()
        for im in self._pool:
            left[im.job] += im.i + 1
        shortest = sorted((im for im in self._pool if id(im) not in taken),
                          key=lambda im: (left[im.job], im.job.submitted, im.k))
        return oldest + shortest[:self.max_batch - len(oldest)]

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave: their images stop, the caller gets ``Cancelled`` (called under the lock)."""
        gone = {j for j in self._waiting if j.cancelled} | {im.job for im in self._pool if im.job.cancelled}
        if not gone:
            return
        self._waiting = collections.deque(j for j in self._waiting if j not in gone)
        self._pool = [im for im in self._pool if im.job not in gone]
        self._flight = [im for im in self._flight if im.job not in gone]
        for job in gone:
            job._finish(Cancelled("the request was cancelled"))

    def _tick(self) -> None:
        """One predictor call for the selected images, then one step each."""
        with self._cond:
            self._flight = flight = self._select()
        contract = self.pipeline.contract
        x = np.stack([im.x for im in flight])
        t = np.array([im.timesteps[im.i] for im in flight], dtype=np.int64)
        w_all = np.array([im.job.guidance[im.i] for im in flight], dtype=np.float32)
        guided = [b for b in range(len(flight)) if w_all[b] != 1.0]
        xs, ts = np.concatenate([x, x[guided]]), np.concatenate([t, t[guided]])
        y = None
        if contract.conditional:
            y = np.array([im.label for im in flight] + [contract.null_class] * len(guided), dtype=np.int64)
        eps_all = self.pipeline.backend.predict_eps(xs, ts, y)
        eps = eps_all[:len(flight)].copy()
        if guided:
            w = w_all[guided].reshape(-1, 1, 1, 1)
            eps[guided] = guided_eps(eps_all[guided], eps_all[len(flight):], w)
        rows = np.stack([im.table[im.i] for im in flight])  # (B, 8) float32, TABLE_COLUMNS order
        coef = {name: rows[:, k].reshape(-1, 1, 1, 1) for k, name in enumerate(TABLE_COLUMNS)}
        z = np.zeros_like(x)
        for b, im in enumerate(flight):
            if rows[b, NOISE_COLUMN] != 0.0:
                z[b] = im.noise.next()[0]
        x_next, x0 = step(x, eps, np.stack([im.x0 for im in flight]), z, coef)
        self.predictor_calls += 1
        self.batch_fill.append(len(xs))
        for observe in self.on_call:
            observe(len(xs))
        self._advance(flight, x_next, x0)

    def _advance(self, flight: list[_Image], x_next: np.ndarray, x0: np.ndarray) -> None:
        finite = np.isfinite(x_next).reshape(len(flight), -1).all(axis=1)
        with self._cond:
            for b, im in enumerate(flight):
                job = im.job
                if job.done:
                    continue
                if not finite[b]:
                    K = len(im.table)
                    job._finish(GenerationError(
                        f"the model produced NaN or Inf at sampler step {K - im.i} of {K} "
                        f"(t = {int(im.timesteps[im.i])}) for image {job.indices[im.k]}; nothing was returned"))
                    job.cancel()
                    continue
                im.x, im.x0, im.i = x_next[b], x0[b], im.i - 1
                if im.i < 0:
                    job.results[im.k] = ImageResult(job.indices[im.k], job.seed, im.label, to_uint8(im.x[None])[0])
                    job.remaining -= 1
                    self.images_done += 1
                    if job.remaining == 0:
                        self._complete(job)
            self._pool = [im for im in self._pool if im.i >= 0 and not im.job.done]
            self._flight = [im for im in self._flight if im.i >= 0 and not im.job.done]
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
