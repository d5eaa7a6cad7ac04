"""The per-step table: every sampler's step as numbers, float64, one row per step; the one form the loops index.

A step reads x_t, the network's output ε, the sampler's state quantity of this step d (x̂₀ for the data-prediction
solvers, ε for one that works in ε) and of the H steps before it (its history, newest first), and injected noise z::

    d       = clip(d_from_x·x_t + d_from_eps·ε, −d_clip, d_clip)
    x_{t−1} = x_coef·x_t + eps_coef·ε + d_coef·d + Σ_j history[j]·d_{(j+1) steps back} + noise_coef·z

(``runtime.sampling.step.step``). A sampler's file computes the columns (``runtime.sampling.samplers``); warm-up
(fewer history terms while the history fills) and lower-order final steps are rows whose history coefficients are 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

FLOAT32_MAX = 3.4028234663852886e38  # the loops compute in float32
NO_CLIP = FLOAT32_MAX  # d_clip of a step that does not clip d
COLUMNS = ("x_coef", "eps_coef", "noise_coef", "d_coef", "d_from_x", "d_from_eps",
           "d_clip")  # then history, newest first
NOISE_COLUMN = COLUMNS.index("noise_coef")


def history_columns(h: int) -> tuple[str, ...]:
    """Names of the history coefficients of a table with ``h`` slots: ``h1_coef`` (the step before) …"""
    return tuple(f"h{j + 1}_coef" for j in range(h))


@dataclass(frozen=True, eq=False)
class StepCoefficients:
    """The table of one run: float64 (K,) columns (``COLUMNS``), ``history`` (K, H), index i = paper step t = i + 1.

    The model is called with ``timesteps[i]`` and guidance scale ``guidance[i]`` (1: no null-class prediction);
    ``noise_coef`` is σ_t (0 where no noise is drawn); ``d_clip`` is the clip bound of d, ``NO_CLIP`` where it is not
    clipped. ``history`` defaults to no slots (H = 0); ``d_clip`` and ``guidance`` may be given as scalars.
    """

    timesteps: np.ndarray
    x_coef: np.ndarray
    eps_coef: np.ndarray
    noise_coef: np.ndarray
    d_coef: np.ndarray
    d_from_x: np.ndarray
    d_from_eps: np.ndarray
    history: np.ndarray = None  # type: ignore[assignment]  # (K, H); default (K, 0)
    d_clip: np.ndarray | float = NO_CLIP
    guidance: np.ndarray | float = 1.0

    def __post_init__(self) -> None:
        K = len(self.timesteps)
        for name in ("d_clip", "guidance"):
            value = np.broadcast_to(np.asarray(getattr(self, name), dtype=np.float64), (K,)).copy()
            object.__setattr__(self, name, value)
        history = np.zeros((K, 0)) if self.history is None else np.asarray(self.history, dtype=np.float64)
        if history.ndim != 2 or len(history) != K:
            raise ValueError(f"history must be (K, H) = ({K}, H), got {history.shape}")
        object.__setattr__(self, "history", history)

    @property
    def slots(self) -> int:
        """H: how many earlier d's a step reads."""
        return self.history.shape[1]

    def table(self, slots: int | None = None) -> np.ndarray:
        """(K, 7 + H) float32 rows: ``COLUMNS`` then the history coefficients (padded with zeros to ``slots``): the
        ``coef`` input of the fused step graph and the rows of a mixed batch."""
        h = self.slots if slots is None else slots
        history = np.zeros((len(self.timesteps), h))
        history[:, :self.slots] = self.history[:, :h]
        return np.concatenate([np.stack([getattr(self, n) for n in COLUMNS], axis=1), history],
                              axis=1).astype(np.float32)

    @functools.cached_property
    def f32(self) -> np.ndarray:
        """``table()``, computed once."""
        return self.table()

    @functools.cached_property
    def rows(self) -> list[dict]:
        """Each step's coefficients as Python floats (so float32 arrays stay float32 on the host), the history as a
        list: ``rows[i]["history"][j]``."""
        columns = [getattr(self, name).tolist() for name in COLUMNS]
        history = self.history.tolist()
        return [dict(zip(COLUMNS, values), history=h) for values, h in zip(zip(*columns), history)]

    @functools.cached_property
    def noisy(self) -> list[bool]:
        """Whether step i draws noise (σ_t ≠ 0)."""
        return (self.noise_coef != 0.0).tolist()

    @property
    def draws(self) -> int:
        """Noise draws of one image: x_T, then one per step that adds noise."""
        return 1 + int(np.count_nonzero(self.noise_coef))
