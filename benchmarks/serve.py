"""``python -m benchmarks.serve``: load test of ``ddpm-serve`` over real HTTP on loopback, continuous batching against
the same server one request at a time (``--no-batching``), in one run.

For each mode it starts a server process (the bundled model unless ``--model``), then for each workload and
concurrency runs that many client threads for ``--seconds``, each sending its next request as soon as the last one
returned. Workloads:

- ``uniform``: every request is DDIM-20, n = 1;
- ``mixed``: mostly DDIM-20, n = 1 ("short"), and with probability ``--long-share`` a DDPM-1000, n = 16 ("long");
- ``mixed-dpmpp``: as ``mixed``, with the short requests half DDIM-20 and half DPM-Solver++(2M)-15, n = 1, so one
  predictor call mixes DDPM, DDIM and multistep images.

Both at guidance 1.5 (the bundled model's recommendation). Reported per cell: images/s of completed requests, and
p50/p95/p99 latency of the short requests. A request still running when the time is up counts with its elapsed
time, a lower bound of its latency (the table marks such percentiles with ≥), so a server that starves short
requests cannot hide it by not finishing them. Writes OUT/results.json, OUT/results.md and OUT/latency.png.
"""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

# Every setting explicit, whatever the model recommends: guidance on every step is the interval [0, T − 1] (T = 1000).
EVERY_STEP = [0, 999]
SHORT = {"n": 1, "sampler": "ddim", "steps": 20, "eta": 0.0, "guidance": 1.5, "guidance_interval": EVERY_STEP}
LONG = {"n": 16, "sampler": "ddpm", "steps": 1000, "guidance": 1.5, "guidance_interval": EVERY_STEP}
DPMPP_SHORT = {"n": 1, "sampler": "dpmpp-2m", "steps": 15, "guidance": 1.5, "guidance_interval": EVERY_STEP}
SHORTS = {"uniform": [SHORT], "mixed": [SHORT], "mixed-dpmpp": [SHORT, DPMPP_SHORT]}  # workload -> short requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, batching: bool, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "serve.cli", *([model] if model else []), "--port", str(port),
           "--max-batch", str(max_batch), "--threads", str(threads), "--queue-limit", "100000", "--max-images", "64",
           "--deadline", "100000"]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise click.ClickException(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
    proc.kill()
    raise click.ClickException("the server did not become healthy within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    """Between cells the server is killed, not drained: requests left running must not delay the next cell."""
    proc.kill()
    proc.wait()


def run_cell(url: str, workload: str, clients: int, seconds: float, long_share: float, seed: int) -> dict:
    """``clients`` threads, closed loop, for ``seconds``; returns per-request records."""
    import httpx

    records: list[dict] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    running: dict[int, tuple[str, float]] = {}  # thread -> (kind, start) of the request in flight

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(timeout=None) as http:
            while time.monotonic() < stop_at:
                kind = "long" if workload != "uniform" and rng.random() < long_share else "short"
                body = {**(LONG if kind == "long" else rng.choice(SHORTS[workload])), "seed": rng.randrange(1 << 30)}
                start = time.monotonic()
                running[k] = (kind, start)
                try:
                    r = http.post(f"{url}/v1/images", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                end = time.monotonic()
                running.pop(k, None)
                with lock:
                    records.append({"kind": kind, "n": body["n"], "ok": ok, "latency": end - start,
                                    "finished_in_time": end <= stop_at, "censored": False})

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    now = time.monotonic()
    with lock:  # requests still running: their elapsed time is a lower bound of their latency
        censored = [{"kind": kind, "n": 0, "ok": False, "latency": now - start, "finished_in_time": False,
                     "censored": True} for kind, start in list(running.values())]
    return {"records": records, "censored": censored, "threads": threads}


def summarise(cell: dict, seconds: float) -> dict:
    done = [r for r in cell["records"] if r["ok"] and r["finished_in_time"]]
    short = [r["latency"] for r in cell["records"] if r["kind"] == "short" and r["ok"]]
    short_censored = [r["latency"] for r in cell["censored"] if r["kind"] == "short"]
    lat = np.array(short + short_censored) if short or short_censored else np.array([np.nan])
    out = {"images_per_s": sum(r["n"] for r in done) / seconds, "requests_done": len(done),
           "short_done": len(short), "short_unfinished": len(short_censored),
           "long_done": sum(1 for r in done if r["kind"] == "long"),
           "errors": sum(1 for r in cell["records"] if not r["ok"])}
    unbounded = np.array(short + [np.inf] * len(short_censored)) if short or short_censored else lat
    for q in (50, 95, 99):
        value = float(np.percentile(lat, q))
        out[f"p{q}"] = value
        # a lower bound where the unfinished requests reach this percentile (their true latency is unknown)
        with np.errstate(invalid="ignore"):  # inf − inf while interpolating between two unfinished ones
            bound = np.percentile(unbounded, q)
        out[f"p{q}_lower_bound"] = bool(not bound <= 1.05 * value)  # NaN (inf − inf) counts as unbounded
    return out


def markdown(results: dict) -> str:
    lines = [f"# ddpm-serve load test — {results['model']}", "",
             f"Machine: {results['machine']}; server threads {results['threads']}, max batch {results['max_batch']}; "
             f"{results['seconds']:.0f} s per cell; short = DDIM-20 n = 1 "
             "(mixed-dpmpp: half of them DPM-Solver++(2M)-15), "
             "long = DDPM-1000 n = 16, guidance 1.5; "
             f"mixed: {100 * results['long_share']:.0f} % of requests long. Latency percentiles are of the short "
             "requests; ≥ marks a percentile reached by requests still running at the end (their elapsed time "
             "is a lower bound).", "",
             "| workload | clients | mode | images/s | requests done | short p50 s | short p95 s | short p99 s "
             "| long done |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in results["cells"]:
        s = c["summary"]

        def fmt(q):
            return ("≥ " if s[f"p{q}_lower_bound"] else "") + f"{s[f'p{q}']:.2f}"

        lines.append(f"| {c['workload']} | {c['clients']} | {c['mode']} | {s['images_per_s']:.2f} "
                     f"| {s['requests_done']} "
                     f"| {fmt(50)} | {fmt(95)} | {fmt(99)} | {s['long_done']} |")
    lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in results["targets"]]
    return "\n".join(lines) + "\n"


def targets(cells: list[dict]) -> list[dict]:
    by = {(c["workload"], c["clients"], c["mode"]): c["summary"] for c in cells}
    out = []
    for workload in [w for w in SHORTS if w != "uniform"]:
        for clients in sorted({c["clients"] for c in cells}):
            b, n = by.get((workload, clients, "batching")), by.get((workload, clients, "one-at-a-time"))
            if b and n:
                ratio = n["p95"] / b["p95"]
                bound = "≥ " if n["p95_lower_bound"] else ""
                out.append({"target": f"{workload}, {clients} clients: short p95 ≥ 10× lower with batching",
                            "measured": f"{bound}{ratio:.1f}×", "met": ratio >= 10})
    for workload in SHORTS:
        for clients in sorted({c["clients"] for c in cells}):
            b, n = by.get((workload, clients, "batching")), by.get((workload, clients, "one-at-a-time"))
            if b and n:
                ratio = b["images_per_s"] / n["images_per_s"] if n["images_per_s"] else float("inf")
                goal = 1.1 if (workload, clients) == ("uniform", 16) else 1.0
                out.append({"target": f"{workload}, {clients} clients: images/s ≥ {goal}× one-at-a-time",
                            "measured": f"{ratio:.2f}×", "met": ratio >= goal})
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, label) in zip(axes, (("images_per_s", "images/s"), ("p95", "short-request p95 latency (s)"))):
        for workload in SHORTS:
            for mode, style in (("batching", "-o"), ("one-at-a-time", "--s")):
                cells = [c for c in results["cells"] if c["workload"] == workload and c["mode"] == mode]
                ax.plot([c["clients"] for c in cells], [c["summary"][key] for c in cells], style,
                        label=f"{workload}, {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        if key == "p95":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default=None, help="Model file for the server (default: the bundled model).")
@click.option("--clients", default="1,4,16,64", help="Comma-separated concurrency levels.")
@click.option("--workloads", default="uniform,mixed", help="Comma-separated: uniform, mixed, mixed-dpmpp.")
@click.option("--seconds", type=click.FloatRange(min=1), default=30.0, help="Duration of each cell.")
@click.option("--long-share", type=click.FloatRange(0, 1), default=0.05, help="Mixed: share of long requests.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8,
              help="The server's --max-batch (images per predictor call; 8 images = 16 rows at guidance 1.5, "
                   "onnxruntime's best batch on a 2-core CPU).")
@click.option("--threads", type=click.IntRange(min=1), default=os.cpu_count(), help="The server's --threads.")
@click.option("--seed", type=int, default=0, help="Seed of the clients' request sequences.")
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/results/serve-latest")
def main(model, clients, workloads, seconds, long_share, max_batch, threads, seed, out) -> None:
    """Throughput and latency of ddpm-serve with continuous batching vs one request at a time."""
    levels = [int(c) for c in clients.split(",")]
    kinds = workloads.split(",")
    cells = []
    for mode in ("batching", "one-at-a-time"):
        click.echo(f"starting the server ({mode}) ...", err=True)
        proc, url = start_server(model, mode == "batching", max_batch, threads)
        try:
            for workload in kinds:
                for c in levels:
                    cell = run_cell(url, workload, c, seconds, long_share, seed)
                    summary = summarise(cell, seconds)
                    click.echo(f"  {mode} {workload} {c} clients: {summary['images_per_s']:.2f} img/s, "
                               f"short p95 {summary['p95']:.2f} s", err=True)
                    cells.append({"mode": mode, "workload": workload, "clients": c, "summary": summary})
                    # requests still running hold the server: restart it so the next cell starts clean
                    stop_server(proc)
                    proc, url = start_server(model, mode == "batching", max_batch, threads)
        finally:
            stop_server(proc)
    from benchmarks.throughput import cpu_name

    results = {"model": model or "the bundled fashion-mnist model", "machine": f"{cpu_name()} ({os.cpu_count()} cores)",
               "platform": platform.platform(), "threads": threads, "max_batch": max_batch, "seconds": seconds,
               "long_share": long_share, "cells": cells}
    results["targets"] = targets(cells)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "latency.png")
    click.echo((out / "results.md").read_text())


if __name__ == "__main__":
    main()
