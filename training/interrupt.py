"""``StopOnSignal``: SIGTERM and Ctrl-C end a training run at the next step boundary with a resumable checkpoint.

The first SIGTERM or SIGINT only asks to stop: the training step in progress finishes, ``checkpoints/last.ckpt`` is
written and the run ends; a sample grid being drawn stops at its next sampling step (``check`` raises
``StopRequested`` there) and is not written. A second signal ends the process at once, as the signal would have.

Under DDP the ranks agree on the stop after every training step (the largest signal number any rank holds,
reduced over all of them): saving a checkpoint is collective, so the ranks that were signalled and those that
were not (``kill PID`` reaches one process only) save ``last.ckpt`` at the same step and stop together. When
training starts, the handler replaces the SIGTERM handler Lightning put in front of it as ``fit`` began:
Lightning's broadcasts from inside the handler, a collective only the signalled rank enters, so SIGTERM to any
rank but 0 would hang the run.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from training.console import main_process

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
        self._received: int | None = None  # the signal this process was sent (signum may come from another rank)
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
        if self._received is not None:  # the second one: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._received = signum
        self.signum = self.signum or signum
        if main_process():
            print(f"\n{self.signal_name}: stopping after this step with a checkpoint (send it again to stop at once)",
                  file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.signum is not None:
            raise StopRequested(self.signal_name)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self._previous:  # installed: ours alone from here on (Lightning restores ours when fit ends)
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.saved_step is not None:
            return
        if trainer.world_size > 1:  # one collective per step, on every rank: a stop asked of one rank is everyone's
            asked = torch.tensor(self.signum or 0, device=trainer.strategy.root_device)
            self.signum = int(trainer.strategy.reduce(asked, reduce_op="max")) or None
        if self.signum is not None:
            trainer.save_checkpoint(self.last, weights_only=False)
            self.saved_step = trainer.global_step
            trainer.should_stop = True
