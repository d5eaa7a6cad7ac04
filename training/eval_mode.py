"""``eval_mode(module)``: run a block with a torch module in eval mode, then give it back its previous mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``module`` (and its submodules) in eval mode for the block; yields it.

    Afterwards every submodule gets back the train/eval mode it had before, also when the block raises, so a
    model that was training keeps training (and one that had, say, a frozen eval-mode part keeps that part).
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
