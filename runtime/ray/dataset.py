"""``runtime.ray.images``: generated images as a Ray Data ``Dataset``, made by a pool of actors (one model each).

Rows are ``{"index": int64, "seed": int64, "class": int64 (None for an unconditional model), "image": (H, W, C)
uint8}``; row k equals ``runtime.load(model).generate(1, start_index=k, seed=seed, ...)[0]`` for the same run
settings (image k depends only on (seed, k) and the settings). Rows come in no particular order (Ray Data's); sort
by ``index`` where order matters. Chain it like any Dataset::

    ds = runtime.ray.images("fashion-mnist", 10_000, seed=0, sampler="ddim", steps=20, concurrency=4)
    ds.filter(lambda row: row["class"] == 7).write_images("out/", column="image", file_format="png")
"""

from __future__ import annotations

import os
import sys

import numpy as np

from runtime.bundled import resolve
from runtime.classes import Classes
from runtime.ray.cluster import driver_pipeline, join, require_ray
from runtime.sampling.settings import RunSettings

# Blocks of image indices (each at least one batch). The indices are made on the driver rather than by
# ray.data.range, whose read tasks wait for a free CPU that a pool holding every CPU never frees.
MAX_BLOCKS = 1000


class ImageMaker:
    """One actor of the pool: loads the model once, then turns batches of ``{"data": indices}`` into rows."""

    def __init__(self, model: str, load_options: dict, seed: int, classes: Classes, settings: RunSettings,
                 model_defaults: bool) -> None:
        from runtime.pipeline import load

        self.g = load(model, **load_options)
        self.plan = self.g.plan(settings, model_defaults=model_defaults)
        self.seed, self.classes = seed, classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices = [int(i) for i in batch["data"]]
        [(_, y, images)] = self.g.generate_batches(indices, self.plan, seed=self.seed, batch_size=len(indices),
                                                   labels=self.g.labels(indices, self.classes))
        return {"index": np.asarray(indices, dtype=np.int64), "seed": np.full(len(indices), self.seed, np.int64),
                "class": np.full(len(indices), None, dtype=object) if y is None else y.astype(np.int64),
                "image": images}


def images(model: str | os.PathLike, n: int, *, seed: int = 0, classes: Classes = None, batch_size: int = 64,
           concurrency: int | tuple[int, int] = 1, num_cpus: float | None = None, num_gpus: float | None = None,
           provider: str = "auto", dtype: str | None = None, threads: int | None = None, model_defaults: bool = True,
           address: str = "", **run_settings):
    """A ``ray.data.Dataset`` of images 0 … n−1 of the run (``seed``, ``classes``, run settings as for
    ``runtime.load(model).generate``: ``sampler=``, ``steps=``, ``guidance=``, …).

    The images are made lazily, when the dataset is consumed, by ``concurrency`` actors (an int, or (min, max) for
    an autoscaling pool), each with ``num_cpus``/``num_gpus`` and its own model session (``provider`` and ``dtype``
    as for ``runtime.load``; ``threads`` defaults to the actor's CPUs). ``batch_size`` images per predictor call. The
    model file must be at the same path on every node. The settings and classes are checked here, so a bad one fails
    at once.

    A process already connected to Ray (its own ``ray.init``) keeps its connection; otherwise this joins the cluster
    at ``address`` as ``ddpm-generate --ray ADDRESS`` does (``""``: a running one, else a new local one; a recorded
    cluster that is gone counts as none), with the same one-line ``ClusterError`` for one that cannot be joined.
    """
    ray = require_ray("runtime.ray.images")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    path, _ = resolve(os.fspath(model))
    path = path.resolve()
    settings = RunSettings(**run_settings)
    checker = driver_pipeline(path, lambda msg: print(msg, file=sys.stderr), provider, dtype)
    checker.plan(settings, model_defaults=model_defaults)
    checker.labels([0], classes)
    join(address, lambda msg: print(msg, file=sys.stderr), "runtime.ray.images")
    load_options = {"provider": provider, "dtype": dtype, "threads": threads or max(1, int(num_cpus or 1))}
    rows = max(batch_size, -(-n // MAX_BLOCKS))
    source = ray.data.from_numpy([np.arange(i, min(i + rows, n), dtype=np.int64) for i in range(0, n, rows)])
    low, high = concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)
    pool = ray.data.ActorPoolStrategy(min_size=low, max_size=high)  # Ray ≥ 2.51 deprecates map_batches(concurrency=)
    return source.map_batches(
        ImageMaker, batch_size=batch_size, batch_format="numpy", compute=pool, num_cpus=num_cpus, num_gpus=num_gpus,
        fn_constructor_kwargs=dict(model=str(path), load_options=load_options, seed=seed, classes=classes,
                                   settings=settings, model_defaults=model_defaults))
