"""``ddpm-train`` as ``test_ddp.py`` runs it under DDP, with each rank recording what it did into a folder.

Usage: ``python tests/training/ddp_cli.py RECORD SLOW_FROM DDPM-TRAIN-ARGS...``. Lightning's DDP launcher starts
rank 1 by running this same command line again (with ``LOCAL_RANK=1``), so every rank records:

- ``RECORD/rank{R}.writes``: every file the process opened for writing, renamed into place, removed or made a
  folder of (``open``, ``os.rename``/``os.replace``, ``os.remove``, ``os.mkdir`` audit events: whatever writes
  through Python, Lightning's checkpoints and CSV logs, PIL's PNGs and torch's ``_atomic_save`` among them, opens
  the file through one of these);
- ``RECORD/rank{R}.json`` (at the start of training): process id, global rank, world size, process group
  backend, the global step training starts from and torch's seed;
- ``RECORD/rank{R}.pt`` (at the end of training): the module's whole ``state_dict`` (raw U-Net and EMA);
- ``RECORD/rank{R}.batches``: the sum of each training batch's images, one line a step (the ranks' shards differ);
- ``RECORD/rank{R}.exit``: the process's exit status, written as it exits.

``SLOW_FROM`` (``STEP`` or ``STEP:RANKS``, e.g. ``3:1``) > 0 makes every training step from that global step on
touch ``RECORD/at-step`` and then sleep ``SLOW_STEP_S`` on the ranks listed (every rank when none are), so a test can
signal the run mid-training (a second signal 0.3 s after the first still lands inside that step: with 0.2 s a step
the whole stop could end first, and the second signal met the interpreter's exit); 0 leaves training as it is. A
rank left unslowed waits for the slow one in the step's gradient all-reduce, so it sees a peer that ends at once the
moment it ends. Test code only: nothing in ``training/`` knows about it. One node, so the global rank
is ``LOCAL_RANK``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

record, (slow_from, _, slow_ranks), args = Path(sys.argv[1]), sys.argv[2].partition(":"), sys.argv[3:]
rank = int(os.environ.get("LOCAL_RANK", "0"))  # unset in the first process, set by Lightning for the others
slow_from = int(slow_from) if not slow_ranks or str(rank) in slow_ranks.split(",") else 0
writes = open(record / f"rank{rank}.writes", "w", buffering=1)  # opened before the hook: not recorded itself
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _path(p) -> str | None:
    return None if isinstance(p, int) else os.path.realpath(os.fsdecode(p))


def _audit(event: str, a: tuple) -> None:
    if writes.closed:  # the interpreter is shutting down
        return
    if event == "open":
        path, mode, flags = a
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        if writing and (p := _path(path)):
            writes.write(f"open {p}\n")
    elif event in ("os.rename", "os.replace"):
        if p := _path(a[1]):
            writes.write(f"rename {p}\n")
    elif event in ("os.remove", "os.mkdir"):
        if p := _path(a[0]):
            writes.write(f"{event[3:]} {p}\n")


sys.addaudithook(_audit)

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402


class Record(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        dist = torch.distributed
        info = {"pid": os.getpid(), "global_rank": trainer.global_rank, "world_size": trainer.world_size,
                "backend": dist.get_backend() if dist.is_initialized() else None, "start_step": trainer.global_step,
                "seed": torch.initial_seed()}
        (record / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(record / f"rank{trainer.global_rank}.batches", "a") as f:
            f.write(f"{float(batch[0].double().sum())!r}\n")

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, record / f"rank{trainer.global_rank}.pt")


class RecordingTrainer(pl.Trainer):
    def __init__(self, *a, callbacks=(), **k) -> None:
        super().__init__(*a, callbacks=[*callbacks, Record()], **k)


pl.Trainer = RecordingTrainer  # training.train builds ``pl.Trainer(...)`` at call time

SLOW_STEP_S = 1.0

if slow_from:
    import training.model as m

    real_step = m.DiffusionModel.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step >= slow_from:
            (record / "at-step").touch()
            time.sleep(SLOW_STEP_S)
        return real_step(self, batch, batch_idx)

    m.DiffusionModel.training_step = training_step

from training.cli import main  # noqa: E402

try:
    main(args, prog_name="ddpm-train")
finally:  # click ends with SystemExit, 0 included
    status = sys.exc_info()[1]
    (record / f"rank{rank}.exit").write_text(str(getattr(status, "code", status)))
