"""``python -m benchmarks.latent_size``: real-size latent DDPMs, diffusers' pipelines against our exports.

Architectures built from their configs with random weights (nothing downloaded), saved as diffusers pipelines and
exported with ``ddpm-export`` (ONNX: the denoiser and its decoder beside it):

* DiT-S/2 at 256² (facebook/DiT-XL-2-256's recipe at DiT-S/2's width and depth: 4×32×32 latents, the same
  ``AutoencoderKL``, sd-vae-ft-ema's config). DiT-XL-2 itself: one guided image-step of diffusers' eager transformer
  only (its 2.7 GB of fp32 weights are over ONNX's 2 GB limit for one file, and DDIM-50 of it takes minutes an image
  on two cores);
* LDM-CelebA-HQ-256 (CompVis/ldm-celebahq-256's ``UNet2DModel`` and ``VQModel`` configs; exported with --no-verify:
  a random codebook lies far from a random U-Net's latents, where the quantizer's float32 ties decide, see
  docs/models-from-elsewhere.md).

Each row runs in its own process (its peak memory is the process's): images/s end to end, the seconds spent
denoising and decoding, peak RSS. DiT: ``DiTPipeline`` DDIM-50 with guidance 4 at batch 1 and 4 in fp32 against
``runtime.load(model, provider).generate`` (onnxruntime, OpenVINO fp32 and bf16: the same ONNX files) with DDIM-50
(the scheduler's leading spacing) and DPM-Solver++(2M)-15, guidance 4. LDM: ``LDMPipeline`` DDIM-50 at batch 1.

Writes OUT/results.json and OUT/results.md (each section as it finishes: OUT/dit.json, OUT/ldm.json, reused until
deleted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from benchmarks.diffusers_size import _section, machine_facts, peak_rss_mb, write_results

DIT_S = dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
             sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
DIT_XL = {**DIT_S, "num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28}
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
LDM_UNET = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
                block_out_channels=(224, 448, 672, 896), down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
                up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",), attention_head_dim=32)
LDM_VQ = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(128, 256, 512), layers_per_block=2,
              latent_channels=3, num_vq_embeddings=8192, sample_size=256)
GUIDANCE = 4.0
OURS = {"onnx-cpu": ("cpu", None), "openvino-fp32": ("openvino", "fp32"), "openvino-bf16": ("openvino", "bf16")}
SAMPLERS = {"ddim-50": ("ddim", 50), "dpmpp-2m-15": ("dpmpp-2m", 15)}


def scheduler():
    import diffusers

    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                   clip_sample=False)


def make_dit(folder: Path) -> int:
    import diffusers
    import torch

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(**DIT_S).eval()
    if not (folder / "model_index.json").is_file():
        diffusers.DiTPipeline(transformer=dit, vae=diffusers.AutoencoderKL(**SD_VAE).eval(),
                              scheduler=scheduler()).save_pretrained(folder)
    return sum(p.numel() for p in dit.parameters())


def make_ldm(folder: Path) -> int:
    import diffusers
    import torch
    from diffusers.pipelines.deprecated.latent_diffusion_uncond.pipeline_latent_diffusion_uncond import LDMPipeline

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**LDM_UNET).eval()
    if not (folder / "model_index.json").is_file():
        LDMPipeline(vqvae=diffusers.VQModel(**LDM_VQ).eval(), unet=unet, scheduler=scheduler()).save_pretrained(folder)
    return sum(p.numel() for p in unet.parameters())


def export(folder: Path, *extra: str) -> float:
    path = folder.with_suffix(".onnx")
    t0 = time.perf_counter()
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "ddpm_export.cli", str(folder), "--out", str(path), *extra], check=True)
    return time.perf_counter() - t0


class Timed:
    """``fn`` with the seconds spent in it added up."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t0


def worker(kind: str, folder: Path, row: str, sampler: str, batch: int) -> dict:
    """One end-to-end run (after a warm-up run of one image) in this process: seconds, the decode's share, peak RSS."""
    if row == "diffusers":
        import torch

        if kind == "dit":
            import diffusers

            pipe = diffusers.DiTPipeline.from_pretrained(folder)
            decoder = "vae"

            def run(n):
                pipe(class_labels=list(range(n)), guidance_scale=GUIDANCE, num_inference_steps=50,
                     generator=torch.Generator().manual_seed(0), output_type="np")
        else:
            from diffusers.pipelines.deprecated.latent_diffusion_uncond.pipeline_latent_diffusion_uncond import (
                LDMPipeline,
            )

            pipe = LDMPipeline.from_pretrained(folder)
            decoder = "vqvae"

            def run(n):
                pipe(batch_size=n, num_inference_steps=50, generator=torch.Generator().manual_seed(0),
                     output_type="np")
        pipe.set_progress_bar_config(disable=True)
        module = getattr(pipe, decoder)
        timed = module.decode = Timed(module.decode)
    else:
        import runtime

        provider, dtype = OURS[row]
        model = runtime.load(folder.with_suffix(".onnx"), provider, dtype=dtype, log=lambda m: None)
        name, steps = SAMPLERS[sampler]
        guided = dict(guidance=GUIDANCE) if model.contract.guidable else {}
        timed = model.backend.decode = Timed(model.backend.decode)

        def run(n):
            model.generate(n, batch_size=n, sampler=name, steps=steps, **guided)
    run(1)
    timed.seconds = 0.0
    t0 = time.perf_counter()
    run(batch)
    seconds = time.perf_counter() - t0
    return {"images_per_s": batch / seconds, "seconds": seconds, "decode_seconds": timed.seconds,
            "denoise_seconds": seconds - timed.seconds, "peak_rss_mb": peak_rss_mb()}


def measure(kind: str, folder: Path, rows: list[tuple[str, str, int]], log) -> dict:
    out = {}
    for row, sampler, batch in rows:
        key = f"{row} {sampler} batch {batch}"
        result = subprocess.run([sys.executable, "-m", "benchmarks.latent_size", "--worker", kind, row, sampler,
                                 str(batch), "--out", str(folder.parent.parent)], capture_output=True, text=True)
        if result.returncode != 0:  # OpenVINO's bf16 on a CPU without it: one line, no row
            log(f"{kind} {key}: not measured ({(result.stderr.strip().splitlines() or ['?'])[-1]})")
            continue
        out[key] = json.loads(result.stdout.strip().splitlines()[-1])
        r = out[key]
        log(f"{kind} {key}: {r['images_per_s']:.3f} images/s (denoise {r['denoise_seconds']:.1f} s, decode "
            f"{r['decode_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB")
    return out


def dit(models: Path, log) -> dict:
    folder = models / "dit-s-2-256"
    params = make_dit(folder)
    log(f"DiT-S/2 256: {params / 1e6:.1f} M parameters (transformer)")
    seconds = export(folder)
    rows = [("diffusers", "ddim-50", b) for b in (1, 4)]
    rows += [(row, s, b) for row in OURS for s in SAMPLERS for b in (1, 4)]
    return {"parameters": params, "onnx_export_seconds": seconds, "rows": measure("dit", folder, rows, log),
            "xl_guided_step_seconds": xl_step(log)}


def xl_step(log) -> dict:
    """DiT-XL-2-256's eager transformer: seconds per guided image-step (batch 2: the image and its null-class row)."""
    import diffusers
    import torch

    torch.manual_seed(0)
    xl = diffusers.DiTTransformer2DModel(**DIT_XL).eval()
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([500, 500]), torch.tensor([1, 1000])
    with torch.no_grad():
        xl(x, timestep=t, class_labels=y)
        t0 = time.perf_counter()
        for _ in range(3):
            xl(x, timestep=t, class_labels=y)
    seconds = (time.perf_counter() - t0) / 3
    params = sum(p.numel() for p in xl.parameters())
    log(f"DiT-XL/2 256: {params / 1e6:.0f} M parameters, {seconds:.2f} s per guided image-step (eager fp32)")
    return {"parameters": params, "seconds": seconds}


def ldm(models: Path, log) -> dict:
    folder = models / "ldm-celebahq-256"
    params = make_ldm(folder)
    log(f"LDM-CelebA-HQ-256: {params / 1e6:.1f} M parameters (U-Net)")
    seconds = export(folder, "--no-verify")
    rows = [("diffusers", "ddim-50", 1), ("onnx-cpu", "ddim-50", 1), ("openvino-bf16", "ddim-50", 1)]
    return {"parameters": params, "onnx_export_seconds": seconds, "rows": measure("ldm", folder, rows, log)}


def markdown(r: dict) -> str:
    lines = [f"Machine: {r['machine']} ({r['flags']}); `{r['command']}`.", ""]
    for name, title in (("dit", "DiT-S/2 256 (guidance 4)"), ("ldm", "LDM-CelebA-HQ-256 (unconditional)")):
        if name not in r:
            continue
        lines += [f"**{title}**, {r[name]['parameters'] / 1e6:.1f} M denoiser parameters:", "",
                  "| run | images/s | denoise s | decode s | peak RSS (MB) |", "|---|---:|---:|---:|---:|"]
        for key, row in r[name]["rows"].items():
            lines.append(f"| {key} | {row['images_per_s']:.3f} | {row['denoise_seconds']:.1f} | "
                         f"{row['decode_seconds']:.1f} | {row['peak_rss_mb']:.0f} |")
        lines.append("")
    if "dit" in r:
        xl = r["dit"]["xl_guided_step_seconds"]
        lines.append(f"DiT-XL/2 256 ({xl['parameters'] / 1e6:.0f} M parameters): {xl['seconds']:.2f} s per guided "
                     "image-step in diffusers' eager fp32 transformer.")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("benchmarks/results/latent-cpu-2core"), show_default=True,
              help="Results folder (models are kept under OUT/models, which git ignores).")
@click.option("--ldm/--no-ldm", "with_ldm", default=True, help="Also the LDM-CelebA-HQ-256 row.")
@click.option("--worker", "worker_args", nargs=4, default=None, hidden=True)
def main(out: Path, with_ldm: bool, worker_args: tuple | None) -> None:
    """DiT and LDM at real size: diffusers' pipelines against our exports, end to end."""
    models = out / "models"
    if worker_args:
        kind, row, sampler, batch = worker_args
        folder = models / ("dit-s-2-256" if kind == "dit" else "ldm-celebahq-256")
        print(json.dumps(worker(kind, folder, row, sampler, int(batch))))
        return
    models.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {**machine_facts("python -m benchmarks.latent_size"),
               "dit": _section(out / "dit.json", lambda: dit(models, log))}
    if with_ldm:
        results["ldm"] = _section(out / "ldm.json", lambda: ldm(models, log))
    write_results(out, results, markdown)


if __name__ == "__main__":
    main()
