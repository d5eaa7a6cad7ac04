"""``python -m benchmarks.ray_generate``: one-process ``ddpm-generate`` against ``--ray --workers K`` for the same run.

    python -m benchmarks.ray_generate --out benchmarks/results/ray-cpu-2core [-n 512] [--repeats 3]

The run: the bundled model, ``--sampler ddim --steps 20`` (its recommended guidance 2 on t in [0, 400] applies),
-n images into a fresh folder. Three ways, in turns (so that a slow minute of the machine hits each alike):

- ``one-process``: ``ddpm-generate`` with onnxruntime on all cores;
- ``ray-local``: ``--ray local --workers K``: a local cluster started (and stopped) by the run;
- ``ray-running``: ``--ray ADDRESS --workers K`` against a cluster started once beforehand (``ray start --head``).

Each is timed from the outside (wall, the process's whole life); the Ray runs' own line ("Ray: cluster ready in …;
per task (median of K): start-up …, model load …, generation …; all tasks …; final files …") splits it. Ray's
share is what is not a task generating: wall − the median task's generation time, over wall. Every run's folder
must equal the one-process run's (all files but the shard manifests). Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY_LINE = re.compile(r"Ray: cluster ready in (?P<ready>[0-9.]+) s; per task \(median of (?P<tasks>\d+)\): start-up "
                      r"\(submitted → running\) (?P<startup>[0-9.]+) s, model load (?P<load>[0-9.]+) s, generation "
                      r"(?P<generate>[0-9.]+) s; all tasks (?P<all>[0-9.]+) s; final files (?P<final>[0-9.]+) s")


def folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("manifest-"):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def run(args: list[str], env: dict) -> tuple[float, str, str]:
    start = time.perf_counter()
    p = subprocess.run([str(BIN / "ddpm-generate"), *args], env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if p.returncode:
        raise SystemExit(f"ddpm-generate {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return wall, p.stdout, p.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("-n", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    o = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    common = ["-n", str(o.n), "--sampler", "ddim", "--steps", "20", "--seed", "0"]
    port = free_port()
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--include-dashboard=false", "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ways = {
        "one-process": [],
        "ray-local": ["--ray", "local", "--workers", str(o.workers)],
        "ray-running": ["--ray", f"127.0.0.1:{port}", "--workers", str(o.workers)],
    }
    rows: dict[str, list[dict]] = {w: [] for w in ways}
    try:
        time.sleep(10)  # the head's start-up, not part of any run
        with tempfile.TemporaryDirectory() as tmp:
            reference = None
            for rep in range(o.repeats):
                for way, extra in ways.items():
                    folder = Path(tmp) / f"{way}-{rep}"
                    wall, out, err = run([*common, "--out", str(folder), *extra], env)
                    row = {"wall_s": wall, "images_per_s": o.n / wall, "summary": out.strip()}
                    if m := RAY_LINE.search(err):
                        row.update({k: float(v) for k, v in m.groupdict().items()})
                        row["ray_share"] = (wall - row["generate"]) / wall
                    digest = folder_hash(folder)
                    reference = reference or digest
                    row["same_as_one_process"] = digest == reference
                    rows[way].append(row)
                    print(f"{way} #{rep}: {wall:.1f} s", {k: v for k, v in row.items() if k != "summary"},
                          file=sys.stderr)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait()

    def med(way: str, key: str) -> float | None:
        values = [r[key] for r in rows[way] if key in r]
        return statistics.median(values) if values else None

    result = {"n": o.n, "workers": o.workers, "run": " ".join(common),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "python": platform.python_version(), "rows": rows}
    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"`python -m benchmarks.ray_generate --out {o.out}`: bundled model, `{' '.join(common)}`, "
             f"{os.cpu_count()} cores; medians of {o.repeats} runs each (min–max of wall)", "",
             "| way | wall s (min–max) | images/s | cluster ready s | task start-up s | model load s "
             "| task generation s "
             "| final files s | Ray's share | same images |", "|---|---|---|---|---|---|---|---|---|---|"]
    for way in ways:
        walls = [r["wall_s"] for r in rows[way]]

        def cell(key: str, fmt: str = "{:.2f}") -> str:
            v = med(way, key)
            return "—" if v is None else fmt.format(v)

        lines.append(f"| {way} | {statistics.median(walls):.1f} ({min(walls):.1f}–{max(walls):.1f}) | "
                     f"{cell('images_per_s', '{:.1f}')} | {cell('ready')} | {cell('startup')} | {cell('load')} | "
                     f"{cell('generate', '{:.1f}')} | {cell('final')} | {cell('ray_share', '{:.0%}')} | "
                     f"{all(r['same_as_one_process'] for r in rows[way])} |")
    (o.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
