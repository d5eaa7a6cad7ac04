"""``ddpm-generate --ray``: one run's shards as Ray tasks, each the resumable shard writer into the shared ``--out``.

The driver checks the settings and writes ``run.json`` (``open_output``, which applies ``--overwrite`` once), then
starts one task per worker: task i runs ``generate_to_dir`` on shard i of K (contiguous index blocks,
``shard_indices``), so a task that Ray retries after its worker died makes only what its shard misses, and an
interrupted run is resumed by running the same command again. When every task is done the driver writes
manifest.jsonl, samples.npz and grid.png once. The images equal a one-process run's: image k depends only on
(seed, k) and the settings.

Progress: each task tells a small actor (``Progress``) how many images of its shard are done (on disk, plus the
batch in progress by sampler steps); the driver draws one bar from the sum. Tasks' log lines go through the
actor too and are printed once. ``--out`` and the model file must be at the same path on every node (a shared
file system; the bundled model is inside the installed package).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ClusterError, GenerationError, ModelError, OutputError, reason
from runtime.generation.output import shard_indices
from runtime.generation.run import (
    RunOptions,
    RunResult,
    check_run,
    generate_to_dir,
    grid_columns,
    open_output,
    progress_bar,
    require_on_disk,
)
from runtime.pipeline import load
from runtime.ray.cluster import ClusterGone, Worker, check_fits, connected, driver_pipeline, head_answers, require_ray

REPORT_EVERY_S = 0.2  # a task's progress messages to the actor, at most this often (and at each batch's end)
POLL_S = 0.2  # how often the driver redraws the bar
HEAD_CHECK_S = 5.0  # how often the driver checks that the cluster's head is still there


@dataclass(frozen=True)
class RayRun:
    """How a run is spread over a Ray cluster (the ``--ray`` options of ``ddpm-generate``)."""

    address: str = ""  # see runtime.ray.cluster
    workers: int | None = None  # None: as many as the cluster holds, at most one per image
    worker: Worker = Worker()
    retries: int = 3  # per task, after its worker died (Ray's max_retries)


class Progress:
    """The run's progress, held by a Ray actor: images done per shard, task starts per shard, log lines."""

    def __init__(self, on_disk: dict[int, int]) -> None:
        self.done: dict[int, float] = dict(on_disk)
        self.starts: dict[int, int] = {}
        self.logs: list[str] = []

    def started(self, shard: int) -> None:
        self.starts[shard] = self.starts.get(shard, 0) + 1

    def report(self, shard: int, done: float) -> None:
        self.done[shard] = done  # a retried task reports again from what its shard has on disk

    def log(self, message: str) -> None:
        self.logs.append(message)

    def snapshot(self, logs_from: int) -> tuple[float, int, list[str]]:
        """(images done in all shards, tasks retried so far, log lines from index ``logs_from`` on)."""
        return sum(self.done.values()), sum(k - 1 for k in self.starts.values()), self.logs[logs_from:]


def generate_shard(model: str, load_options: dict, o: RunOptions, progress) -> dict:
    """A Ray task: the missing images of shard ``o.shard`` into ``o.out``; leaves the run's final files to the
    driver."""
    import ray

    entered = time.time()
    ray.get(progress.started.remote(o.shard[0]))  # waited for: a worker killed later is sure to count as retried
    g = load(model, log=progress.log.remote, **load_options)
    loaded = time.time()
    last = 0.0

    def report(done: float) -> None:
        nonlocal last
        now = time.perf_counter()
        if done == int(done) or now - last >= REPORT_EVERY_S:  # every whole count: the bar never lags a batch
            last = now
            progress.report.remote(o.shard[0], done)

    result = generate_to_dir(g, o, report=report, finalize=False)
    return {"made": result.made, "entered": entered, "load_s": loaded - entered, "generate_s": result.seconds,
            "provider": g.runs_on}


def _workers(ray, run: RayRun, n: int) -> int:
    if run.workers is not None:
        return run.workers
    resources = ray.cluster_resources()
    fit = math.floor(resources.get("CPU", 0.0) / run.worker.cpus) if run.worker.cpus else n
    if run.worker.gpus:
        fit = min(fit, math.floor(resources.get("GPU", 0.0) / run.worker.gpus))
    return max(1, min(fit, n))


def _outcome(ray, ref, shard: int, shards: int, retries: int) -> dict:
    """A finished task's result, or its failure as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the task raised: the same error a one-process run gives
        cause = getattr(e, "cause", None)
        if isinstance(cause, (GenerationError, OutputError, ModelError)):
            raise cause from None
        raise GenerationError(f"shard {shard} of {shards} failed: {reason(cause or e)}") from None
    except ray.exceptions.RayError as e:  # its worker (or node) died more often than it may be retried
        raise ClusterError(f"shard {shard} of {shards} failed after {retries} retries: {reason(e)}; rerun the "
                           "same command to make the missing images") from None


def _gather(ray, refs: dict, progress, show: Callable[[float], None], log: Callable[[str], None], shards: int,
            retries: int, owned: bool) -> tuple[list[dict], int]:
    """Wait for every task, showing progress and the tasks' log lines; returns their results and how many were
    retried. On an error or Ctrl-C the other tasks are stopped (what they wrote stays, for the next run): by the
    end of the connection when this run ``owned`` it (Ray ends a driver's tasks when it leaves), else cancelled.
    Cancelling only when needed: cancelling a task as it finishes can abort the driver (a race in Ray's core,
    ray-project/ray#54798, seen with Ray 2.60 on Ctrl-C)."""
    pending, results, logs_from = list(refs), [], 0
    checked = time.monotonic()
    try:
        while True:
            try:
                ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S) if pending else ([], [])
                results += [_outcome(ray, r, refs[r], shards, retries) for r in ready]
                done, retried, lines = ray.get(progress.snapshot.remote(logs_from), timeout=HEAD_CHECK_S)
            except ray.exceptions.GetTimeoutError:  # a slow answer from a live cluster is no failure
                if head_answers(ray):
                    continue
                raise ClusterGone(ray) from None
            except (ray.exceptions.RayError, ClusterError) as e:  # a failure, or the cluster's own end
                if isinstance(e, ray.exceptions.RayTaskError) or head_answers(ray):
                    raise
                raise ClusterGone(ray) from None
            logs_from += len(lines)
            for line in lines:
                log(line)
            show(done)
            if not pending:
                return results, retried
            if time.monotonic() - checked > HEAD_CHECK_S:  # a head that vanished without failing a call
                checked = time.monotonic()
                if not head_answers(ray):
                    raise ClusterGone(ray)
    except BaseException as e:
        if not owned and not isinstance(e, ClusterGone):  # nothing left to cancel on a cluster that is gone
            for r in pending:
                ray.cancel(r, force=True)
        raise


def generate_on_ray(model: Path, o: RunOptions, run: RayRun, load_options: dict,
                    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> tuple[RunResult, str]:
    """Make the run's missing images with Ray tasks; returns its result and the provider(s) the workers used.

    ``load_options`` are ``runtime.load``'s (provider, threads, cpu_arena, provider_options) for each worker;
    threads default to the worker's CPUs. Bad settings, a bad address and more workers than images fail before
    anything is written.
    """
    from tqdm import tqdm

    require_ray()
    if o.shard != (0, 1):
        raise GenerationError("--shard and --ray do not combine: --ray splits the run into --workers shards itself")
    if run.workers is not None and run.workers > o.n:
        raise GenerationError(f"--workers {run.workers} is more than the {o.n} images of this run; "
                              f"ask for at most {o.n}")
    seen: set[str] = set()

    def once(message: str) -> None:
        if message not in seen:
            seen.add(message)
            tqdm.write(message, file=sys.stderr)

    g = driver_pipeline(model, once, load_options.get("provider", "auto"), load_options.get("dtype"))
    plan = check_run(g, o)
    load_options = {**load_options, "threads": load_options.get("threads") or run.worker.threads}
    connecting = time.perf_counter()
    with connected(run.address, once) as (ray, owned):
        connect_s = time.perf_counter() - connecting
        check_fits(ray, run.worker)
        shards = _workers(ray, run, o.n)
        out = open_output(g, o, plan)
        records = out.recorded()
        already = len(records)
        blocks = [shard_indices(o.n, i, shards) for i in range(shards)]
        progress = ray.remote(num_cpus=0)(Progress).remote(
            {i: sum(j in records for j in b) for i, b in enumerate(blocks)})
        task = ray.remote(generate_shard)
        start = time.perf_counter()
        submitted = time.time()
        refs = {task.options(name=f"ddpm-shard-{i}-of-{shards}", num_cpus=run.worker.cpus, num_gpus=run.worker.gpus,
                             max_retries=run.retries, retry_exceptions=False).remote(
                    str(model), load_options, dataclasses.replace(o, shard=(i, shards), overwrite=False, grid=False),
                    progress): i
                for i, b in enumerate(blocks) if any(j not in records for j in b)}
        with progress_bar(o.n, already, f"generating on Ray ({len(refs)} tasks)") as show:
            results, retried = _gather(ray, refs, progress, show, once, shards, run.retries, owned)
        seconds = time.perf_counter() - start
    finishing = time.perf_counter()
    records = out.recorded()
    if len(records) < o.n:  # never report success without the whole run on disk
        require_on_disk(records, range(o.n))
    finalized = out.finalize(g.contract.channels, o.grid, grid_columns(g, o), records)
    if results:  # where the time went (benchmarks/ray_generate.py reads this line)
        log(f"Ray: cluster ready in {connect_s:.2f} s; per task (median of {len(results)}): "
            "start-up (submitted → running) "
            f"{_median(r['entered'] - submitted for r in results)}, "
            f"model load {_median(r['load_s'] for r in results)}, "
            f"generation {_median(r['generate_s'] for r in results)}; all tasks {seconds:.2f} s; final files "
            f"{time.perf_counter() - finishing:.2f} s")
    where = f"on Ray: {len(refs)} task{'s' if len(refs) != 1 else ''} of {run.worker.describe()}, {retried} retried"
    providers = ", ".join(sorted({r["provider"] for r in results})) or g.runs_on
    return RunResult(o.n - already, already, plan, seconds, finalized, where=where), providers


def _median(values) -> str:
    return f"{statistics.median(list(values)):.2f} s"
