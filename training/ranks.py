"""``SeedPerRank``: under DDP each rank draws its own timesteps and noise (seed + global rank); one process keeps
the run's seed, so single-device runs are unchanged."""

from __future__ import annotations

import pytorch_lightning as pl


class SeedPerRank(pl.Callback):
    """Reseed every rank with ``seed + global_rank`` once the process group is up (``setup`` runs on each rank).

    ``pl.seed_everything(seed)`` gives every rank the same random stream: the same t and ε at each batch position
    on every rank, so a step of N ranks would carry one batch's worth of noise N times over. The weights are
    still the same on every rank (made before this, and DDP starts from rank 0's).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if trainer.world_size > 1:
            pl.seed_everything(self.seed + trainer.global_rank, verbose=False)
