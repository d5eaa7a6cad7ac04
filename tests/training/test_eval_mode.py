"""eval_mode: eval inside the block, every submodule's own mode back afterwards, also after an exception."""

from __future__ import annotations

import pytest
from torch import nn

from training.eval_mode import eval_mode


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))


def modes(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


@pytest.mark.parametrize("training", [True, False])
def test_restores_the_previous_mode(training):
    m = net().train(training)
    before = modes(m)
    with eval_mode(m) as inside:
        assert inside is m and not any(modes(m))
    assert modes(m) == before


@pytest.mark.parametrize("training", [True, False])
def test_restores_the_mode_after_an_exception(training):
    m = net().train(training)
    before = modes(m)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(m):
        raise RuntimeError("boom")
    assert modes(m) == before


def test_restores_mixed_modes_of_submodules():
    m = net().train()
    m[2].eval()  # e.g. a frozen part of a model in training
    before = modes(m)
    with eval_mode(m):
        assert not any(modes(m))
    assert modes(m) == before and m.training and not m[2].training
