"""``ddpm-export``: a thin click command over ``ddpm_export.export.export_checkpoint`` (a checkpoint or a diffusers
folder)."""

from __future__ import annotations

import click

from ddpm_export.errors import CheckpointError, ExportError, SourceError
from ddpm_export.export import ExportOptions, export_checkpoint
from ddpm_export.onnx_export import DEFAULT_OPSET
from ddpm_export.run_defaults import parse_run_defaults
from runtime.backends.precision import PRECISIONS
from runtime.backends.registry import FORMATS as WRITTEN
from runtime.errors import ContractError

FORMATS = {**{f: (f,) for f in WRITTEN}, "all": ("onnx", "torchscript")}  # --format: each format, or the classic two


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("source", metavar="SOURCE", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="onnx",
              help="What to write: ONNX (.onnx), TorchScript (.pt), an AOTInductor package (.pt2: torch.export, "
                   "compiled ahead of time; needs torch to run), or all = ONNX and TorchScript.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Output file (one format) or path stem (--format all). Default: beside SOURCE, same name.")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default=None,
              help="ddpm-train checkpoints: which weights to export. Default: ema when the checkpoint has EMA "
                   "weights, else raw.")
@click.option("--scheduler-config", type=click.Path(dir_okay=False), default=None,
              help="diffusers: the scheduler config (DDPMScheduler or DDIMScheduler) of a bare UNet2DModel folder, "
                   "or one that replaces a pipeline's. Default: scheduler/scheduler_config.json of a pipeline, "
                   "scheduler_config.json beside a UNet2DModel's config.json.")
@click.option("--null-class", type=int, default=None, metavar="K",
              help="diffusers, class-conditional models: the label the model was trained with for 'no class' "
                   "(classifier-free guidance); it must be the last of num_class_embeds. Default: none, and "
                   "guidance is refused for the model.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version.")
@click.option("--dtype", type=click.Choice(PRECISIONS), default="fp32",
              help="Precision: fp16 also writes <stem>.fp16.onnx for GPU execution (GroupNorm, softmax and the "
                   "timestep embedding stay fp32; verified on the CUDA provider, reported as skipped where that "
                   "cannot run); for .pt2 the precision the network computes in (bf16 or fp16 autocast; inputs "
                   "and output stay float32), verified by the sampling trajectories against the fp32 eager model. "
                   "TorchScript is fp32.")
@click.option("--fp16", is_flag=True, help="The same as --dtype fp16.")
@click.option("--verify/--no-verify", default=True,
              help="Check the exported model against the eager network (per-call output and two short sampling "
                   "trajectories, DDPM and DPM-Solver++(2M)), loaded as runtime.load loads it; a failure exits "
                   "non-zero and writes no artifact.")
@click.option("--optimize", is_flag=True,
              help="Also write <stem>.opt.onnx, optimized by onnxruntime (extended level) for the CPU provider.")
@click.option("--run-defaults", "run_defaults", default=None, metavar="KEY=VALUE,...",
              help="Run settings the model recommends, stored in its contract and used by ddpm-generate and "
                   "runtime.load where they are not given: e.g. sampler=ddim,steps=50,guidance=1.5 "
                   "(keys: the run settings, as ddpm-generate's options with _ for -; guidance_interval=LO:HI). "
                   "They replace the source's own (a diffusers scheduler's clipping and spacing). Default: the "
                   "source's (none for a checkpoint: the runtime's defaults).")
@click.option("--device", type=click.Choice([p.name for p in WRITTEN["pt2"].providers]), default="cpu",
              help=".pt2: the device the package is compiled for (and verified on).")
def main(source: str, fmt: str, out: str | None, weights: str | None, scheduler_config: str | None,
         null_class: int | None, opset: int, dtype: str, fp16: bool, verify: bool, optimize: bool,
         run_defaults: str | None, device: str) -> None:
    """Export a model to ONNX, TorchScript or an AOTInductor .pt2 package, verified against the original.

    SOURCE is a ddpm-train checkpoint (.ckpt), or a diffusers folder: a DDPM pipeline (model_index.json, unet/,
    scheduler/), a latent one (DiTPipeline: transformer/, vae/; LDMPipeline: unet/, vqvae/; or unet/ and vae/) or a
    bare UNet2DModel (config.json and diffusion_pytorch_model.safetensors or .bin, with --scheduler-config or a
    scheduler_config.json beside it). Each model file carries its sampling contract (schedule, T, prediction type,
    image shape, classes, recommended settings), so runtimes need nothing else; a latent model's ONNX file has its
    decoder beside it (<stem>.decoder.onnx, bound by its SHA-256), a .pt2 holds both.
    Unless --no-verify, the export is compared with the eager model on every available backend, and a JSON
    report is written next to each artifact as <artifact>.report.json.
    """
    if fp16 and dtype not in ("fp32", "fp16"):
        raise click.UsageError(f"--fp16 is --dtype fp16; it cannot be combined with --dtype {dtype}")
    if optimize and "onnx" not in FORMATS[fmt]:
        raise click.UsageError("--optimize applies to ONNX: use --format onnx or all")
    if device != "cpu" and fmt != "pt2":
        raise click.UsageError("--device applies to --format pt2")
    try:
        recommended = parse_run_defaults(run_defaults)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--run-defaults") from None
    options = ExportOptions(source, FORMATS[fmt], out, weights, opset, fp16, verify, optimize, recommended,
                            device=device, dtype="fp16" if fp16 else dtype, scheduler_config=scheduler_config,
                            null_class=null_class)
    try:
        artifacts = export_checkpoint(options)
    except (CheckpointError, SourceError, ExportError, ContractError) as e:
        raise click.ClickException(str(e)) from None
    for a in artifacts:
        click.echo(a.summary())


if __name__ == "__main__":
    main()
