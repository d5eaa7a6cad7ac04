"""``ddpm-export``: a thin click command over ``ddpm_export.export.export_checkpoint``."""

from __future__ import annotations

import click

from ddpm_export.errors import CheckpointError, ExportError
from ddpm_export.export import ExportOptions, export_checkpoint
from ddpm_export.onnx_export import DEFAULT_OPSET
from ddpm_export.run_defaults import parse_run_defaults
from runtime.errors import ContractError

FORMATS = {"onnx": ("onnx",), "torchscript": ("torchscript",), "pt2": ("pt2",), "all": ("onnx", "torchscript")}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="onnx",
              help="What to write: ONNX (.onnx), TorchScript (.pt), an AOTInductor package (.pt2: torch.export, "
                   "compiled ahead of time; needs torch to run), or all = ONNX and TorchScript.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Output file (one format) or path stem (--format all). Default: next to the checkpoint, same stem.")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default=None,
              help="Which weights to export. Default: ema when the checkpoint has EMA weights, else raw.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version.")
@click.option("--fp16", is_flag=True,
              help="Also write <stem>.fp16.onnx for GPU execution (GroupNorm, softmax and the timestep embedding stay "
                   "fp32); verified on the CUDA provider, and reported as skipped where that cannot run.")
@click.option("--verify/--no-verify", default=True,
              help="Check the exported model against the eager U-Net (per-call ε and two short sampling trajectories, DDPM and DPM-Solver++(2M)); "
                   "a failure exits non-zero and writes no artifact.")
@click.option("--optimize", is_flag=True,
              help="Also write <stem>.opt.onnx, optimized by onnxruntime (extended level) for the CPU provider.")
@click.option("--run-defaults", "run_defaults", default=None, metavar="KEY=VALUE,...",
              help="Run settings the model recommends, stored in its contract and used by ddpm-generate and "
                   "runtime.load where they are not given: e.g. sampler=ddim,steps=50,guidance=1.5 "
                   "(keys: the run settings: sampler, steps, eta, guidance, guidance_interval=LO:HI, clip_denoised, "
                   "variance). Default: none (the runtime's defaults).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              help=".pt2: the device the package is compiled for (and verified on).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              help=".pt2: the precision the U-Net computes in (autocast; inputs and output stay float32). Reduced "
                   "precision is verified by the sampling trajectory against the fp32 eager model.")
def main(checkpoint: str, fmt: str, out: str | None, weights: str | None, opset: int, fp16: bool, verify: bool,
         optimize: bool, run_defaults: str | None, device: str, dtype: str) -> None:
    """Export a ddpm-train CHECKPOINT's U-Net to ONNX, TorchScript or an AOTInductor .pt2 package.

    Each model file carries its sampling contract (schedule, T, image shape, classes, ...), so runtimes need
    nothing else. Unless --no-verify, the export is compared with the eager model on every available
    onnxruntime provider, and a JSON report is written next to each artifact as <artifact>.report.json.
    """
    if (fp16 or optimize) and "onnx" not in FORMATS[fmt]:
        raise click.UsageError("--fp16 and --optimize apply to ONNX: use --format onnx or all")
    if (device != "cpu" or dtype != "fp32") and fmt != "pt2":
        raise click.UsageError("--device and --dtype apply to --format pt2")
    try:
        recommended = parse_run_defaults(run_defaults)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--run-defaults") from None
    options = ExportOptions(checkpoint, FORMATS[fmt], out, weights, opset, fp16, verify, optimize, recommended,
                            device=device, dtype=dtype)
    try:
        artifacts = export_checkpoint(options)
    except (CheckpointError, ExportError, ContractError) as e:
        raise click.ClickException(str(e)) from None
    for a in artifacts:
        click.echo(a.summary())


if __name__ == "__main__":
    main()
