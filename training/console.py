"""``quiet_console()``: what a training run prints — its progress bar and result lines, without the third-party
notices that tell a user nothing (each one named here, filtered where it arises; nothing else is silenced).
``main_process()``: whether this process prints them (under DDP only global rank 0 does)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Lightning's rank-zero notices on every run: the devices it did not find, adverts, the stop it was asked for
LIGHTNING_NOTICES = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:", "`Trainer.fit` stopped:")
LIGHTNING_LOGGER = "pytorch_lightning.utilities.rank_zero"


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_NOTICES)


@contextmanager
def quiet_console() -> Iterator[None]:
    """Around building the ``Trainer`` and ``fit``."""
    log, notices = logging.getLogger(LIGHTNING_LOGGER), _DropNotices()
    log.addFilter(notices)
    try:
        with warnings.catch_warnings():
            # A mid-epoch checkpoint finishes its epoch on a fresh shuffle (not resumable); --resume's help says so.
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
            # Lightning's own pytree helper on torch >= 2.10: the deprecation is Lightning's to act on, not the user's
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    module=r"pytorch_lightning\.utilities\._pytree")
            yield
    finally:
        log.removeFilter(notices)


def main_process() -> bool:
    """True in the process of global rank 0, and in every process of a run that is not distributed.

    Lightning's rank: read from ``RANK``/``LOCAL_RANK`` when Lightning is imported (the DDP launcher sets
    ``LOCAL_RANK`` for the processes it starts) and set to the global rank when the strategy is set up.
    """
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0
