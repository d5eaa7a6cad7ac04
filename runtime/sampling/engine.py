"""The batch engine: the images in flight and the one thing that advances them, one predictor call at a time.

An ``Engine`` holds, for every image: x, its history (the last H values of its sampler's state d, newest first), its
noise source, its row in its run's step table, its label and, through the table, its guidance. Its arrays live where
its ``Ops`` put them (numpy on the host, torch tensors on a device, onnxruntime values for the fused step). ``tick``
makes one predictor call for the images it is given and one step for each; in that one place it does guided batching
(a null-class row only for the images whose step is guided), the step (``runtime.sampling.step``, or the fused ONNX
graph that computes the same for a batch on one row), the NaN check and the finish (float → uint8).

Its callers only choose which images advance: ``runtime.pipeline.Pipeline.generate_batches`` (a batch of one run, all
on one row: the host, the torch device and the fused ONNX path), the server's continuous batching
(``serve.scheduler``: images of many requests at different rows of different samplers) and ``sample`` below (one
batch of arrays through a plan's table, for training grids and export's checks).

A tick whose images all share a table and a row multiplies by that row's Python floats, so float32 stays float32 and a
zero coefficient leaves its term out; a mixed tick multiplies by per-image float32 arrays (B, 1, 1, 1). The two give
the same float32 values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.sampling.finish import to_uint8
from runtime.sampling.step import step
from runtime.sampling.table import COLUMNS, StepCoefficients

Array = Any  # numpy.ndarray, torch.Tensor or onnxruntime.OrtValue
Net = Callable[[Array, Array, Array | None], Array]  # (x (B,C,H,W), t (B,) int64, y (B,) int64 | None) -> output
FINITE_CHECK_EVERY = 25  # off the host, x is checked for NaN every this many steps (and at the last)


def _put(a: np.ndarray, rows: list[int], values: np.ndarray) -> None:
    a[rows] = values


@dataclass(frozen=True)
class Ops:
    """How an engine makes and moves arrays of one kind. ``on_host``: x can be checked on every step for free."""

    concat: Callable[[list], Array] = np.concatenate
    take: Callable[[Array, list[int]], Array] = lambda a, rows: a[rows]
    put: Callable[[Array, list[int], Array], None] = _put
    ints: Callable[[Sequence[int]], Array] = lambda values: np.asarray(values, dtype=np.int64)
    floats: Callable[[np.ndarray], Array] = lambda a: a  # float32 coefficient arrays (B, 1, 1, 1)
    upload: Callable[[Any], Array] = lambda a: a
    download: Callable[[Array], np.ndarray] = np.asarray
    zeros_like: Callable[[Array], Array] = np.zeros_like
    context: Callable[[], Any] = contextlib.nullcontext
    on_host: bool = True


NUMPY = Ops()


def guided_eps(eps_cond: Array, eps_uncond: Array, guidance: Any) -> Array:
    """Classifier-free guidance (Ho & Salimans 2022): ε = ε_uncond + w·(ε_cond − ε_uncond)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@dataclass(eq=False)
class Image:
    """One image in flight: its run's table ``coefs``, the row ``i`` of its next step (K−1 … 0), its label, its noise
    source and its row there, its image index (for messages) and what the caller tracks it by (``owner``).

    A noise source is anything with ``next() -> (B, C, H, W)``, row b for its image b
    (``runtime.sampling.noise.NoiseStreams``); the images that share one always step together."""

    coefs: StepCoefficients
    i: int
    label: int | None
    noise: Any
    row: int
    index: int
    owner: Any = None

    def failure(self) -> str:
        K = len(self.coefs.timesteps)
        return (f"the model produced NaN or Inf at sampler step {K - self.i} of {K} "
                f"(t = {int(self.coefs.timesteps[self.i])})")


@dataclass
class Tick:
    """What a tick ended: ``finished`` images and their finished arrays ``out`` (rows in that order), and the
    ``failed`` images with why (``Image.failure``); both have left the engine."""

    finished: list[Image] = field(default_factory=list)
    out: Any = None
    failed: list[tuple[Image, str]] = field(default_factory=list)
    rows: int = 0  # rows of the predictor call (a guided image counts twice)


class Engine:
    """Images in flight (see the module docstring).

    ``net(x, t, y)`` is the network on ``ops`` arrays; ``null_class`` its null label (guidance needs one);
    ``fused(x, history, t, w, z, row, y) -> (x_next, d)`` runs a whole step for a batch on one row (the fused ONNX
    graph); ``finish`` turns finished x (an ``ops`` array) into the result (default: uint8 (B, H, W, C) on the host).
    """

    def __init__(self, net: Net | None, ops: Ops = NUMPY, *, null_class: int | None = None,
                 fused: Callable[..., tuple[Array, Array]] | None = None,
                 finish: Callable[[Array], Any] | None = None) -> None:
        self.net, self.ops, self.null_class, self.fused = net, ops, null_class, fused
        self.finish = finish or (lambda x: to_uint8(ops.download(x)))
        self.images: list[Image] = []
        self.x: Array = None  # (N, C, H, W)
        self.history: list[Array] = []  # H arrays (N, C, H, W), newest first; H the most any image needs
        self.labels: Array = None  # (N,) int64, None for an unconditional model
        self._rows = 0

    def __len__(self) -> int:
        return len(self.images)

    # -- images in and out -------------------------------------------------------------------------------------
    def add(self, coefs: StepCoefficients, indices: Sequence[int], noise: Any, labels: Sequence[int] | None = None,
            owner: Any = None) -> list[Image]:
        """Images ``indices`` of a run with table ``coefs``, their x_T the next draw of ``noise``: one source for all
        of them (row b for image b), or a list of one source each."""
        ops = self.ops
        if isinstance(noise, list):
            x = ops.upload(np.concatenate([source.next() for source in noise]))
            sources = [(source, 0) for source in noise]
        else:
            x = ops.upload(noise.next())
            sources = [(noise, b) for b in range(len(indices))]
        new = [Image(coefs, len(coefs.timesteps) - 1, None if labels is None else int(labels[b]), *sources[b], int(k),
                     owner) for b, k in enumerate(indices)]
        y = None if labels is None else ops.ints([int(v) for v in labels])
        if not self.images:
            self.x, self.labels = x, y
            self.history = [ops.zeros_like(x) for _ in range(coefs.slots)]
        else:
            self.history += [ops.zeros_like(self.x) for _ in range(coefs.slots - len(self.history))]
            self.history = [ops.concat([h, ops.zeros_like(x)]) for h in self.history]
            self.x = ops.concat([self.x, x])
            self.labels = None if y is None else ops.concat([self.labels, y])
        self.images += new
        return new

    def remove(self, positions: Sequence[int]) -> None:
        """Drop the images at ``positions`` (cancelled ones)."""
        gone = set(positions)
        keep = [p for p in range(len(self.images)) if p not in gone]
        if len(keep) == len(self.images):
            return
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self.images, self.x, self.history, self.labels = [], None, [], None
            return
        ops = self.ops
        self.images = [self.images[p] for p in keep]
        slots = max(im.coefs.slots for im in self.images)
        self.x = ops.take(self.x, keep)
        self.history = [ops.take(h, keep) for h in self.history[:slots]]
        self.labels = None if self.labels is None else ops.take(self.labels, keep)

    # -- one predictor call ------------------------------------------------------------------------------------
    def tick(self, positions: Sequence[int] | None = None) -> Tick:
        """One predictor call for the images at ``positions`` (None: all), then one step each (see ``Tick``)."""
        with self.ops.context():  # torch: inference mode, also for the in-place writes back
            return self._tick(positions)

    def _tick(self, positions: Sequence[int] | None) -> Tick:
        ops, n = self.ops, len(self.images)
        sel = list(range(n)) if positions is None else list(positions)
        every = sel == list(range(n))
        ims = [self.images[p] for p in sel]
        H = max(im.coefs.slots for im in ims)
        x = self.x if every else ops.take(self.x, sel)
        history = self.history[:H] if every else [ops.take(h, sel) for h in self.history[:H]]
        y = None if self.labels is None else (self.labels if every else ops.take(self.labels, sel))
        first = ims[0]
        uniform = all(im.coefs is first.coefs and im.i == first.i for im in ims)
        if uniform:
            x_next, d = self._uniform(ims, x, history, y)
        else:
            x_next, d = self._mixed(ims, x, history, y, H)
        if every:
            self.x = x_next
            if H:
                self.history = [d, *self.history[:H - 1]]
        else:
            ops.put(self.x, sel, x_next)
            for j in range(H - 1, 0, -1):
                ops.put(self.history[j], sel, history[j - 1])
            if H:
                ops.put(self.history[0], sel, d)
        result = self._settle(sel, ims, x_next, check=ops.on_host or not uniform or first.i % FINITE_CHECK_EVERY == 0)
        result.rows = self._rows
        return result

    def _uniform(self, ims: list[Image], x, history, y):
        """Every image on one row of one table: that row's Python floats (or the fused graph)."""
        coefs, i = ims[0].coefs, ims[0].i
        z = self._draw(ims) if coefs.noisy[i] else None
        t, w = int(coefs.timesteps[i]), float(coefs.guidance[i])
        if self.fused is not None:
            self._rows = len(ims) * (1 + (w != 1.0 and y is not None))
            return self.fused(x, history, t, w, z, coefs.f32[i], y)
        eps = self._predict(x, [t] * len(ims), y, [w] * len(ims), w)
        return step(x, eps, history, z, coefs.rows[i])

    def _mixed(self, ims: list[Image], x, history, y, H: int):
        """Images at different rows: per-image float32 coefficient arrays."""
        if self.fused is not None:
            raise ValueError("the fused step graph runs batches whose images share a row")
        ops, B = self.ops, len(ims)
        rows = np.zeros((B, len(COLUMNS) + H), dtype=np.float32)
        for b, im in enumerate(ims):
            row = im.coefs.f32[im.i]
            rows[b, :len(row)] = row
        c: dict[str, Any] = {name: ops.floats(rows[:, k].reshape(-1, 1, 1, 1)) for k, name in enumerate(COLUMNS)}
        c["history"] = [ops.floats(rows[:, len(COLUMNS) + j].reshape(-1, 1, 1, 1)) for j in range(H)]
        t = [int(im.coefs.timesteps[im.i]) for im in ims]
        w = [float(im.coefs.guidance[im.i]) for im in ims]
        noisy = [im.coefs.noisy[im.i] for im in ims]
        z = self._draw(ims, noisy) if any(noisy) else None
        return step(x, self._predict(x, t, y, w), history, z, c)

    def _predict(self, x, t: list[int], y, w: list[float], scale: float | None = None):
        """The network's output with classifier-free guidance where w ≠ 1: the guided images are doubled with the
        null class in the same call. ``scale``: the one w of a uniform batch (a Python float)."""
        ops, B = self.ops, len(t)
        guided = [] if y is None else [b for b in range(B) if w[b] != 1.0]
        self._rows = B + len(guided)
        if not guided:
            return self.net(x, ops.ints(t), y)
        null = ops.ints([self.null_class] * len(guided))
        if len(guided) == B:
            out = self.net(ops.concat([x, x]), ops.ints(t + t), ops.concat([y, null]))
            scale = scale if scale is not None else ops.floats(np.asarray(w, np.float32).reshape(-1, 1, 1, 1))
            return guided_eps(out[:B], out[B:], scale)
        out = self.net(ops.concat([x, ops.take(x, guided)]), ops.ints(t + [t[b] for b in guided]),
                       ops.concat([y, null]))
        eps = ops.take(out, list(range(B)))
        scales = ops.floats(np.asarray([w[b] for b in guided], np.float32).reshape(-1, 1, 1, 1))
        ops.put(eps, guided, guided_eps(ops.take(out, guided), out[B:], scales))
        return eps

    def _draw(self, ims: list[Image], need: list[bool] | None = None):
        """z for ``ims`` (zeros where ``need`` is False): one ``next()`` of each noise source, its rows scattered."""
        sources: dict[int, tuple[Any, list[tuple[int, int]]]] = {}
        for b, im in enumerate(ims):
            if need is None or need[b]:
                sources.setdefault(id(im.noise), (im.noise, []))[1].append((b, im.row))
        if len(sources) == 1:
            noise, pairs = next(iter(sources.values()))
            if [b for b, _ in pairs] == [row for _, row in pairs] == list(range(len(ims))):
                return self.ops.upload(noise.next())  # one batch on its own source, in order
        draws = {key: noise.next() for key, (noise, _) in sources.items()}
        shape = next(iter(draws.values())).shape[1:]
        z = np.zeros((len(ims), *shape), dtype=np.float32)
        for key, (_, pairs) in sources.items():
            for b, row in pairs:
                z[b] = draws[key][row]
        return self.ops.upload(z)

    def _settle(self, sel: list[int], ims: list[Image], x_next, *, check: bool) -> Tick:
        """The NaN check, the step count, the finish; the images that ended leave."""
        result = Tick()
        bad = set()
        if check:
            host = self.ops.download(x_next)
            finite = np.isfinite(host.reshape(len(ims), -1)).all(axis=1)
            bad = {b for b in range(len(ims)) if not finite[b]}
            result.failed = [(ims[b], ims[b].failure()) for b in sorted(bad)]
        done = [b for b, im in enumerate(ims) if im.i == 0 and b not in bad]
        for im in ims:
            im.i -= 1
        if done:
            result.finished = [ims[b] for b in done]
            rows = x_next if len(done) == len(ims) else self.ops.take(x_next, done)
            result.out = self.finish(rows)
        if bad or done:
            leaving = {sel[b] for b in bad} | {sel[b] for b in done}
            self._keep([p for p in range(len(self.images)) if p not in leaving])
        return result


class _Calls:
    """``sample``'s x_T and ``noise(i)`` as a noise source: x_T, then ``noise(i)`` for the noisy steps in loop order."""

    def __init__(self, x_T, noise: Callable[[int], Any], coefs: StepCoefficients) -> None:
        self._first, self._noise = x_T, noise
        self._steps = iter([i for i in reversed(range(len(coefs.timesteps))) if coefs.noisy[i]])

    def next(self):
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return self._noise(next(self._steps))


def sample(net: Net, x_T: Array, coefs: StepCoefficients, noise: Callable[[int], Array], *,
           labels: Sequence[int] | None = None, null_class: int | None = None, ops: Ops = NUMPY,
           on_step: Callable[[int, Any], None] | None = None) -> Array:
    """x_T (B, C, H, W) through every step of ``coefs`` with ``net(x, t, y)`` -> x_0, not finished (float, as x_T).

    ``noise(i)`` is called exactly for the steps with noise_coef ≠ 0, in loop order (i = K−1 … 0). ``labels``: the
    images' classes (with ``null_class`` where some step is guided). ``on_step(i, x)`` sees each new x (an ``ops``
    array); what it raises ends the run. Raises ``GenerationError`` on NaN.
    """
    from runtime.errors import GenerationError

    engine = Engine(net, ops, null_class=null_class, finish=lambda x: x)
    engine.add(coefs, range(len(x_T)), _Calls(x_T, noise, coefs), labels)
    while True:
        i = engine.images[0].i
        tick = engine.tick()
        if tick.failed:
            raise GenerationError(tick.failed[0][1])
        if on_step is not None:
            on_step(i, engine.x if tick.out is None else tick.out)
        if tick.out is not None:
            return tick.out
