"""Test predictors as the batch engine calls them: ``net(x, t, y)`` with t an int64 vector."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def per_step(fn: Callable) -> Callable:
    """``fn(x, t: int)`` as an engine net, for runs whose images all share a row (one t per call)."""

    def net(x, t, y=None):
        assert len(set(np.asarray(t).tolist())) == 1
        return fn(x, int(t[0]))

    return net
