"""``python -m benchmarks.diffusers_size``: a real-size diffusers DDPM, diffusers itself against our exports.

google/ddpm-cifar10-32's architecture (its UNet2DModel config; random weights, nothing downloaded) saved as a
diffusers pipeline, exported with ``ddpm-export`` (ONNX; .pt2 fp32 and bf16), then, one after another in this
process at the machine's thread count:

* the machine's matmul rates: fp32 (the better of torch and NumPy) and bf16 (torch, 4096³);
* predictor img-steps/s at batch 1 and 16: diffusers' eager ``UNet2DModel`` in fp32 and under bf16 autocast against
  our backends of the exported files: onnxruntime (onnx-cpu), OpenVINO fp32 and bf16 (the ONNX file as it is;
  bf16 only where the CPU computes it), pt2-cpu, pt2-cpu-bf16;
* images/s end to end at batch 1 and 16, DDIM-50 and DPM-Solver++(2M)-15: ``DDIMPipeline`` (and ``DDPMPipeline``
  with ``DPMSolverMultistepScheduler``) in fp32 and under bf16 autocast against ``runtime.load(model).generate``
  (the model's recommended spacing, leading: the pipelines' timesteps);
* the 256² church/bedroom architecture (google/ddpm-church-256's config) at batch 1: one image-step's time and the
  peak memory of a process that loads and runs it: eager, onnx-cpu and OpenVINO (exported with --no-verify:
  verifying it here would take a quarter of an hour).

Writes OUT/results.json and OUT/results.md (and each section as it finishes: OUT/cifar10.json, OUT/church.json,
reused by a later run until deleted).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from benchmarks.throughput import cpu_name
from runtime.files import atomic_write

CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
               block_out_channels=(128, 256, 256, 256),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), freq_shift=1,
               flip_sin_to_cos=False, norm_eps=1e-6, downsample_padding=0, attention_head_dim=None)
CHURCH = dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
              block_out_channels=(128, 128, 256, 256, 512, 512),
              down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, freq_shift=1,
              flip_sin_to_cos=False, norm_eps=1e-6, downsample_padding=0, attention_head_dim=None)
EXPORTS = {"onnx": ("onnx", "fp32", ".onnx"), "pt2": ("pt2", "fp32", ".pt2"), "pt2-bf16": ("pt2", "bf16", ".bf16.pt2")}
# bf16 of these random weights fails the trajectory check (about 100 uint8 levels from fp32 eager after 20 steps:
# a random network amplifies rounding), so that file is exported unverified and measures speed only
UNVERIFIED = {"pt2-bf16": ("--no-verify",)}
# our rows: the exported file each runs, and runtime.load's provider and dtype
OURS = {"onnx-cpu": ("onnx", "cpu", None), "openvino-fp32": ("onnx", "openvino", "fp32"),
        "openvino-bf16": ("onnx", "openvino", "bf16"), "pt2-cpu": ("pt2", "auto", None),
        "pt2-cpu-bf16": ("pt2-bf16", "auto", None)}
TORCH_FREE = ("onnx-cpu", "openvino-fp32", "openvino-bf16")
SAMPLERS = {"ddim-50": ("ddim", 50), "dpmpp-2m-15": ("dpmpp-2m", 15)}  # end-to-end rows: sampler, steps
SLOW_RUN_S = 300  # an end-to-end row whose predictor rate says it would take longer is skipped (None)


def make_pipeline(config: dict, folder: Path) -> tuple[int, float]:
    """Save a random-weight DDPM pipeline of ``config``; returns (parameters, GFLOP per image-step)."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**config).eval()
    if not (folder / "model_index.json").is_file():
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(folder)
    s = config["sample_size"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, 3, s, s), torch.tensor([500]))
    return sum(p.numel() for p in unet.parameters()), counter.get_total_flops() / 1e9


def export(folder: Path, name: str, out: Path, *extra: str) -> float:
    fmt, dtype, suffix = EXPORTS[name]
    path = out / (folder.name + suffix)
    t0 = time.perf_counter()
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "ddpm_export.cli", str(folder), "--format", fmt, "--dtype", dtype,
                        "--out", str(path), *extra], check=True)
    return time.perf_counter() - t0


def rate(fn, calls: int) -> float:
    """Calls per second after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls / (time.perf_counter() - t0)


def autocast(bf16: bool):
    """torch's bf16 autocast on the CPU (what a PyTorch user reaches for), or nothing."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def eager_predictor(folder: Path, bf16: bool = False):
    import diffusers
    import torch

    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()

    def call(x, t):
        with torch.no_grad(), autocast(bf16):
            return unet(torch.from_numpy(x), torch.from_numpy(t)).sample.float().numpy()

    return unet, call


def load_ours(folder: Path, name: str, log):
    """Our row ``name`` as ``runtime.load`` gives it, or None where it cannot run here (OpenVINO's bf16 on a CPU
    without it; the openvino extra missing), with the reason logged."""
    import runtime

    export_name, provider, dtype = OURS[name]
    try:
        return runtime.load(folder.with_name(folder.name + EXPORTS[export_name][2]), provider, dtype=dtype,
                            log=lambda m: None)
    except runtime.ModelError as e:
        log(f"{name}: not measured ({e})")
        return None


def diffusers_runs(unet, folder: Path, batch: int):
    """The diffusers pipelines of each end-to-end row, fp32 and under bf16 autocast: name -> sampler -> run()."""
    import diffusers
    import torch

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ddim = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(config))
    dpm = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2))
    for pipe in (ddim, dpm):
        pipe.set_progress_bar_config(disable=True)

    def run(pipe, steps: int, bf16: bool, **kw):
        def go():
            with autocast(bf16):
                pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                     output_type="np", **kw)
        return go

    return {f"diffusers{'-bf16' if bf16 else ''}": {"ddim-50": run(ddim, 50, bf16, eta=0.0),
                                                    "dpmpp-2m-15": run(dpm, 15, bf16)} for bf16 in (False, True)}


def cifar10(out: Path, log) -> dict:
    from benchmarks.ceiling import cpu_matmul_gflops, cpu_matmul_gflops_bf16

    folder = out / "ddpm-cifar10-32-arch"
    params, gflop = make_pipeline(CIFAR10, folder)
    log(f"cifar10 architecture: {params / 1e6:.1f} M parameters, {gflop:.1f} GFLOP per image-step")
    exports = {name: export(folder, name, out, *UNVERIFIED.get(name, ())) for name in EXPORTS}
    threads = os.cpu_count() or 1
    ceiling = {"fp32": cpu_matmul_gflops(threads)["gflops_median"], "bf16": cpu_matmul_gflops_bf16(threads)}
    log(f"matmul: fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {ceiling['bf16']:.0f} GFLOP/s")
    unet, eager = eager_predictor(folder)
    rng = np.random.default_rng(0)
    predictor, end_to_end = {}, {}
    models = {name: m for name in OURS if (m := load_ours(folder, name, log)) is not None}
    backends = {"diffusers": eager, "diffusers-bf16": eager_predictor(folder, bf16=True)[1]}
    backends.update({name: m.backend.predict_eps for name, m in models.items()})
    for batch, calls in ((1, 20), (16, 3)):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        t = rng.integers(0, 1000, batch)
        for name, fn in backends.items():
            r = rate(lambda: fn(x, t), calls) * batch
            predictor.setdefault(name, {})[str(batch)] = r
            log(f"predictor {name} batch {batch}: {r:.2f} img-steps/s")
    for batch in (1, 16):
        runs = diffusers_runs(unet, folder, batch)
        runs.update({name: {row: (lambda m=m, s=s, k=k: m.generate(batch, batch_size=batch, sampler=s, steps=k,
                                                                    seed=0))
                            for row, (s, k) in SAMPLERS.items()} for name, m in models.items()})
        for name, rows in runs.items():
            for row, fn in rows.items():
                steps = SAMPLERS[row][1]
                cell = end_to_end.setdefault(row, {}).setdefault(name, {})
                if batch * steps / predictor[name][str(batch)] > SLOW_RUN_S:
                    cell[str(batch)] = None
                    log(f"{row} {name} batch {batch}: skipped (its predictor rate says it would take over "
                        f"{SLOW_RUN_S / 60:.0f} minutes)")
                    continue
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
                cell[str(batch)] = batch / seconds
                log(f"{row} {name} batch {batch}: {batch / seconds:.3f} images/s ({seconds:.1f} s)")
    return {"parameters": params, "gflop_per_image_step": gflop, "export_seconds": exports,
            "matmul_gflops": ceiling, "predictor_img_steps_per_s": predictor, "images_per_s": end_to_end,
            "precisions": {name: m.precision for name, m in models.items()}}


CHURCH_ROWS = ("eager", "onnx-cpu", "openvino-fp32", "openvino-bf16")


def church_worker(folder: Path, backend: str) -> None:
    """One image-step of the church model at batch 1 in this process: prints seconds and peak RSS (MB)."""
    x = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    t = np.array([500])
    if backend == "eager":
        _, fn = eager_predictor(folder)
    else:
        import runtime

        _, provider, dtype = OURS[backend]
        fn = runtime.load(folder.with_suffix(".onnx"), provider, dtype=dtype, log=lambda m: None).backend.predict_eps
    fn(x, t)
    seconds = 1.0 / rate(lambda: fn(x, t), 3)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's maxrss it does not carry the parent's over
    fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def church_model(out: Path, log) -> dict:
    folder = out / "ddpm-church-256-arch"
    params, gflop = make_pipeline(CHURCH, folder)
    log(f"church architecture: {params / 1e6:.1f} M parameters, {gflop:.1f} GFLOP per image-step")
    seconds = export(folder, "onnx", out, "--no-verify")
    rows = {}
    for backend in CHURCH_ROWS:
        result = subprocess.run([sys.executable, "-m", "benchmarks.diffusers_size", "--church-worker", backend,
                                 "--out", str(out.parent)], capture_output=True, text=True)
        if result.returncode != 0:  # OpenVINO's bf16 on a CPU without it, or the extra missing: one line, no row
            log(f"church {backend}: not measured ({(result.stderr.strip().splitlines() or ['?'])[-1]})")
            continue
        rows[backend] = json.loads(result.stdout.strip().splitlines()[-1])
        log(f"church {backend}: {rows[backend]['seconds']:.2f} s per image-step, peak RSS "
            f"{rows[backend]['peak_rss_mb']:.0f} MB")
    return {"parameters": params, "gflop_per_image_step": gflop, "onnx_export_seconds": seconds, "batch1": rows}


def _section(path: Path, measure) -> dict:
    """A section's results, saved as soon as they are measured (a later failure does not lose them); delete the
    file to measure again."""
    if path.is_file():
        return json.loads(path.read_text())
    result = measure()
    atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    return result


def targets(c: dict) -> list[str]:
    """Issue 31's targets (set for a CPU with AMX) for our best torch-free backend at batch 16, as measured here."""
    e2e = c["images_per_s"]["ddim-50"]
    ours = {n: e2e[n]["16"] for n in TORCH_FREE if n in e2e and e2e[n]["16"]}
    if not ours:
        return []
    best = max(ours, key=ours.get)
    lines = []
    for base, goal in (("diffusers", 4.0), ("diffusers-bf16", 1.5)):
        if e2e.get(base, {}).get("16"):
            ratio = ours[best] / e2e[base]["16"]
            lines.append(f"- DDIM-50 end to end, batch 16: {best} {ratio:.2f}x DDIMPipeline "
                         f"{'fp32' if base == 'diffusers' else 'bf16 autocast'} (target >= {goal}x: "
                         f"{'met' if ratio >= goal else 'not met'})")
    precision = c["precisions"][best]
    share = c["predictor_img_steps_per_s"][best]["16"] * c["gflop_per_image_step"] / c["matmul_gflops"][precision]
    lines.append(f"- {best}'s predictor at batch 16: {100 * share:.0f} % of this machine's {precision} matmul rate "
                 f"(target >= 70 % of the bf16 rate: {'met' if precision == 'bf16' and share >= 0.7 else 'not met'})")
    return lines


def markdown(r: dict) -> str:
    c = r["cifar10"]
    g = c["gflop_per_image_step"]
    rows = ["diffusers", "diffusers-bf16", *OURS]
    names = {"diffusers": "diffusers fp32 (eager UNet2DModel; DDIMPipeline / DDPMPipeline + DPMSolverMultistep)",
             "diffusers-bf16": "diffusers, bf16 autocast"}
    lines = [f"# A real-size diffusers DDPM on {r['machine']}", "", f"CPU flags: {r.get('flags', '?')}.", "",
             f"google/ddpm-cifar10-32's architecture, random weights: {c['parameters'] / 1e6:.1f} M parameters, "
             f"{g:.1f} GFLOP per image-step. `{r['command']}`, one run. This machine's matmul: "
             f"{c['matmul_gflops']['fp32']:.0f} GFLOP/s fp32, {c['matmul_gflops']['bf16']:.0f} GFLOP/s bf16.", "",
             "| backend | predictor img-steps/s, batch 1 | batch 16 | DDIM-50 images/s, batch 1 | batch 16 | "
             "DPM-Solver++(2M)-15 images/s, batch 1 | batch 16 |", "|---|---|---|---|---|---|---|"]
    for name in rows:
        p = c["predictor_img_steps_per_s"].get(name)
        if p is None:
            lines.append(f"| {names.get(name, name)} | not run here | | | | | |")
            continue
        cells = [f"{p['1']:.2f}", f"{p['16']:.2f}"]
        for row in SAMPLERS:
            e2e = c["images_per_s"][row].get(name, {})
            cells += ["skipped (too slow)" if e2e.get(b) is None else f"{e2e[b]:.3f}" for b in ("1", "16")]
        lines.append(f"| {names.get(name, name)} | {' | '.join(cells)} |")
    lines += ["", *targets(c), "", "pt2-cpu-bf16 is exported with --no-verify: on these random weights bf16 fails the "
              "trajectory check (speed only).", ""]
    ch = r.get("church")
    if ch:
        lines += [f"256² church/bedroom architecture ({ch['parameters'] / 1e6:.1f} M parameters, "
                  f"{ch['gflop_per_image_step']:.0f} GFLOP per image-step), batch 1:", "",
                  "| backend | s per image-step | peak RSS (MB) |", "|---|---|---|"]
        for name, row in ch["batch1"].items():
            lines.append(f"| {name} | {row['seconds']:.2f} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    """The CPU flags that decide bf16: AMX and AVX-512 BF16 (and AVX-512 itself)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
    have = set(flags.split(":", 1)[1].split())
    return ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in wanted)


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("benchmarks/results/diffusers-cpu-2core"), show_default=True,
              help="Results folder (models are kept under OUT/models, which git ignores).")
@click.option("--church/--no-church", default=True, help="Also the 256² church architecture at batch 1.")
@click.option("--church-worker", "worker", type=click.Choice(CHURCH_ROWS), default=None, hidden=True)
def main(out: Path, church: bool, worker: str | None) -> None:
    """Diffusers' eager UNet2DModel and DDIMPipeline against our ONNX and .pt2 exports of the same model."""
    models = out / "models"
    if worker:
        return church_worker(models / "ddpm-church-256-arch", worker)
    models.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {**machine_facts("python -m benchmarks.diffusers_size"),
               "cifar10": _section(out / "cifar10.json", lambda: cifar10(models, log))}
    if church:
        results["church"] = _section(out / "church.json", lambda: church_model(models, log))
    write_results(out, results, markdown)


def machine_facts(command: str) -> dict:
    """What a results file says of where and how it was measured."""
    return {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "flags": cpu_flags(), "command": command}


def write_results(out: Path, results: dict, markdown) -> None:
    """OUT/results.json and OUT/results.md (``markdown(results)``, also printed)."""
    atomic_write(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write(out / "results.md", markdown(results).encode())
    print(markdown(results))


if __name__ == "__main__":
    main()
