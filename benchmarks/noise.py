"""``python -m benchmarks.noise``: image-steps/s of ``NoiseStreams.next()``, one NumPy call per image per step
(the first implementation, kept here as ``PerImageStreams``) against the threaded block draws of
``runtime.sampling.noise``.

Per batch size: 1 warm-up, then the median, min and max of ``--repeats`` runs of ``--steps`` draws. Only the
``next()`` calls are timed; making the batch's generators (``SeedSequence`` per image, the same for both) is
reported apart. ``--consumer-ms`` sleeps that long after each draw, a stand-in for a predictor that releases the
GIL, to show how much of the noise the prefetch hides. Prints a table; ``--out FILE`` also writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import click
import numpy as np

from runtime.sampling.noise import NoiseStreams, image_generator, usable_cpus


class PerImageStreams:
    """The reference: ``NoiseStreams`` as first written (one ``standard_normal`` call per image per draw)."""

    def __init__(self, seed: int, indices, shape: tuple[int, int, int], **_) -> None:
        self.shape = tuple(shape)
        self._generators = [image_generator(seed, int(k)) for k in indices]

    def next(self) -> np.ndarray:
        out = np.empty((len(self._generators), *self.shape), dtype=np.float32)
        for row, g in zip(out, self._generators):
            g.standard_normal(self.shape, dtype=np.float32, out=row)
        return out

    def close(self) -> None:
        pass


def run_once(make, batch: int, shape, steps: int, consumer_s: float) -> tuple[float, float]:
    """(seconds to make the streams, seconds for ``steps`` calls of ``next()``)."""
    start = time.perf_counter()
    streams = make(0, range(batch), shape, draws=steps)
    made = time.perf_counter()
    try:
        for _ in range(steps):
            streams.next()
            if consumer_s:
                time.sleep(consumer_s)
        done = time.perf_counter()
    finally:
        streams.close()
    return made - start, done - made - steps * consumer_s


def measure(make, batch: int, shape, steps: int, repeats: int, consumer_s: float) -> dict:
    run_once(make, batch, shape, steps, consumer_s)  # warm-up
    runs = [run_once(make, batch, shape, steps, consumer_s) for _ in range(repeats)]
    rates = [batch * steps / t for _, t in runs]
    return {"img_steps_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "ms_per_step": 1e3 * statistics.median(t for _, t in runs) / steps,
            "make_ms": 1e3 * statistics.median(m for m, _ in runs)}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@click.command()
@click.option("--batch-sizes", default="64,512,2048", show_default=True)
@click.option("--steps", default=50, show_default=True, help="draws per run")
@click.option("--repeats", default=5, show_default=True)
@click.option("--shape", default="1,32,32", show_default=True, help="C,H,W (the bundled model's)")
@click.option("--threads", default=None, type=int, help="NoiseStreams threads (default: the usable CPUs)")
@click.option("--consumer-ms", default=0.0, show_default=True, help="sleep after each draw (a stand-in predictor)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write JSON here")
def main(batch_sizes: str, steps: int, repeats: int, shape: str, threads: int | None, consumer_ms: float,
         out: Path | None) -> None:
    chw = tuple(int(v) for v in shape.split(","))
    threads = usable_cpus() if threads is None else threads
    variants = {"per-image (old)": PerImageStreams,
                f"blocks, {threads} threads": lambda *a, **k: NoiseStreams(*a, threads=threads, **k)}
    machine = {"cpu": cpu_name(), "usable_cpus": usable_cpus(), "python": platform.python_version(),
               "numpy": np.__version__, "load_avg": os.getloadavg()}
    rows = []
    for batch in (int(b) for b in batch_sizes.split(",")):
        for name, make in variants.items():
            rows.append({"variant": name, "batch_size": batch,
                         **measure(make, batch, chw, steps, repeats, consumer_ms / 1e3)})
    machine["load_avg_after"] = os.getloadavg()
    print(f"# noise: shape {chw}, {steps} steps, median of {repeats} (min–max)"
          + (f"; a {consumer_ms} ms consumer after each draw, not counted: the noise time it does not hide"
             if consumer_ms else ""))
    print(f"# {machine}")
    print(f"{'batch':>6}  {'variant':<22} {'img-steps/s':>12} {'min–max':>17} {'ms/step':>8} {'make ms':>8}")
    for r in rows:
        print(f"{r['batch_size']:>6}  {r['variant']:<22} {r['img_steps_per_s']:>12,.0f} "
              f"{r['min']:>8,.0f}–{r['max']:<8,.0f} {r['ms_per_step']:>8.2f} {r['make_ms']:>8.1f}")
    if out is not None:
        out.write_text(json.dumps({"machine": machine, "shape": chw, "steps": steps, "repeats": repeats,
                                   "consumer_ms": consumer_ms, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
