"""``quiet_console()``: what a training run prints — its progress bar and result lines, without the third-party
notices that tell a user nothing (each one named here, filtered where it arises; nothing else is silenced)."""

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
