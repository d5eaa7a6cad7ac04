"""The one source of DDPM noise-schedule math: pure NumPy, float64 inside.

Index convention: array index ``i`` in ``0 .. K-1`` is the paper's step ``t = i + 1``; the model is
called with the *original* timestep ``timesteps[i]`` (equal to ``i`` unless the schedule is respaced).
Names follow Ho et al. 2020 / Improved DDPM (``alphas_cumprod`` is ᾱ, ``posterior_variance`` is β̃).
Training, export and every sampler take their tables from here; there is no second copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SCHEDULE_NAMES: tuple[str, ...] = ("linear", "scaled_linear", "cosine", "sigmoid", "explicit")
DEFAULT_TIMESTEPS = 1000
MAX_TIMESTEPS = 100_000  # T beyond this is a mistake: the float64 tables alone would take T × 100 bytes
LINEAR_DEFAULTS = {"beta_start": 1e-4, "beta_end": 0.02}
COSINE_DEFAULTS = {"s": 0.008, "max_beta": 0.999}
# each named schedule's parameters and their defaults; "explicit" takes its β table itself (``betas=``)
PARAMS: dict[str, dict[str, float]] = {"linear": LINEAR_DEFAULTS,
                                       "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
                                       "cosine": COSINE_DEFAULTS, "sigmoid": LINEAR_DEFAULTS, "explicit": {}}
SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing", "logsnr")


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """β_t evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020): (T,) float64."""
    _check_timesteps(timesteps)
    _check_range("linear", beta_start, beta_end)
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def scaled_linear_betas(timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """√β_t evenly spaced from √beta_start to √beta_end (latent diffusion; diffusers' ``scaled_linear``)."""
    _check_timesteps(timesteps)
    _check_range("scaled_linear", beta_start, beta_end)
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), timesteps, dtype=np.float64) ** 2


def sigmoid_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """β_t = beta_start + (beta_end − beta_start)·sigmoid(u_t), u evenly spaced on [−6, 6] (GeoDiff; diffusers'
    ``sigmoid``)."""
    _check_timesteps(timesteps)
    _check_range("sigmoid", beta_start, beta_end)
    u = np.linspace(-6.0, 6.0, timesteps, dtype=np.float64)
    return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-u))


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021: ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), β_t = 1 − ᾱ(t)/ᾱ(t−1) clipped at ``max_beta``
    (diffusers' ``squaredcos_cap_v2``)."""
    _check_timesteps(timesteps)
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def explicit_betas(timesteps: int, betas) -> np.ndarray:
    """A given β table (diffusers' ``trained_betas``): T numbers in (0, 1)."""
    _check_timesteps(timesteps)
    table = np.asarray(betas, dtype=np.float64)
    if table.shape != (timesteps,):
        raise ValueError(f"an explicit schedule needs T = {timesteps} betas, got {table.size}")
    if not np.all((table > 0) & (table < 1)):
        raise ValueError("explicit betas must all lie in (0, 1)")
    return table


_BUILDERS = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas,
             "sigmoid": sigmoid_betas}


def make_betas(name: str, timesteps: int = DEFAULT_TIMESTEPS, betas=None, **params: float) -> np.ndarray:
    """β table of a named schedule; ``params`` override that schedule's defaults; ``explicit`` takes ``betas``."""
    if name == "explicit":
        if params:
            raise ValueError(f"an explicit schedule takes no parameters, got {sorted(params)}")
        if betas is None:
            raise ValueError("an explicit schedule needs its betas")
        return explicit_betas(timesteps, betas)
    if name not in _BUILDERS:
        raise ValueError(f"unknown schedule {name!r} (expected one of {', '.join(SCHEDULE_NAMES)})")
    if betas is not None:
        raise ValueError(f"the {name} schedule computes its betas; only an explicit schedule is given them")
    return _BUILDERS[name](timesteps, **{**PARAMS[name], **params})


def default_params(name: str) -> dict[str, float]:
    """The parameters a named schedule uses when none are given."""
    if name not in PARAMS:
        raise ValueError(f"unknown schedule {name!r} (expected one of {', '.join(SCHEDULE_NAMES)})")
    return dict(PARAMS[name])


def _check_range(name: str, beta_start: float, beta_end: float) -> None:
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"{name} schedule needs 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")


def _check_timesteps(timesteps: int) -> None:
    if int(timesteps) != timesteps or not 1 <= timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"the number of timesteps must be an integer from 1 to {MAX_TIMESTEPS}, got {timesteps!r}")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """All per-step tables of a (possibly respaced) schedule, float64, shape (K,).

    ``timesteps[i]`` is the timestep the noise predictor was trained with for step ``i``.
    """

    betas: np.ndarray
    timesteps: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        timesteps = np.arange(len(betas)) if self.timesteps is None else np.asarray(self.timesteps)
        if timesteps.shape != betas.shape:
            raise ValueError("timesteps and betas must have the same length")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "timesteps", timesteps.astype(np.int64))
        for name, value in self._tables(betas).items():
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        betas.setflags(write=False)
        self.timesteps.setflags(write=False)

    @staticmethod
    def _tables(betas: np.ndarray) -> dict[str, np.ndarray]:
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)  # ᾱ_t = ∏_{s≤t} α_s (inclusive)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])  # ᾱ_{t−1}, with ᾱ_0 = 1
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # β̃_t
        return {
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            # β̃_1 = 0; like Improved DDPM, the log uses β̃_2 there so it stays finite.
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1:2], posterior_variance[1:]))
            if len(betas) > 1
            else np.log(betas),
            # posterior mean μ̃(x_t, x_0) = coef1·x_0 + coef2·x_t  (Ho et al. eq. 7)
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }

    # Declared for type checkers; set in __post_init__.
    alphas: np.ndarray = field(init=False, repr=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    alphas_cumprod_prev: np.ndarray = field(init=False, repr=False)
    sqrt_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recip_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recipm1_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    posterior_variance: np.ndarray = field(init=False, repr=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef1: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef2: np.ndarray = field(init=False, repr=False)

    @classmethod
    def from_name(cls, name: str, timesteps: int = DEFAULT_TIMESTEPS, betas=None, **params: float) -> NoiseSchedule:
        return cls(make_betas(name, timesteps, betas, **params))

    def __len__(self) -> int:
        return len(self.betas)

    @property
    def num_train_timesteps(self) -> int:
        """T of the schedule this one was derived from (the largest model timestep + 1)."""
        return int(self.timesteps[-1]) + 1

    def respace(self, steps: int | list[int] | np.ndarray) -> NoiseSchedule:
        """A K-step subsequence with recomputed β (Improved DDPM §4): β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}.

        ``steps`` is a count K (evenly spaced, first and last step kept) or explicit step indices.
        """
        keep = spaced_indices(len(self), steps) if np.isscalar(steps) else np.asarray(steps, dtype=np.int64)
        if keep.ndim != 1 or len(keep) == 0 or np.any(np.diff(keep) <= 0) or keep[0] < 0 or keep[-1] >= len(self):
            raise ValueError("respaced steps must be strictly increasing indices into the schedule")
        abar = self.alphas_cumprod[keep]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return NoiseSchedule(betas, self.timesteps[keep])


def timestep_indices(num_steps: int, count: int, spacing: str = "linspace", offset: int = 0,
                     alphas_cumprod: np.ndarray | None = None) -> np.ndarray:
    """The ``count`` model timesteps a respaced run visits, ascending, with diffusers' ``timestep_spacing`` meaning:

    * ``linspace``: ``round(linspace(0, T−1, K))`` (first and last kept; ``spaced_indices``);
    * ``leading``: ``k·(T // K) + offset`` for k = 0 … K−1 (``steps_offset``: diffusers' default spacing);
    * ``trailing``: ``round(T − k·T/K) − 1`` for k = 0 … K−1 (ends at T − 1; Lin et al. 2024, Table 2);
    * ``logsnr``: the timesteps nearest to K values evenly spaced in log-SNR λ = log(ᾱ/(1 − ᾱ)) from λ(0) to
      λ(T − 1) (``alphas_cumprod``: the schedule's ᾱ; DPM-Solver's "logSNR" timesteps, Lu et al. 2022), each at
      least one above the one before (where λ is steep, near t = 0, two targets can share a nearest timestep).

    ``count == num_steps`` is every timestep, whatever the spacing. ValueError for a count, spacing or offset
    that gives no valid timesteps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r} (expected one of {', '.join(SPACINGS)})")
    if spacing == "linspace" or count == num_steps:
        return spaced_indices(num_steps, count)
    if int(count) != count or not 1 <= count <= num_steps:
        raise ValueError(f"the number of sampling steps must be between 1 and {num_steps}, got {count!r}")
    count = int(count)
    if spacing == "logsnr":
        if alphas_cumprod is None or len(alphas_cumprod) != num_steps:
            raise ValueError("logsnr spacing needs the schedule's alphas_cumprod")
        lam = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)  # decreasing in t
        targets = np.linspace(lam[0], lam[-1], count)  # from t = 0 up
        keep = np.array([int(np.argmin(np.abs(lam - v))) for v in targets], dtype=np.int64)
        for k in range(1, count):  # where λ is steep (t near 0) two targets can share a timestep: take the next one
            keep[k] = max(keep[k], keep[k - 1] + 1)
        keep[-1] = num_steps - 1
        if np.any(np.diff(keep) <= 0):
            raise ValueError(f"logsnr spacing of {count} steps does not fit in T = {num_steps}; use another spacing")
        return keep
    if spacing == "leading":
        keep = np.arange(count, dtype=np.int64) * (num_steps // count) + int(offset)
    else:
        keep = (np.round(num_steps - np.arange(count) * (num_steps / count)).astype(np.int64) - 1)[::-1]
    if keep[-1] >= num_steps or keep[0] < 0:
        raise ValueError(f"{spacing} spacing of {count} steps with offset {offset} gives timestep {int(keep[-1])}, "
                         f"past T - 1 = {num_steps - 1}")
    return keep


def spaced_indices(num_steps: int, count: int) -> np.ndarray:
    """``count`` evenly spaced indices in ``0 .. num_steps-1`` including both ends: (count,) int64."""
    if int(count) != count or not 1 <= count <= num_steps:
        raise ValueError(f"the number of sampling steps must be between 1 and {num_steps}, got {count!r}")
    if count == 1:
        return np.array([num_steps - 1], dtype=np.int64)
    return np.round(np.linspace(0, num_steps - 1, int(count))).astype(np.int64)
