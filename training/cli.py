"""``ddpm-train``: a thin click command over ``training.train.train``; the model flags become a ``ModelConfig``."""

from __future__ import annotations

import sys

import click

from runtime.sampling import samplers
from runtime.sampling.settings import SAMPLERS, RunSettings
from training.config import GRID_SAMPLER, TRAINABLE_SCHEDULES, ModelConfig
from training.console import main_process
from training.errors import RankLost, TrainInterrupted
from training.train import TrainError, TrainOptions, train

# The flags that define the model (``ModelConfig``'s fields; --timesteps is t_range), apart from run flags.
MODEL_FLAGS = ("lr", "schedule", "timesteps", "base_channels", "channel_mult", "num_res_blocks", "dropout",
               "p_uncond", "ema_decay", "run_defaults")


def _run_defaults(ctx, param, value: str | None) -> dict | None:
    try:
        given = RunSettings.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return None if given is None else given.given()  # ModelConfig keeps them as plain data


def _int_list(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        items = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not items or min(items) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return items


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--dataset", required=True,
              type=click.Choice(["mnist", "fashion-mnist", "celeba", "folder"], case_sensitive=False),
              help="Training data: MNIST / FashionMNIST (28x28 padded to 32x32), CelebA (center-cropped, resized) "
                   "or a folder of images.")
@click.option("--data-root", default="data", type=click.Path(file_okay=False),
              help="Where the data lies: a folder of IDX .gz files, torchvision's layout, CelebA's img_align_celeba/, "
                   "or the image folder.")
@click.option("--download", is_flag=True,
              help="Download MNIST/FashionMNIST/CelebA with torchvision's downloader into --data-root "
                   "(needs a network).")
@click.option("--image-size", default=32, type=click.IntRange(min=8),
              help="Side of the square training images in pixels.")
@click.option("--channels", type=int, default=None,
              help="Image channels, 1 or 3 (default: the dataset's own; folder and CelebA are converted).")
@click.option("--batch-size", default=128, type=click.IntRange(min=1), help="Images per optimizer step (per device).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimizer steps (counted from step 0, also when resuming).")
@click.option("--max-epochs", type=click.IntRange(min=1), default=None,
              help="Stop after this many epochs (default: 1 when --max-steps is not given).")
@click.option("--lr", default=2e-4, type=click.FloatRange(min=0, min_open=True), help="Adam learning rate.")
@click.option("--schedule", default="linear", type=click.Choice(TRAINABLE_SCHEDULES),
              help="Noise schedule: linear beta 1e-4..0.02 (Ho et al.), scaled_linear (sqrt(beta) linear, "
                   "0.00085..0.012), cosine (Nichol & Dhariwal) or sigmoid (GeoDiff, beta 1e-4..0.02); "
                   "runtime/sampling/schedule.py has the formulas.")
@click.option("--timesteps", default=1000, type=click.IntRange(min=2), help="Diffusion steps T.")
@click.option("--base-channels", default=32, type=click.IntRange(min=1), help="U-Net channels at full resolution.")
@click.option("--channel-mult", default="1,2,2", callback=_int_list,
              help="Channel multiplier per U-Net level (comma-separated); "
                   "each level after the first halves the resolution.")
@click.option("--num-res-blocks", default=2, type=click.IntRange(min=1), help="Residual blocks per U-Net level.")
@click.option("--attention-resolutions", default="16,8",
              help="Resolutions (pixels) with self-attention, comma-separated, or 'none'.")
@click.option("--dropout", default=0.1, type=click.FloatRange(0, 1, max_open=True),
              help="Dropout in the residual blocks.")
@click.option("--num-classes", type=click.IntRange(min=0), default=None,
              help="Train class-conditional with this many classes (0: unconditional).")
@click.option("--conditional", is_flag=True, help="Train class-conditional on the dataset's own classes.")
@click.option("--p-uncond", default=0.1, type=click.FloatRange(0, 1, max_open=True),
              help="Probability of dropping the label (classifier-free guidance).")
@click.option("--ema-decay", default=0.999, type=click.FloatRange(0, 1, max_open=True),
              help="EMA decay of the weights (0: no EMA).")
@click.option("--precision", default="32", type=click.Choice(["32", "bf16-mixed", "16-mixed"]),
              help="Lightning precision; 16-mixed needs a CUDA GPU.")
@click.option("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu.")
@click.option("--devices", default="auto", help="Lightning devices: auto, a count, or a comma-separated list of ids.")
@click.option("--strategy", default="auto", help="Lightning strategy, e.g. ddp for multi-GPU.")
@click.option("--num-nodes", default=1, type=click.IntRange(min=1), help="Machines for multi-node DDP.")
@click.option("--num-workers", default=0, type=click.IntRange(min=0), help="DataLoader worker processes.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch CPU threads (default: torch's choice).")
@click.option("--seed", default=0, type=int, help="Random seed for weights, data order and noise.")
@click.option("--out", "out_dir", default="runs/ddpm", type=click.Path(file_okay=False),
              help="Run folder: checkpoints/, samples/, logs/.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue from this checkpoint: its model, step, optimizer and EMA state "
                   "(model flags are taken from it). "
                   "A checkpoint saved mid-epoch finishes that epoch on a fresh shuffle of the data: some of the "
                   "epoch's images come twice, others not until the next epoch.")
@click.option("--checkpoint-every", default=500, type=click.IntRange(min=1),
              help="Write checkpoints/last.ckpt every N steps.")
@click.option("--sample-every", default=0, type=click.IntRange(min=0),
              help="Write a sample grid every N steps (0: only at the end).")
@click.option("--sample-sampler", default=GRID_SAMPLER, type=click.Choice(SAMPLERS),
              help="Sampler of the grids: a fast one by default, so a grid costs seconds, "
                   "not the minutes of DDPM at all T steps.")
@click.option("--sample-steps", default=None, type=click.IntRange(min=1),
              help=f"Sampling steps of the grids (default: {GRID_SAMPLER}'s "
                   f"{samplers.SAMPLERS[GRID_SAMPLER].default_steps}; for ddpm T).")
@click.option("--guidance", default=1.0, type=float,
              help="Classifier-free guidance scale for the grids of conditional models.")
@click.option("--run-defaults", default=None, metavar="KEY=VALUE,...", callback=_run_defaults,
              help="Run settings the model recommends (e.g. sampler=dpmpp-2m,steps=20,guidance=2): kept in every "
                   "checkpoint, so every export samples with them by default (ddpm-export --run-defaults replaces "
                   "given keys; on --resume, given ones replace the checkpoint's).")
def main(**kwargs) -> None:
    """Train a DDPM (Ho et al. 2020) with PyTorch Lightning.

    Checkpoints go to OUT/checkpoints/ (the newest is always OUT/checkpoints/last.ckpt), sample grids to
    OUT/samples/, and the loss to OUT/logs/ (CSV). The path of the last checkpoint is printed at the end.
    SIGTERM or Ctrl-C stops the run after the training step in progress (or at the next sampling step of a grid
    being drawn), writes OUT/checkpoints/last.ckpt and prints the --resume line to go on; a second one stops at once.
    Under DDP (e.g. --devices 2 --strategy ddp) the ranks stop together, and only global rank 0 writes files and
    prints these lines.
    """
    att = kwargs.pop("attention_resolutions")
    attention = () if att.strip().lower() in ("", "none") else _int_list(None, None, att)
    flags = {name: kwargs.pop(name) for name in MODEL_FLAGS}
    try:
        # Image size, channels, classes and the data set's name come from the data (or from --resume).
        try:
            model = ModelConfig(t_range=flags.pop("timesteps"), attention_resolutions=attention, **flags)
        except ValueError as e:
            raise TrainError(str(e)) from None
        last = train(TrainOptions(model=model, **kwargs))
    except TrainError as e:
        raise click.UsageError(str(e)) from None
    except TrainInterrupted as e:
        if not main_process():  # under DDP rank 0 says it and exits 1; a rank Lightning started that exits
            return  # non-zero reads to Lightning as a crash, and it kills rank 0 (SIGKILL) before rank 0 is done
        raise click.ClickException(str(e)) from None
    except RankLost as e:  # whichever rank is left says it (rank 0 may be the one that ended)
        raise click.ClickException(str(e)) from None
    if main_process():
        click.echo(str(last))


if __name__ == "__main__":
    sys.exit(main())
