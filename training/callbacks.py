"""``SampleGrid``: a Lightning callback that writes a grid of samples every N steps and at the end of training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torchvision.utils import save_image

from runtime.errors import GenerationError
from runtime.files import atomic_path
from training.config import GRID_SAMPLER
from training.interrupt import StopOnSignal, StopRequested


class SampleGrid(pl.Callback):
    """Writes ``out_dir/step_XXXXXXX.png`` (and ``out_dir/last.png`` at the end) from ``model.sample``.

    Conditional models get ``per_class`` images of each class, one column per class; unconditional models
    ``n_samples`` images, drawn with ``sampler`` in ``steps`` (None: the sampler's default; T for ddpm).
    ``guidance`` applies to conditional models only. ``every_n_steps`` = 0 writes only at
    the end. Only global rank 0 samples; a grid appears whole or not at all. With ``stop``, a stop request
    (SIGTERM, Ctrl-C) ends the grid being drawn at its next sampling step, and no grid is written.
    """

    def __init__(self, out_dir: str | Path, every_n_steps: int = 0, n_samples: int = 16, per_class: int = 4,
                 sampler: str = GRID_SAMPLER, steps: int | None = None, guidance: float = 1.0, seed: int = 0,
                 stop: StopOnSignal | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.n_samples, self.per_class = n_samples, per_class
        self.sampler, self.steps, self.guidance, self.seed = sampler, steps, guidance, seed
        self.stop = stop
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.write(trainer, pl_module, self.out_dir / f"step_{step:07d}.png")

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.write(trainer, pl_module, self.out_dir / "last.png")

    def write(self, trainer: pl.Trainer, pl_module, path: Path) -> None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        k = pl_module.num_classes
        n, nrow = (k * self.per_class, k) if k > 0 else (self.n_samples, max(1, int(self.n_samples ** 0.5)))
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        guidance = self.guidance if k > 0 else 1.0
        stop = self.stop
        try:
            if stop is not None:
                stop.check()  # asked before the grid began: no grid
            images = pl_module.sample(n, sampler=self.sampler, steps=self.steps, guidance=guidance,
                                      generator=generator, on_step=None if stop is None else lambda i, x: stop.check())
        except StopRequested as e:
            print(f"{e}: the sample grid {path.name} was not drawn", file=sys.stderr)
            return
        except GenerationError as e:  # a model that diverged: training goes on, the grid says why it is missing
            print(f"the sample grid {path.name} was not drawn: {e}", file=sys.stderr)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # the temporary name has no .png suffix: name the format
            save_image(images.float().cpu(), tmp, format="png", nrow=nrow, normalize=True, value_range=(-1, 1),
                       padding=1)
