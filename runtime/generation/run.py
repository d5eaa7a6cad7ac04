"""``generate_to_dir``: make a run's (or one shard's) missing images in an output folder; what ``ddpm-generate``
calls."""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import GenerationError, OutputError
from runtime.generation.output import MAX_IMAGES, OutputDir, shard_indices
from runtime.pipeline import Pipeline
from runtime.sampling.plan import SamplingPlan
from runtime.sampling.settings import RunSettings


@dataclass
class RunOptions:
    """Everything a ``ddpm-generate`` run is asked for. Run settings left None: see ``runtime.sampling.plan``."""

    n: int
    out: str | Path
    batch_size: int = 64
    seed: int = 0
    settings: RunSettings = RunSettings()
    classes: str | None = None
    model_defaults: bool = True
    shard: tuple[int, int] = (0, 1)
    formats: tuple[str, ...] = ("png",)
    grid: bool = False
    overwrite: bool = False
    fused: bool | None = None


@dataclass
class RunResult:
    made: int
    already: int
    plan: SamplingPlan
    seconds: float
    finalized: list[Path]
    pending: int = 0  # images of other shards not made yet; the run's last shard writes manifest.jsonl etc.
    where: str = ""  # how the run was spread, e.g. "on Ray: 2 tasks, 1 retried" (runtime.ray.shards)

    def summary(self, provider: str, o: RunOptions) -> str:
        rate = self.made / self.seconds if self.seconds > 0 else 0.0
        shard = f" (shard {o.shard[0]}/{o.shard[1]})" if o.shard[1] > 1 else ""
        kept = f", {self.already} already there" if self.already else ""
        waiting = ""
        if self.pending:
            asked = (("manifest.jsonl", True), ("samples.npz", "npz" in o.formats), ("grid.png", o.grid))
            final = [name for name, wanted in asked if wanted]
            waiting = (f"; {self.pending} images of other shards still to come (the last shard to finish writes "
                       f"{', '.join(final)})")
        where = f"; {self.where}" if self.where else ""
        return (f"{self.made} images in {self.seconds:.1f} s ({rate:.2f} images/s){kept}{shard}{where}; "
                f"provider {provider}; sampler {self.plan.sampler} {self.plan.steps} steps; {o.out}{waiting}")


def plan_for(g: Pipeline, o: RunOptions) -> SamplingPlan:
    """The run's plan; says on ``g.log`` which settings came from the model's recommendations."""
    plan = g.plan(o.settings, model_defaults=o.model_defaults)
    if plan.from_model:
        g.log(f"settings recommended by the model: {', '.join(plan.from_model)} -> {plan.describe()} "
              "(give them as options, or --no-model-defaults for the runtime's defaults)")
    return plan


def run_file(g: Pipeline, o: RunOptions, plan: SamplingPlan) -> dict:
    """What every image of the run depends on: the content of its folder's ``run.json``."""
    return {
        "model_sha256": g.sha256, "n": o.n, "seed": o.seed, **plan.run_settings(),
        "classes": None if o.classes is None else g.class_index(o.classes),  # "7", "Sneaker", "sneaker": one setting
        "image_shape": [g.contract.image_size, g.contract.image_size, g.contract.channels],
        **precision_field(g),
    }


def precision_field(g: Pipeline) -> dict:
    """``{"precision": ...}`` where the network computes in other than fp32 (bf16 and fp16 change the images); fp32,
    as in every folder from before precisions were recorded, is the absence of the field."""
    return {} if g.precision == "fp32" else {"precision": g.precision}


def check_run(g: Pipeline, o: RunOptions) -> SamplingPlan:
    """The run's plan, after checking its size, settings and classes; writes nothing."""
    if o.n > MAX_IMAGES:
        raise GenerationError(f"-n {o.n} is more than one output folder takes (at most {MAX_IMAGES}); "
                              "make the images in several runs (other --seed values, other --out folders)")
    plan = plan_for(g, o)
    g.labels([0], o.classes)  # validates --class before anything is written; labels are made batch by batch
    return plan


def open_output(g: Pipeline, o: RunOptions, plan: SamplingPlan) -> OutputDir:
    """The run's output folder (``run.json`` written or matched; ``--overwrite`` applied): a run's first write."""
    return OutputDir(o.out, run_file(g, o, plan), formats=o.formats, overwrite=o.overwrite)


def grid_columns(g: Pipeline, o: RunOptions) -> int:
    """grid.png's columns: one per class when classes cycle, else a square."""
    return (g.contract.num_classes if g.contract.conditional and o.classes is None
            else math.ceil(math.sqrt(min(o.n, 100))))


@contextmanager
def progress_bar(total: int, already: int, desc: str = "generating") -> Iterator[Callable[[float], None]]:
    """A progress bar on stderr over the ``total - already`` images to make; yields ``show(done)``, where ``done``
    counts the images done, those ``already`` there included (a fraction while a batch is in progress)."""
    from tqdm import tqdm

    bar = tqdm(total=total - already, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
               bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")
    with bar:
        yield lambda done: bar.update(done - already - bar.n)


@contextmanager
def _progress(report: Callable[[float], None] | None, already: int, total: int) -> Iterator[Callable[[float], None]]:
    """``show(done)``: ``report`` itself, or a progress bar."""
    if report is not None:
        yield report
        return
    with progress_bar(total, already) as show:
        yield show


def require_on_disk(records, indices) -> None:
    """``OutputError`` unless each of ``indices`` has its image on disk with its manifest record (``records``)."""
    lost = next((i for i in indices if i not in records), None)
    if lost is not None:
        raise OutputError(f"image {lost} is not on disk with its manifest record at the end of this run (removed "
                          "meanwhile?); rerun the same command to make it again")


def generate_to_dir(g: Pipeline, o: RunOptions, *, report: Callable[[float], None] | None = None,
                    finalize: bool = True) -> RunResult:
    """Generate the images of shard ``o.shard`` that ``o.out`` does not hold yet, then finalize if complete.

    Bookkeeping is per batch (labels, indices to make): beyond the records of the images already made, its
    memory does not grow with ``o.n``; one folder takes at most ``MAX_IMAGES`` images. Raises ``OutputError``
    rather than return while an image of this shard is unrecorded, so a run that returns has its part on disk,
    and the finished run's files when it completed the run; ``RunResult.pending`` counts the other shards' images.

    ``report(done)``, if given, replaces the progress bar: ``done`` counts this shard's finished images, those found
    on disk included (it is first called with that count), a fraction within a batch (by sampler steps), whole
    when a batch is on disk. ``finalize=False`` leaves manifest.jsonl, samples.npz and grid.png to the caller
    (``runtime.ray.shards`` writes them once, at the end).
    """
    plan = check_run(g, o)
    out = open_output(g, o, plan)
    mine = shard_indices(o.n, *o.shard)
    done = out.recorded()
    already = sum(1 for i in done if i in mine)
    todo = (i for i in mine if i not in done)
    manifest = out.root / f"manifest-{o.shard[0]}-of-{o.shard[1]}.jsonl"
    start = time.perf_counter()
    if already < len(mine):
        names = g.contract.class_names
        steps = g.progress_steps(plan)
        finished, steps_done = already, 0
        with _progress(report, already, len(mine)) as show:
            show(finished)

            def step_done(batch: int) -> None:  # exact fractions: b·k/steps is b at the last step, never more
                nonlocal steps_done
                steps_done += 1
                show(finished + batch * steps_done / steps)

            while chunk := list(itertools.islice(todo, o.batch_size)):
                try:
                    [(idx, y, images)] = g.generate_batches(chunk, plan, seed=o.seed, batch_size=len(chunk),
                                                            labels=g.labels(chunk, o.classes), progress=step_done,
                                                            fused=o.fused)
                except MemoryError:
                    raise GenerationError(f"out of memory for a batch of {len(chunk)} images; use a smaller "
                                          "--batch-size") from None
                records = [{
                    "index": i, "seed": o.seed, "class": None if y is None else int(y[k]),
                    "class_name": None if y is None or not names else names[int(y[k])],
                    **plan.manifest_fields(), "provider": g.provider, **precision_field(g), "model_sha256": g.sha256,
                } for k, i in enumerate(idx)]
                out.write_images(idx, images, records, manifest)
                finished, steps_done = finished + len(idx), 0
                show(finished)  # the same count, now that the batch is on disk
    seconds = time.perf_counter() - start
    records = out.recorded()
    if len(records) < o.n:  # never report success without this shard's part on disk
        require_on_disk(records, mine)
    finalized = out.finalize(g.contract.channels, o.grid, grid_columns(g, o), records) if finalize else []
    return RunResult(len(mine) - already, already, plan, seconds, finalized, pending=o.n - len(records))
