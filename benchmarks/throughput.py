"""``python -m benchmarks.throughput``: eager vs TorchScript vs ONNX Runtime vs OpenVINO throughput against this
machine's ceiling (each row's own precision: bf16 rows against the bf16 matmul rate).

Same model, same machine, same run, same thread count; every backend runs in a process of its own
(``benchmarks.worker``), one after another. Writes OUT/results.json, OUT/results.md and OUT/throughput.png.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

# onnx-PROVIDER[-PRECISION][-fused]: the ONNX file on a provider of the backend registry (benchmarks.worker)
CPU_BACKENDS = ("eager", "torchscript", "onnx-cpu", "onnx-cpu-fused", "onnx-openvino-fp32", "onnx-openvino-bf16",
                "pt2-cpu", "pt2-cpu-bf16", "compile")
GPU_BACKENDS = ("eager-cuda", "compile-cuda", "onnx-cuda", "onnx-cuda-fused", "onnx-tensorrt", "pt2-cuda",
                "pt2-cuda-bf16")
DEFAULT_CPU = ("eager", "torchscript", "onnx-cpu", "onnx-openvino-fp32", "onnx-openvino-bf16")  # the pt2 rows compile
# first (about a minute each): ask for them; the OpenVINO rows run where the extra (and, for bf16, the CPU) allows
PT2_TARGETS = {"pt2-cpu": ("cpu", "fp32"), "pt2-cpu-bf16": ("cpu", "bf16"), "pt2-cuda": ("cuda", "fp32"),
               "pt2-cuda-bf16": ("cuda", "bf16")}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_checkpoint(path: Path) -> Path:
    """A model of the default training configuration (``DiffusionModel()``), weights randomised (not zero-init)."""
    import torch

    from training.model import DiffusionModel

    torch.manual_seed(0)
    model = DiffusionModel()
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.ema.module.load_state_dict(model.unet.state_dict())
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": 0}, path)
    return path


def prepare(checkpoint: Path | None, model_dir: Path, backends: list[str]) -> None:
    """The checkpoint and its verified exports in ``model_dir``: ONNX, TorchScript and the .pt2 packages asked for."""
    from benchmarks.worker import PT2_FILES
    from ddpm_export.export import ExportOptions, export_checkpoint

    ckpt = model_dir / "model.ckpt"
    if checkpoint is None:
        default_checkpoint(ckpt)
    else:
        shutil.copyfile(checkpoint, ckpt)
    export_checkpoint(ExportOptions(ckpt, ("onnx", "torchscript"), out=model_dir / "model", log=lambda m: None))
    for backend in [b for b in backends if b in PT2_TARGETS]:
        device, dtype = PT2_TARGETS[backend]
        export_checkpoint(ExportOptions(ckpt, ("pt2",), out=model_dir / PT2_FILES[backend], device=device,
                                        dtype=dtype, log=lambda m: None))


def unavailable(backend: str) -> str | None:
    """Why an OpenVINO row cannot run here (the extra missing, no bf16 on this CPU), else None."""
    if "openvino" not in backend:
        return None
    try:
        import openvino
    except ImportError:
        return "needs the openvino extra"
    from runtime.backends.openvino_model import cpu_bf16

    return "OpenVINO computes no bf16 on this CPU" if "bf16" in backend and not cpu_bf16(openvino.Core()) else None


def gpu_available() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, torch.cuda.get_device_name()


def run_worker(backend: str, model_dir: Path, batch_sizes: list[int], threads: int, repeats: int, loop_steps: int,
               e2e_n: int) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.worker", "--backend", backend, "--model-dir", str(model_dir),
           "--batch-sizes", ",".join(map(str, batch_sizes)), "--threads", str(threads), "--repeats", str(repeats),
           "--loop-steps", str(loop_steps), "--e2e-n", str(e2e_n)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    if r.returncode != 0:
        raise click.ClickException(f"the {backend} worker failed (exit {r.returncode}); its error is above")
    return json.loads(r.stdout)


def targets(records: list[dict], ceiling_rate: float) -> list[dict]:
    """The issue's targets for this CPU, measured in this run."""
    by = {(r["backend"], r["batch_size"]): r for r in records if not r.get("end_to_end")}
    out = []
    for b, goal in ((1, 1.5), (64, 1.2)):
        if ("onnx-cpu", b) in by and ("eager", b) in by:
            ratio = by[("onnx-cpu", b)]["img_steps_per_s"] / by[("eager", b)]["img_steps_per_s"]
            out.append({"target": f"ONNX Runtime ≥ {goal}× eager at batch {b}", "measured": f"{ratio:.2f}×",
                        "met": ratio >= goal})
    big = [r for (k, b), r in by.items() if k == "onnx-cpu" and b >= 64]
    if big:
        best = max(r["efficiency"] for r in big)
        out.append({"target": "ONNX Runtime at batch ≥ 64 reaching ≥ 85 % of the matmul ceiling",
                    "measured": f"{100 * best:.0f} %", "met": best >= 0.85})
    shares = [r["sampler_share"]["median"] for (k, _), r in by.items() if k == "onnx-cpu" and r["sampler_share"]]
    if shares:
        worst = max(shares)
        out.append({"target": "sampler's own share of a step ≤ 3 % (onnx-cpu, worst batch)",
                    "measured": f"{100 * worst:.1f} %", "met": worst <= 0.03})
    return out


def ratios(records: list[dict], base: str = "onnx-cpu") -> list[dict]:
    """Each other row's predictor rate over ``base``'s at the same batch size (same run, same threads)."""
    by = {(r["backend"], r["batch_size"]): r for r in records if not r.get("end_to_end")}
    return [{"backend": k, "batch_size": b, "over": base,
             "ratio": r["img_steps_per_s"] / by[(base, b)]["img_steps_per_s"]}
            for (k, b), r in by.items() if k != base and (base, b) in by]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A ddpm-train checkpoint. Default: a model of the default training configuration.")
@click.option("--backends", default=None,
              help=f"Comma-separated, from {', '.join(CPU_BACKENDS + GPU_BACKENDS)}. Default: "
                   f"{', '.join(DEFAULT_CPU)}, plus the GPU ones on a GPU.")
@click.option("--batch-sizes", default="1,16,64,256", help="Comma-separated batch sizes.")
@click.option("--threads", type=click.IntRange(min=1), default=os.cpu_count(), help="Threads for every backend.")
@click.option("--repeats", type=click.IntRange(min=5), default=5, help="Timed repeats per measurement (after warm-up).")
@click.option("--loop-steps", type=click.IntRange(min=1), default=10, help="Sampler steps per timed loop.")
@click.option("--quick", is_flag=True, help="Batch sizes 1,16,64, 5 loop steps: under 3 minutes on a 2-core CPU.")
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/results/latest", help="Output folder.")
def main(checkpoint, backends, batch_sizes, threads, repeats, loop_steps, quick, out) -> None:
    """Measure image-steps/s of the noise predictor and of the runtime's sampling loop per backend and batch size."""
    import torch

    from benchmarks.ceiling import cpu_matmul_gflops, flops_per_image_step, gpu_ceiling
    from benchmarks.report import markdown, plot
    from ddpm_export.checkpoint import load_checkpoint

    if quick:
        batch_sizes, loop_steps = "1,16,64", 5
    sizes = [int(b) for b in batch_sizes.split(",")]
    has_gpu, gpu = gpu_available()
    wanted = backends.split(",") if backends else list(DEFAULT_CPU + (GPU_BACKENDS if has_gpu else ()))
    unknown = [b for b in wanted if b not in CPU_BACKENDS + GPU_BACKENDS]
    if unknown:
        raise click.UsageError(f"unknown backend(s): {', '.join(unknown)}")
    skipped = [{"backend": b, "reason": gpu} for b in GPU_BACKENDS if not has_gpu]
    skipped += [{"backend": b, "reason": why} for b in wanted if (why := unavailable(b))]
    wanted = [b for b in wanted if (b in CPU_BACKENDS or has_gpu) and not unavailable(b)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        click.echo("exporting the model ...", err=True)
        prepare(Path(checkpoint) if checkpoint else None, model_dir, wanted)
        ckpt = load_checkpoint(model_dir / "model.ckpt")
        net, _ = ckpt.build_unet()
        contract = ckpt.contract(ema=True)
        flops = flops_per_image_step(net, contract.channels, contract.image_size, contract.conditional)
        click.echo("measuring the matmul ceiling ...", err=True)
        ceiling = cpu_matmul_gflops(threads)
        gpu_info = gpu_ceiling() if has_gpu else None
        torch.set_num_threads(1)
        records = []
        for backend in wanted:
            click.echo(f"{backend} ...", err=True)
            e2e = min(sizes, key=lambda b: abs(b - 16)) if backend == "onnx-cpu" else 0  # one batch of ~16 images
            records += run_worker(backend, model_dir, sizes, threads, repeats, loop_steps, e2e)
    ceiling_rate = ceiling["gflops_median"] * 1e9 / flops
    for r in records:
        if r.get("end_to_end"):
            loop = next((x for x in records if x["backend"] == "onnx-cpu" and x.get("batch_size") == r["batch_size"]
                         and not x.get("end_to_end")), None)
            rate = loop["loop"]["median"] if loop else None
            r["extrapolated_images_per_s"] = rate / r["steps"] if rate else float("nan")
            continue
        r["gflops_per_s"] = r["img_steps_per_s"] * flops / 1e9
        on_gpu = gpu_info is not None and r["backend"] in GPU_BACKENDS
        ceil = gpu_info["fp32_gemm_gflops"] if on_gpu else (r.get("cpu_ceiling_gflops") or ceiling["gflops_median"])
        r["efficiency"] = r["gflops_per_s"] / ceil
    import onnxruntime

    cfg = ckpt.unet_config()
    results = {
        "model": (f"U-Net {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M params, base {cfg.base_channels}, "
                  f"mult {list(cfg.channel_mult)}, {cfg.in_channels}x{cfg.image_size}x{cfg.image_size}"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(), "gpu": gpu_info},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": __import__("numpy").__version__},
        "threads": threads, "flops_per_image_step": flops, "ceiling": ceiling,
        "ceiling_img_steps_per_s": ceiling_rate, "records": records, "skipped": skipped,
        "settings": {"batch_sizes": sizes, "repeats": repeats, "loop_steps": loop_steps, "quick": quick},
    }
    results["versions_line"] = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    results["targets"] = targets(records, ceiling_rate)
    results["ratios"] = ratios(records)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "throughput.png")
    click.echo((out / "results.md").read_text())


if __name__ == "__main__":
    main()
