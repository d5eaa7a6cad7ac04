"""``python -m benchmarks.soak``: a ``ddpm-serve`` process under minutes of mixed load, ended by SIGTERM.

Load (closed-loop client threads, every setting explicit so each request can be made again offline):

- ``short`` (``--clients`` threads): DDIM-20 or DPM-Solver++(2M)-15, n = 1 to 4, guidance 1.5, a random class;
- ``long`` (``--long-clients`` threads of their own, so that short clients never all wait in long requests):
  DDPM-1000, n = 4, guidance 1.5;
- ``disconnect`` (``--disconnect-share`` of either kind): a request whose client hangs up after 0.1 to 1 s;
- ``burst``: every ``--burst-every`` seconds, ``--burst`` requests of 32 images at once, past the server's queue limit
  (429 with Retry-After is the expected answer for most of them).

At the end no new request is sent, the server gets SIGTERM (``--grace`` long enough to drain what is in flight) and
its exit code is recorded. Reported: requests by status (the clients' view and the server's
``ddpm_serve_requests_total``), p50/p95/p99 latency per class, the server's RSS at the start (after a warm-up) and at
the end (sampled every few seconds), and for one completed request in ``--check-every`` its images against
``runtime.load(model).generate`` with the same settings (exactly equal, and the largest difference in levels).
Per short request size (sampler and n): its time alone on the idle server (before the load) and its p50/p95 under
load. Targets: no 5xx, RSS growth < 50 MB, exit 0, all compared images equal, and no short size's p95 above 4 × (its
time alone + the queue wait), the queue wait being what the load costs the smallest request (its median under load
less its time alone). Writes OUT/results.json, OUT/results.md and
OUT/latency.png (latency of every request over time, and RSS).
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

GUIDANCE = {"guidance": 1.5, "guidance_interval": [0, 999]}  # every setting explicit: offline runs the same
SHORTS = [{"sampler": "ddim", "steps": 20, "eta": 0.0, **GUIDANCE}, {"sampler": "dpmpp-2m", "steps": 15, **GUIDANCE}]
LONG = {"n": 4, "sampler": "ddpm", "steps": 1000, **GUIDANCE}
BURST = {"n": 32, "sampler": "ddim", "steps": 5, "eta": 0.0, **GUIDANCE}
QUEUE_LIMIT = 64  # images queued or in flight; a burst of 32-image requests passes it at once


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def start_server(model: str | None, threads: int, grace: float) -> tuple[subprocess.Popen, str, Path]:
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-server-{os.getpid()}.log"
    cmd = [sys.executable, "-m", "serve.cli", *([model] if model else []), "--port", "0", "--threads", str(threads),
           "--queue-limit", str(QUEUE_LIMIT), "--max-images", "32", "--grace", str(grace)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return proc, found.group(1), log
        if proc.poll() is not None:
            raise click.ClickException(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise click.ClickException("the server did not start within 120 s")


class Load:
    """The clients: records of every request (class, start, latency, status), and the bodies and images of the
    completed requests picked for the offline comparison."""

    def __init__(self, url: str, classes: int, seed: int, disconnect_share: float, check_every: int) -> None:
        self.url, self.classes, self.seed = url, classes, seed
        self.disconnect_share, self.check_every = disconnect_share, check_every
        self.records: list[dict] = []
        self.checks: list[dict] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.t0 = time.monotonic()
        self.sigterm_at = float("inf")  # seconds after t0; a request sent later is answered 503, as it should be
        self._completed = 0

    def request(self, http, kind: str, body: dict, timeout: float | None) -> None:
        import httpx

        start = time.monotonic()
        try:
            r = http.post(f"{self.url}/v1/images", json=body, timeout=timeout)
            status = r.status_code
        except httpx.TimeoutException:
            status, r = "disconnected", None  # the client hung up mid-request, as it meant to
        except httpx.HTTPError as e:
            status, r = f"transport error: {type(e).__name__}", None
        end = time.monotonic()
        with self.lock:
            self.records.append({"kind": kind, "start": start - self.t0, "latency": end - start, "status": status,
                                 "n": body["n"]})
            if status == 200:
                self._completed += 1
                if self._completed % self.check_every == 1 or self.check_every == 1:
                    self.checks.append({"body": body, "images": [rec["png_base64"] for rec in r.json()["images"]]})

    def client(self, k: int, long: bool) -> None:
        import httpx

        rng = random.Random(self.seed * 1000 + k)
        with httpx.Client(timeout=None) as http:
            while not self.stopping.is_set():
                body = dict(LONG) if long else {"n": rng.randint(1, 4), **rng.choice(SHORTS)}
                body.update(seed=rng.randrange(1 << 30), start_index=rng.randrange(1000),
                            **({"class": rng.randrange(self.classes)} if self.classes else {}))
                if rng.random() < self.disconnect_share:
                    self.request(http, "disconnect", body, timeout=rng.uniform(0.1, 1.0))
                else:
                    self.request(http, "long" if long else f"short-{body['sampler']}", body, timeout=None)

    def burst(self, size: int) -> None:
        import httpx

        def one(i: int) -> None:
            with httpx.Client(timeout=None) as http:
                self.request(http, "burst", {**BURST, "seed": 10_000 + i}, timeout=None)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)} | {"n": len(values)}


def server_statuses(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'ddpm_serve_requests_total\{status="(\d+)"\} (\S+)', text)}


def compare_offline(model: str | None, checks: list[dict]) -> dict:
    """Each checked request made again with ``Pipeline.generate``: exact equality, and the largest difference."""
    from PIL import Image

    import runtime
    from runtime.bundled import resolve

    path, _ = resolve(model)
    pipeline = runtime.load(path, "cpu", log=lambda m: None)
    equal = images = 0
    worst = 0
    for check in checks:
        body = dict(check["body"])
        n, seed, start, cls = body.pop("n"), body.pop("seed"), body.pop("start_index", 0), body.pop("class", None)
        interval = body.pop("guidance_interval")
        want = pipeline.generate(n, seed=seed, start_index=start, classes=cls, batch_size=n,
                                 guidance_interval=tuple(interval), **body)
        got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in check["images"]])
        got = got.reshape(want.shape)
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16)).reshape(n, -1).max(axis=1)
        images += n
        equal += int((diff == 0).sum())
        worst = max(worst, int(diff.max()))
    return {"requests": len(checks), "images": images, "exactly_equal": equal, "max_levels": worst}


def markdown(r: dict) -> str:
    lines = [f"# ddpm-serve soak — {r['model']}", "",
             f"Machine: {r['machine']}. {r['minutes']:g} min; closed-loop clients: {r['clients']} of short requests, "
             f"{r['long_clients']} of long ones (DDPM-1000, n = 4); {100 * r['disconnect_share']:.0f} % hanging up "
             f"after 0.1–1 s, a burst of {r['burst']} × 32 images every {r['burst_every']:g} s past the queue limit "
             f"({QUEUE_LIMIT} images); short = DDIM-20 or DPM-Solver++(2M)-15, n = 1–4; guidance 1.5. Then SIGTERM "
             f"(grace {r['grace']:g} s).", "",
             "| requests by status (clients) | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(r["client_statuses"].items())]
    lines += ["", "| requests by status (server metrics) | count |", "|---|---:|"]
    lines += [f"| {k} | {v:g} |" for k, v in sorted(r["server_statuses"].items())]
    lines += ["", "| class | done | p50 s | p95 s | p99 s |", "|---|---:|---:|---:|---:|"]
    for kind, p in r["latency"].items():
        if p["n"]:
            lines.append(f"| {kind} | {p['n']} | {p['p50']:.2f} | {p['p95']:.2f} | {p['p99']:.2f} |")
    lines += ["", f"Per request size (short requests; alone: the median of 3 on the idle server; queue wait "
                  f"{r['queue_wait_s']:.2f} s: the median of {r['smallest']} under load less its time alone):", "",
              "| size | done | alone s | p50 s | p95 s | p95 / alone |", "|---|---:|---:|---:|---:|---:|"]
    for size, f in r["by_size"].items():
        if f["n"]:
            lines.append(f"| {size} | {f['n']} | {f['unloaded_s']:.2f} | {f['p50']:.2f} | {f['p95']:.2f} | "
                         f"{f['p95'] / f['unloaded_s']:.1f} |")
    c = r["offline"]
    lines += ["", f"Server RSS: {r['rss_start_mb']:.1f} MB after warm-up, {r['rss_1min_mb']:.1f} MB after the first "
                  f"minute, {r['rss_end_mb']:.1f} MB at the end (max {r['rss_max_mb']:.1f} MB). "
                  f"Exit code after SIGTERM: {r['exit_code']} "
                  f"({r['drain_s']:.1f} s to drain). Offline comparison: {c['requests']} requests, "
                  f"{c['images']} images, "
                  f"{c['exactly_equal']} exactly equal, largest difference {c['max_levels']} levels.", "",
              "| target | measured | met |", "|---|---:|:---:|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in r["targets"]]
    return "\n".join(lines) + "\n"


def plot(r: dict, records: list[dict], rss: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for kind in sorted({rec["kind"] for rec in records}):
        recs = [rec for rec in records if rec["kind"] == kind]
        ax.scatter([rec["start"] for rec in recs], [rec["latency"] for rec in recs], s=6, label=kind, alpha=0.6)
    ax.set_yscale("log")
    ax.set_ylabel("latency (s)")
    ax.legend(fontsize=8, markerscale=2)
    ax.grid(alpha=0.3)
    ax.set_title(f"ddpm-serve soak, {r['machine']}")
    ax2.plot([t for t, _ in rss], [m for _, m in rss])
    ax2.set_ylabel("server RSS (MB)")
    ax2.set_xlabel("request start (s since the load began)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default=None, help="Model file for the server (default: the bundled model).")
@click.option("--minutes", type=click.FloatRange(min=0.1), default=10.0, help="How long the load runs.")
@click.option("--clients", type=click.IntRange(min=1), default=8, help="Closed-loop clients of short requests.")
@click.option("--long-clients", type=click.IntRange(min=0), default=2, help="Closed-loop clients of long requests.")
@click.option("--disconnect-share", type=click.FloatRange(0, 1), default=0.05,
              help="Share of requests whose client hangs up mid-request.")
@click.option("--burst", type=click.IntRange(min=1), default=8, help="Requests of 32 images in each burst.")
@click.option("--burst-every", type=click.FloatRange(min=1), default=60.0, help="Seconds between bursts.")
@click.option("--check-every", type=click.IntRange(min=1), default=20,
              help="Compare one completed request in this many with offline generation.")
@click.option("--threads", type=click.IntRange(min=1), default=os.cpu_count(), help="The server's --threads.")
@click.option("--grace", type=click.FloatRange(min=0), default=600.0,
              help="The server's --grace: long enough to drain the requests in flight at SIGTERM.")
@click.option("--seed", type=int, default=0, help="Seed of the clients' request sequences.")
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/results/soak-latest")
def main(model, minutes, clients, long_clients, disconnect_share, burst, burst_every, check_every, threads, grace,
         seed, out) -> None:
    """Soak ddpm-serve: mixed load with disconnects and bursts, then SIGTERM; statuses, latency, RSS, equality."""
    import httpx

    from benchmarks.throughput import cpu_name

    proc, url, log = start_server(model, threads, grace)
    classes = httpx.get(f"{url}/v1/model", timeout=10).json()["contract"]["num_classes"]
    load = Load(url, classes, seed, disconnect_share, check_every)
    with httpx.Client(timeout=None) as http:  # warm-up: full batches (the arena's largest shapes), every sampler
        for body in [BURST, *SHORTS, {**LONG, "steps": 50}]:
            http.post(f"{url}/v1/images", json={**body, "n": 32})
    unloaded = {}  # each short request size alone on the idle server: median of 3
    with httpx.Client(timeout=None) as http:
        for body in SHORTS:
            for n in range(1, 5):
                times = []
                for k in range(3):
                    started = time.monotonic()
                    http.post(f"{url}/v1/images", json={**body, "n": n, "seed": k})
                    times.append(time.monotonic() - started)
                unloaded[f"short-{body['sampler']} n={n}"] = float(np.median(times))
    rss = [(0.0, rss_mb(proc.pid))]
    rss_start = rss[0][1]
    load.t0 = time.monotonic()
    workers = [threading.Thread(target=load.client, args=(k, k >= clients), daemon=True)
               for k in range(clients + long_clients)]
    for w in workers:
        w.start()
    end = load.t0 + 60 * minutes
    next_burst = load.t0 + burst_every
    bursts = []
    while time.monotonic() < end:
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
        rss.append((time.monotonic() - load.t0, rss_mb(proc.pid)))
        if time.monotonic() >= next_burst and time.monotonic() < end - 5:  # none left running into SIGTERM
            bursts.append(threading.Thread(target=load.burst, args=(burst,), daemon=True))
            bursts[-1].start()
            next_burst += burst_every
        click.echo(f"  {time.monotonic() - load.t0:5.0f} s: {len(load.records)} requests, RSS {rss[-1][1]:.1f} MB",
                   err=True)
    load.stopping.set()  # no new requests; those in flight finish during the drain
    rss_end = rss_mb(proc.pid)
    statuses = server_statuses(url)
    sent = time.monotonic()
    load.sigterm_at = sent - load.t0
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=grace + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    drain = time.monotonic() - sent
    for t in [*workers, *bursts]:
        t.join(timeout=30)
    records = list(load.records)
    click.echo(f"server exited {code} after {drain:.1f} s; comparing {len(load.checks)} requests offline ...", err=True)
    offline = compare_offline(model, load.checks)

    by_status: dict[str, int] = {}
    for rec in records:
        late = " (sent after SIGTERM)" if rec["start"] >= load.sigterm_at else ""
        by_status[f"{rec['status']}{late}"] = by_status.get(f"{rec['status']}{late}", 0) + 1
    kinds = sorted({rec["kind"] for rec in records})
    latency = {k: percentiles([rec["latency"] for rec in records if rec["kind"] == k and rec["status"] == 200])
               for k in kinds}
    # per request size: the fairness targets (aging in serve/scheduler.py) are about these
    sized = {size: percentiles([rec["latency"] for rec in records if rec["status"] == 200 and
                                f"{rec['kind']} n={rec['n']}" == size]) for size in unloaded}
    # what the load itself costs any request: the smallest request's median under load beyond its time alone
    smallest = min(unloaded, key=unloaded.get)
    wait = max(0.0, (sized[smallest]["p50"] or 0.0) - unloaded[smallest])
    fair = {size: {"unloaded_s": unloaded[size], **sized[size], "bound_s": 4 * (unloaded[size] + wait)}
            for size in unloaded}
    five_xx = sum(v for k, v in by_status.items() if k.startswith("5") and "after SIGTERM" not in k) + sum(
        v for k, v in statuses.items() if k.startswith("5"))
    growth = rss_end - rss_start
    after_1min = next((m for t, m in rss if t >= 60), rss_end)
    results = {"model": model or "the bundled fashion-mnist model", "machine": f"{cpu_name()} ({os.cpu_count()} cores)",
               "platform": platform.platform(), "minutes": minutes, "clients": clients, "long_clients": long_clients,
               "disconnect_share": disconnect_share, "burst": burst, "burst_every": burst_every, "grace": grace,
               "client_statuses": by_status, "server_statuses": statuses, "latency": latency,
               "by_size": fair, "queue_wait_s": wait, "smallest": smallest,
               "rss_start_mb": rss_start, "rss_1min_mb": after_1min, "rss_end_mb": rss_end,
               "rss_max_mb": max(m for _, m in rss),
               "exit_code": code, "drain_s": drain, "offline": offline, "rss": rss,
               "server_log_tail": log.read_text()[-1500:]}
    results["targets"] = [
        {"target": "no 5xx (clients and server metrics)", "measured": str(five_xx), "met": five_xx == 0},
        {"target": "RSS growth < 50 MB", "measured": f"{growth:+.1f} MB", "met": growth < 50},
        {"target": "exit code 0 after SIGTERM", "measured": str(code), "met": code == 0},
        {"target": "compared images all equal", "measured": f"{offline['exactly_equal']}/{offline['images']}",
         "met": offline["images"] > 0 and offline["exactly_equal"] == offline["images"]},
    ] + [{"target": f"{size}: p95 ≤ 4 × (alone + queue wait) = {f['bound_s']:.2f} s",
          "measured": "none done" if f["p95"] is None else f"{f['p95']:.2f} s",
          "met": f["p95"] is not None and f["p95"] <= f["bound_s"]} for size, f in fair.items()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**results, "requests": records}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, records, rss, out / "latency.png")
    click.echo((out / "results.md").read_text())


if __name__ == "__main__":
    main()
