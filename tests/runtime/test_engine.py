"""The batch engine: images of different samplers, rows and guidance in one predictor call, some sitting out ticks,
come out as each would alone (the uniform path), with guided rows only where guided; on numpy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.metadata import SamplingContract
from runtime.sampling.engine import NUMPY, Engine
from runtime.sampling.plan import make_plan
from runtime.sampling.samplers import SAMPLERS

CONTRACT = SamplingContract(image_size=4, channels=1, num_classes=3)
NULL = 3


class Draws:
    """One image's noise: a fixed stream of (1, 1, 4, 4) draws."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def next(self) -> np.ndarray:
        return self.rng.standard_normal((1, 1, 4, 4)).astype(np.float32)


def net(x, t, y):
    """Depends on x, t and the label (the null class differs), so guidance and rows matter."""
    return np.tanh(0.7 * x + 0.001 * t[:, None, None, None].astype(np.float32)
                   + 0.2 * y[:, None, None, None].astype(np.float32))


PLANS = [make_plan(CONTRACT, sampler=name, steps=max(s.min_steps, 5) + k, guidance=1.0 + k / 2,
                   guidance_interval=(0, 600 + 50 * k), **({"eta": 1.0} if name == "ddim" else {}))
         for k, (name, s) in enumerate(SAMPLERS.items())]


def alone(k: int) -> np.ndarray:
    e = Engine(net, null_class=NULL)
    e.add(PLANS[k].coefs, [k], [Draws(k)], [k % 3])
    while (tick := e.tick()).out is None:
        pass
    return tick.out[0]


def test_mixed_ticks_with_sit_outs_give_each_image_as_alone():
    e = Engine(net, null_class=NULL)
    for k, plan in enumerate(PLANS):
        e.add(plan.coefs, [k], [Draws(k)], [k % 3])
    out, ticks, rows = {}, 0, []
    while len(e):
        # every third tick only the first two images advance: the others keep x and their history
        tick = e.tick([0, 1] if ticks % 3 == 2 and len(e) > 2 else None)
        ticks += 1
        rows.append(tick.rows)
        assert not tick.failed
        for b, im in enumerate(tick.finished):
            out[im.index] = tick.out[b]
    assert sorted(out) == list(range(len(PLANS)))
    for k in out:
        assert np.array_equal(out[k], alone(k)), SAMPLERS[PLANS[k].sampler].name
    assert max(rows) > len(PLANS)  # guided images were doubled in the same call


def test_a_nan_fails_that_image_only_and_it_leaves():
    def bad(x, t, y):
        out = net(x, t, y)
        out[y == 2] = np.nan
        return out

    e = Engine(bad, null_class=NULL)
    e.add(PLANS[0].coefs, [0, 1, 2], [Draws(0), Draws(1), Draws(2)], [0, 1, 2])
    tick = e.tick()
    assert [im.index for im, _ in tick.failed] == [2] and "NaN or Inf at sampler step 1 of" in tick.failed[0][1]
    assert [im.index for im in e.images] == [0, 1] and len(e.x) == 2


def test_torch_tensors_take_the_same_path():
    torch = pytest.importorskip("torch")
    from runtime.backends.torch_loop import torch_ops

    def tnet(x, t, y):
        return torch.tanh(0.7 * x + 0.001 * t[:, None, None, None].float() + 0.2 * y[:, None, None, None].float())

    for ops, fn in ((NUMPY, net), (torch_ops("cpu"), tnet)):
        e = Engine(fn, ops, null_class=NULL)
        for k, plan in enumerate(PLANS):
            e.add(plan.coefs, [k], [Draws(k)], [k % 3])
        out, ticks = {}, 0
        while len(e):
            tick = e.tick([0] if ticks % 2 and len(e) > 1 else None)
            ticks += 1
            for b, im in enumerate(tick.finished):
                out[im.index] = tick.out[b]
        for k in out:
            assert np.abs(out[k].astype(int) - alone(k).astype(int)).max() <= 1
