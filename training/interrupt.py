"""``StopOnSignal``: SIGTERM and Ctrl-C end a training run at the next step boundary with a resumable checkpoint.

The first SIGTERM or SIGINT only asks to stop: the training step in progress finishes, ``checkpoints/last.ckpt`` is
written and the run ends; a sample grid being drawn stops at its next sampling step (``check`` raises
``StopRequested`` there) and is not written. A second signal ends the process at once, as the signal would have.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """Raised between sampling steps once a stop was asked for."""


class StopOnSignal(pl.Callback):
    """Install with ``install()`` (main thread) before ``trainer.fit``, ``restore()`` after; ``signal_name`` is
    the signal that asked to stop (None: none did); ``saved_step`` the step of the checkpoint it wrote."""

    def __init__(self, last: Path) -> None:
        self.last = last
        self.signum: int | None = None
        self.saved_step: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second one: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{self.signal_name}: stopping after this step with a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.signum is not None:
            raise StopRequested(self.signal_name)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.signum is not None and self.saved_step is None:
            trainer.save_checkpoint(self.last, weights_only=False)
            self.saved_step = trainer.global_step
            trainer.should_stop = True
