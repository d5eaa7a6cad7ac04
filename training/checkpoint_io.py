"""``AtomicCheckpointIO``: Lightning's checkpoints written through the one atomic-write helper, so an interrupted save
(a second signal, a full disk, a crash) never leaves a partial ``last.ckpt`` under its final name."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from runtime.files import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` (local paths), with the file written as a temporary sibling and renamed."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
