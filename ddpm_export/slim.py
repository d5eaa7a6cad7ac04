"""``python -m ddpm_export.slim CKPT OUT``: a weights-only copy of a checkpoint (EMA weights, hyperparameters, step).

No optimizer state, no raw weights, no Lightning loop state: small enough to ship, and still a checkpoint that
``ddpm-export`` reads (it takes the EMA weights, which is its default).
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ddpm_export.checkpoint import EMA_PREFIX, load_checkpoint
from ddpm_export.errors import CheckpointError
from runtime.files import atomic_path


def slim_checkpoint(src: str | Path, dst: str | Path) -> int:
    """Write the slim copy of ``src`` to ``dst`` (atomically); returns its size in bytes."""
    ckpt = load_checkpoint(src)
    if not ckpt.has_ema:
        raise CheckpointError(f"{src} has no EMA weights to keep")
    data = {
        "state_dict": {k: v.clone() for k, v in ckpt.state_dict.items() if k.startswith(EMA_PREFIX)},
        "hyper_parameters": ckpt.hparams,
        "global_step": ckpt.global_step,
    }
    with atomic_path(dst) as tmp:
        torch.save(data, tmp)
    return Path(dst).stat().st_size


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def main(checkpoint: str, out: str) -> None:
    """Write a weights-only (EMA) copy of CHECKPOINT to OUT."""
    try:
        size = slim_checkpoint(checkpoint, out)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
