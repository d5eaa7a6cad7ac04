"""Sample quality against predictor calls: sampler × steps at one guidance scale, then a guidance sweep.

    python -m benchmarks.quality --out benchmarks/results/quality-cpu-2core [--n 1000] [--only ROW,...]
    python -m benchmarks.quality --grid few-step --n 5000 --out benchmarks/results/few-step-cpu-2core

Each row is one ``ddpm-generate`` run of the bundled model (n images, classes cycling, seed 0, ``--format npz``)
and its ``ddpm-eval`` against the FashionMNIST test set. A row's results are appended to ``OUT/rows.jsonl`` as soon
as it is scored (a rerun skips the rows already there); several processes may share OUT (each claims a row in
``OUT/claims/`` before running it; ``--reverse`` starts from the end of the list). The scores do not depend on what
else runs, the times do: ``--speed N`` times N images per row (no scoring) into ``OUT/speed.jsonl``, to be run on a
quiet machine. ``OUT/table.md`` (rewritten after each row): FCD, KID, conditional accuracy, predictor calls and
rows per image (guided steps make two rows), end-to-end images/s of the whole ``ddpm-generate`` command (from the
speed pass where there is one), and the floor and ceiling rows; FD∞ ± its error where ``ddpm-eval`` gives it.

``--grid few-step`` (issue 29) is every sampler with history or none at 5, 6, 8 and 10 calls at the bundled model's
recommended guidance (w = 2 on t ∈ [0, 400]) with linspace timesteps; the two best of them (``FEW_STEP_BEST``) with
logsnr spacing and with timesteps tuned by ``ddpm-tune`` (run once into ``OUT/tuned.json``, passed as
``--timesteps``); DDIM-50 and DPM-Solver++(2M)-25 as references. The order puts first what decides the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID_STEPS = (10, 15, 20, 25, 50)
GRID_SAMPLERS = ("ddim", "dpmpp-2m", "dpmpp-2m-sde")
GRID_W = 1.5
BATCH = 8  # 16 rows per call with guidance: onnxruntime's fastest here (README's throughput table); images do not
# depend on it
# the sweep: on DPM-Solver++(2M), the scale over every step and over intervals of model timesteps (t = 82 … 579
# is σ = √((1−ᾱ)/ᾱ) from 0.28 to 5.42 on this schedule, Kynkäänniemi et al.'s interval for EDM)
SWEEP = [("dpmpp-2m", 15, w, None) for w in (1.0, 1.25, 2.0)] + [
    ("dpmpp-2m", 15, w, iv) for w, iv in ((2.0, (82, 579)), (3.0, (82, 579)), (2.0, (0, 400)), (3.0, (0, 400)))]


FEW_STEP_SAMPLERS = ("ddim", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm")  # the few-step grid's candidates
FEW_STEP_CALLS = (6, 5, 8, 10)  # 6 first: the target is reached at ≤ 6 calls or not
# the two best on linspace timesteps at 5 and 6 calls (rows.jsonl): dpmpp-3m, then dpmpp-2m and unipc within 0.4 of
# each other (errors ≈ 2); dpmpp-2m is taken as the cheaper of the two and the bundled model's recommendation
FEW_STEP_BEST = ("dpmpp-3m", "dpmpp-2m")
SCHEDULES = ("linspace", "logsnr", "tuned")  # a row's timesteps: the spacing, or ddpm-tune's list for its K
RECOMMENDED = (2.0, (0, 400))  # the bundled model's guidance and interval

Row = tuple  # (sampler, steps, w, interval or None, schedule)


def few_step_rows() -> list[Row]:
    """The rows that decide the targets first (the references, then ≤ 6 calls), then the rest of the grid."""
    linspace = [(s, k, *RECOMMENDED, "linspace") for k in FEW_STEP_CALLS for s in FEW_STEP_SAMPLERS]
    better = [(s, k, *RECOMMENDED, sched) for k in FEW_STEP_CALLS for s in FEW_STEP_BEST for sched in SCHEDULES[1:]]
    refs = [("ddim", 50, *RECOMMENDED, "linspace"), ("dpmpp-2m", 25, *RECOMMENDED, "linspace")]
    first = [r for r in linspace + better if r[1] <= 6]
    return refs + first + [r for r in linspace if r[1] > 6] + [r for r in better if r[1] > 6]


def rows() -> list[Row]:
    """DDIM first (the baseline), then DPM-Solver++(2M) and the sweep, the SDE variant, and the 50-step solver rows."""
    grid = [(s, k, GRID_W, None, "linspace") for s in GRID_SAMPLERS for k in GRID_STEPS]
    first = [r for r in grid if r[0] == "ddim" or r[1] < 50]
    sweep = [(*r, "linspace") for r in SWEEP]
    ordered = [r for r in first if r[0] != "dpmpp-2m-sde"] + sweep + [r for r in first if r[0] == "dpmpp-2m-sde"]
    return ordered + [r for r in grid if r not in first]


def row_name(sampler: str, steps: int, w: float, interval, schedule: str = "linspace") -> str:
    return (f"{sampler}-{steps}-w{w:g}" + ("" if interval is None else f"-t{interval[0]}-{interval[1]}")
            + ("" if schedule == "linspace" else f"-{schedule}"))


def tuned_timesteps(out: Path, counts: tuple[int, ...] = FEW_STEP_CALLS) -> dict[int, list[int]]:
    """ddpm-tune's timesteps for the bundled model per K, from ``OUT/tuned.json`` (made once, by ddpm-tune itself)."""
    record = out / "tuned.json"
    if not record.exists():
        import runtime

        with tempfile.TemporaryDirectory() as tmp:
            tuned = Path(tmp) / "tuned.onnx"
            cmd = [bin_("ddpm-tune"), "fashion-mnist", "--steps", ",".join(map(str, sorted(counts))), "--out",
                   str(tuned)]
            subprocess.run(cmd, check=True, capture_output=True)
            contract = runtime.load(tuned, "cpu", log=lambda m: None).contract
            record.write_text(json.dumps({"command": " ".join(Path(c).name if i == 0 else c for i, c in
                                                              enumerate(cmd)).replace(str(tuned), "tuned.onnx"),
                                          "timesteps": {str(k): list(v) for k, v in
                                                        contract.tuned_timesteps.items()}}, indent=2) + "\n")
    return {int(k): v for k, v in json.loads(record.read_text())["timesteps"].items()}


def bin_(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def generate_command(sampler: str, steps: int, w: float, interval, schedule: str, n: int, folder: Path,
                     tuned: dict[int, list[int]] | None = None) -> list[str]:
    """The row's ``ddpm-generate`` command: every setting as the row names it, whatever the model recommends."""
    cmd = [bin_("ddpm-generate"), "-n", str(n), "--batch-size", str(BATCH), "--sampler", sampler, "--steps", str(steps),
           "--guidance", str(w), "--format", "npz", "--out", str(folder), "--overwrite", "--provider", "cpu",
           "--no-model-defaults"]
    if interval is not None:
        cmd += ["--guidance-interval", f"{interval[0]},{interval[1]}"]
    if schedule == "tuned":
        cmd += ["--timesteps", ",".join(map(str, tuned[steps]))]
    elif schedule != "linspace":
        cmd += ["--spacing", schedule]
    return cmd


def run_row(sampler: str, steps: int, w: float, interval, schedule: str, n: int, work: Path,
            tuned: dict[int, list[int]] | None = None) -> dict:
    import numpy as np

    import runtime

    folder = work / row_name(sampler, steps, w, interval, schedule)
    cmd = generate_command(sampler, steps, w, interval, schedule, n, folder, tuned)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    scores = json.loads(subprocess.run([bin_("ddpm-eval"), str(folder), "--json"], check=True, capture_output=True,
                                       text=True).stdout)
    timing = ({"timesteps": tuple(tuned[steps])} if schedule == "tuned" else
              {} if schedule == "linspace" else {"spacing": schedule})
    plan = runtime.load("fashion-mnist", "cpu", log=lambda m: None).plan(
        sampler=sampler, steps=steps, guidance=w, guidance_interval=interval, model_defaults=False, **timing)
    rows_per_image = int(len(plan.coefs.guidance) + np.count_nonzero(plan.coefs.guidance != 1.0))
    return {"row": folder.name, "sampler": sampler, "steps": steps, "schedule": schedule,
            "timesteps": [int(t) for t in plan.timesteps], "guidance": w,
            "guidance_interval": None if interval is None else list(interval), "n": n,
            "predictor_calls": steps, "rows_per_image": rows_per_image, "seconds": round(seconds, 1),
            "images_per_s": round(n / seconds, 3), "command": " ".join(Path(c).name if i == 0 else c
                                                                          for i, c in enumerate(cmd)),
            "scores": scores["rows"]}


def table(results: list[dict], speed: dict[str, float] | None = None) -> str:
    speed = speed or {}
    lines = ["| sampler | steps | timesteps | w | interval | n | FCD ↓ | FD∞ ± error ↓ | KID ↓ | cond. acc. "
             "| calls/img | rows/img | img/s |", "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fd_inf(g: dict) -> str:
        return "" if g.get("fd_inf") is None else f"{g['fd_inf']:.2f} ± {g['fd_inf_stderr']:.2f}"

    for r in results:
        g = r["scores"][0]
        iv = "every step" if r["guidance_interval"] is None else "[{}, {}]".format(*r["guidance_interval"])
        acc = "" if g["conditional_accuracy"] is None else f"{100 * g['conditional_accuracy']:.1f} %"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r.get('schedule', 'linspace')} | {r['guidance']:g} | {iv} | "
                     f"{r['n']} | {g['fcd']:.1f} | "
                     f"{fd_inf(g)} | {g['kid']:.1f} | {acc} | {r['predictor_calls']} | {r['rows_per_image']} | "
                     f"{speed.get(r['row'], r['images_per_s']):.2f} |")
    if results:
        for s in results[-1]["scores"][1:]:
            fcd = f"{s['fcd']:.1f}" + ("" if s.get("fcd_sd") is None else f" ± {s['fcd_sd']:.1f}")
            lines.append(f"| {s['name']} | | | | | | {fcd} | {fd_inf(s)} | {s['kid']:.1f} | | | | |")
    return "\n".join(lines) + "\n"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def claim(out: Path, name: str) -> bool:
    """Whether this process may run row ``name`` (no other process has claimed it)."""
    (out / "claims").mkdir(exist_ok=True)
    try:
        os.close(os.open(out / "claims" / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def time_row(sampler: str, steps: int, w: float, interval, schedule: str, n: int, work: Path,
             tuned: dict[int, list[int]] | None = None) -> float:
    """images/s of a whole ``ddpm-generate`` command of n images (PNG writing off: ``--format npz``)."""
    cmd = generate_command(sampler, steps, w, interval, schedule, n,
                           work / row_name(sampler, steps, w, interval, schedule), tuned)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--only", default=None, help="comma-separated row names")
    parser.add_argument("--reverse", action="store_true", help="take the rows from the end of the list")
    parser.add_argument("--speed", type=int, default=None, metavar="N", help="only time N images per row")
    parser.add_argument("--grid", choices=("samplers", "few-step"), default="samplers",
                        help="samplers: the n = 1000 sampler and guidance table; few-step: issue 29's few-step grid")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "rows.jsonl"
    speed_log = args.out / "speed.jsonl"
    (args.out / "machine.json").write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version()}, indent=2))
    only = set(args.only.split(",")) if args.only else None
    grid = few_step_rows() if args.grid == "few-step" else rows()
    order = grid[::-1] if args.reverse else grid
    tuned = tuned_timesteps(args.out) if any(r[4] == "tuned" for r in grid) else None
    with tempfile.TemporaryDirectory() as tmp:
        for sampler, steps, w, interval, schedule in order:
            name = row_name(sampler, steps, w, interval, schedule)
            if only and name not in only:
                continue
            if args.speed:
                rate = time_row(sampler, steps, w, interval, schedule, args.speed, Path(tmp), tuned)
                with open(speed_log, "a") as f:
                    f.write(json.dumps({"row": name, "n": args.speed, "images_per_s": round(rate, 3)}) + "\n")
                print(f"{name:32s} {rate:.2f} images/s", flush=True)
                continue
            if any(r["row"] == name and r["n"] == args.n for r in read_jsonl(log)) or not claim(args.out, name):
                continue
            result = run_row(sampler, steps, w, interval, schedule, args.n, Path(tmp), tuned)
            with open(log, "a") as f:
                f.write(json.dumps(result) + "\n")
            done = read_jsonl(log)
            order_names = [row_name(*r) for r in grid]
            done.sort(key=lambda r: order_names.index(r["row"]) if r["row"] in order_names else len(order_names))
            speeds = {r["row"]: r["images_per_s"] for r in read_jsonl(speed_log)}
            (args.out / "table.md").write_text(table(done, speeds))
            g = result["scores"][0]
            print(f"{name:32s} FCD {g['fcd']:7.2f}  acc {g['conditional_accuracy']}  {result['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
