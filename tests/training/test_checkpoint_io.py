"""Lightning's checkpoints go through the atomic-write helper: a save that fails leaves nothing under the final name
(and a good one is an ordinary torch.save file)."""

from __future__ import annotations

import pickle

import pytest
import torch

from training.checkpoint_io import AtomicCheckpointIO


class Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("cannot be saved")


def test_a_failed_save_leaves_no_partial_checkpoint(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 4}, last)
    assert torch.load(last, weights_only=True)["global_step"] == 4
    with pytest.raises(pickle.PicklingError):
        io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "extra": Unpicklable()}, last)
    assert torch.load(last, weights_only=True)["global_step"] == 4  # the previous checkpoint, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary left
