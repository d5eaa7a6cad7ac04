"""Noise that depends only on (seed, image index): one independent N(0, I) stream per image.

Image k's x_T and every later noise draw come from its own Philox generator keyed by ``SeedSequence([seed, k])``,
so image k is the same whether it is made alone, in a batch of 256, or in another shard or process.

``NoiseStreams`` draws a batch's streams ahead of use, on a small pool of threads (NumPy releases the GIL while it
fills an array), several draws per image per NumPy call. This gives the same values as one call per draw: a bulk
``standard_normal((k, *shape), dtype=float32)`` equals k successive draws of ``shape`` bit for bit, also for odd
sizes, because the 32-bit half left over from a 64-bit Philox output is kept in the generator's state
(``has_uint32``/``uinteger``) between calls; ``tests/runtime/test_noise.py`` checks it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

CALL_ELEMENTS = 4096  # values per image per NumPy call to aim for (several steps at once): fewer GIL-held calls
PART_ELEMENTS = 1 << 16  # fewest values per thread task: smaller blocks are not worth a hand-off
MAX_CHUNK_BYTES = 64 << 20  # at most this much noise drawn ahead in one block


def image_generator(seed: int, index: int) -> np.random.Generator:
    """The random stream of image ``index`` under ``seed`` (both non-negative integers)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and image index must be non-negative, got {seed}, {index}")
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, index])))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chunk_sizes(draws: int | None, most: int) -> Iterator[int]:
    """Draws per block: 1 (x_T), then 1, 2, 4, … up to ``most``, ``draws`` in all (None: without end).

    Small blocks first, so that the first steps do not wait for a large block."""
    done, size = 0, 1
    while draws is None or done < draws:
        n = size if draws is None else min(size, draws - done)
        yield n
        done += n
        if done > 1:
            size = min(2 * size, most)


def fill(generators: Sequence[np.random.Generator], out: np.ndarray, lo: int, hi: int) -> None:
    """The next k draws of images lo … hi−1 into ``out[:, lo:hi]`` (out: (k, B, C, H, W) float32), one NumPy call
    per image."""
    k = out.shape[0]
    scratch = np.empty((k, *out.shape[2:]), dtype=np.float32) if k > 1 else None
    for b in range(lo, hi):
        target = out[:, b]  # contiguous only for k = 1
        generators[b].standard_normal(target.shape, dtype=np.float32, out=target if scratch is None else scratch)
        if scratch is not None:
            target[...] = scratch


class NoiseStreams:
    """Draws (B, C, H, W) float32 standard normals, row b from image ``indices[b]``'s own stream.

    ``draws``: how many times ``next`` will be called (x_T included), so that nothing is drawn that is not used;
    one call more raises RuntimeError. None: no limit (up to one block is drawn in vain at the end).
    ``threads``: threads that draw the next block while the caller works on this one (default: the usable CPUs;
    0, or a block of fewer than ``PART_ELEMENTS`` values: draw in the calling thread, when asked). Use as a context
    manager, or call ``close``, to stop the threads; they also stop when the object is garbage-collected. One consumer:
    ``next`` is not for concurrent callers.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: tuple[int, int, int], *, draws: int | None = None,
                 threads: int | None = None) -> None:
        if draws is not None and draws < 0:
            raise ValueError(f"draws must be non-negative, got {draws}")
        self.shape, self.draws = tuple(shape), draws
        self._generators = [image_generator(seed, int(k)) for k in indices]
        batch, size = len(self._generators), int(np.prod(self.shape))
        most = max(1, min(CALL_ELEMENTS // size, MAX_CHUNK_BYTES // (4 * size * max(batch, 1))))
        self._sizes = chunk_sizes(draws, most)
        threads = usable_cpus() if threads is None else threads
        parts = max(1, min(threads, batch, batch * size * most // PART_ELEMENTS))
        self._bounds = np.linspace(0, batch, parts + 1).astype(int).tolist()
        # A block smaller than one task's worth is drawn in the calling thread: a hand-off would cost more.
        worth_a_thread = threads > 0 and batch * size * most >= PART_ELEMENTS
        self._pool = ThreadPoolExecutor(parts, thread_name_prefix="noise") if worth_a_thread else None
        if self._pool is not None:  # the pool's tasks hold no reference to self, so self can be collected
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        self._block: np.ndarray | None = None  # (k, B, C, H, W): the block being handed out
        self._used = 0  # draws of _block handed out
        self._closed = False
        self._pending = self._start()

    def _start(self) -> tuple[np.ndarray, list[Future] | None] | None:
        """Begin the next block: (its array, the futures filling it; None: to be filled by ``next``) or None."""
        k = next(self._sizes, None)
        if k is None:
            return None
        out = np.empty((k, len(self._generators), *self.shape), dtype=np.float32)
        if self._pool is None:
            return out, None
        return out, [self._pool.submit(fill, self._generators, out, lo, hi)
                     for lo, hi in zip(self._bounds[:-1], self._bounds[1:])]

    def next(self) -> np.ndarray:
        """The next draw of every image's stream: (B, *shape) float32, C-contiguous, the caller's to keep."""
        if self._closed:
            raise RuntimeError("these noise streams are closed")
        if self._block is None or self._used == len(self._block):
            if self._pending is None:
                raise RuntimeError(f"all {self.draws} declared draws were made")
            out, futures = self._pending
            if futures is None:
                fill(self._generators, out, 0, len(self._generators))
            for f in futures or ():
                f.result()  # re-raises a worker's error
            self._block, self._used = out, 0
            self._pending = self._start()  # drawn while the caller uses this block
        self._used += 1
        return self._block[self._used - 1]

    def close(self) -> None:
        """Stop drawing ahead and wait for the threads to end (a block in flight is finished). Idempotent."""
        self._closed = True
        self._pending = self._block = None
        if self._pool is not None:
            self._finalizer.detach()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> NoiseStreams:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
