"""A run's sampler settings and the per-step coefficients they give: the one place that defines them.

Shaped like diffusers' ``set_timesteps``: ``make_plan`` takes the settings a user gave (``None`` = not given),
fills the rest — the model's recommendations (``contract.run_defaults``) first, then the runtime's defaults —,
checks them against the model's contract, and precomputes every step's coefficients. The loops that run a
plan (``samplers.sample`` on host arrays, ``fused.sample_fused`` as one ONNX graph per step) only index them.

Defaults without a recommendation: the DDPM sampler (Algorithm 2) with all T steps, η = 0, guidance w = 1.
DDPM's σ² is the contract's variance at full T and β̃ when respaced (Improved DDPM); DDIM takes 50 steps.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from runtime.errors import SettingsError
from runtime.schedule import NoiseSchedule

if TYPE_CHECKING:
    from runtime.metadata import SamplingContract

SamplerName = Literal["ddpm", "ddim"]
Variance = Literal["beta", "beta_tilde"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
VARIANCES: tuple[str, ...] = get_args(Variance)
DEFAULT_SAMPLER: SamplerName = "ddpm"
DEFAULT_DDIM_STEPS = 50
DEFAULT_ETA = 0.0
DEFAULT_GUIDANCE = 1.0  # w = 1: the conditional prediction alone
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the samplers compute in float32


# -- per-step coefficients ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StepCoefficients:
    """Per-step coefficients of any sampler step, float64 (K,) each; index i = paper step t = i + 1:

        x̂_0    = clip(x0_from_x·x_t + x0_from_eps·ε, −1, 1)          (only when ``clip``)
        x_{t−1} = x_coef·x_t + eps_coef·ε + x0_coef·x̂_0 + noise_coef·z

    The model is called with ``timesteps[i]``; ``noise_coef`` is σ_t (0 where no noise is drawn).
    """

    timesteps: np.ndarray
    x_coef: np.ndarray
    eps_coef: np.ndarray
    noise_coef: np.ndarray
    x0_coef: np.ndarray
    x0_from_x: np.ndarray
    x0_from_eps: np.ndarray
    clip: bool

    def table(self) -> np.ndarray:
        """(K, 6) float32 rows in ``TABLE_COLUMNS`` order: the ``coef`` input of the fused step graph."""
        return np.stack([getattr(self, name) for name in TABLE_COLUMNS], axis=1).astype(np.float32)


TABLE_COLUMNS = ("x_coef", "eps_coef", "noise_coef", "x0_coef", "x0_from_x", "x0_from_eps")
NOISE_COLUMN = TABLE_COLUMNS.index("noise_coef")


def ddpm_coefficients(schedule: NoiseSchedule, variance: Variance = "beta",
                      clip_denoised: bool = False) -> StepCoefficients:
    """Algorithm 2 (Ho et al. 2020): x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t + σ_t z, σ_t² = β_t or β̃_t.

    With ``clip_denoised`` the mean is the posterior mean μ̃ = coef1·x̂_0 + coef2·x_t (eq. 7) of the clipped
    x̂_0 = clip(x_t/√ᾱ_t − √(1/ᾱ_t − 1)·ε), as in the paper's released code. σ is 0 at the last step (t = 1),
    where Algorithm 2 adds no noise.
    """
    s = schedule
    var = {"beta": s.betas, "beta_tilde": s.posterior_variance}[variance].copy()
    sigma = np.sqrt(var)
    sigma[0] = 0.0
    zero = np.zeros_like(s.betas)
    if clip_denoised:
        return StepCoefficients(s.timesteps, x_coef=s.posterior_mean_coef2, eps_coef=zero, noise_coef=sigma,
                                x0_coef=s.posterior_mean_coef1, x0_from_x=s.sqrt_recip_alphas_cumprod,
                                x0_from_eps=-s.sqrt_recipm1_alphas_cumprod, clip=True)
    return StepCoefficients(s.timesteps, x_coef=1.0 / np.sqrt(s.alphas),
                            eps_coef=-s.betas / (s.sqrt_one_minus_alphas_cumprod * np.sqrt(s.alphas)),
                            noise_coef=sigma, x0_coef=zero, x0_from_x=zero, x0_from_eps=zero, clip=False)


def ddim_coefficients(schedule: NoiseSchedule, eta: float = 0.0, clip_denoised: bool = False) -> StepCoefficients:
    """DDIM (Song et al. 2021, eq. 12) on the schedule's steps:

    x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t,  x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1−ᾱ_{t−1}−σ_t²)·ε + σ_t z,
    σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1}); η = 0 is deterministic. ``clip_denoised`` clips x̂_0.
    """
    if problem := eta_problem(eta):
        raise SettingsError(problem)
    ab, ab_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    sigma = eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_prev)
    dir_coef = np.sqrt(np.maximum(1.0 - ab_prev - sigma**2, 0.0))
    x0_x, x0_eps = 1.0 / np.sqrt(ab), -np.sqrt(1.0 - ab) / np.sqrt(ab)
    zero = np.zeros_like(ab)
    if clip_denoised:
        return StepCoefficients(schedule.timesteps, x_coef=zero, eps_coef=dir_coef, noise_coef=sigma,
                                x0_coef=np.sqrt(ab_prev), x0_from_x=x0_x, x0_from_eps=x0_eps, clip=True)
    return StepCoefficients(schedule.timesteps, x_coef=np.sqrt(ab_prev) * x0_x,
                            eps_coef=np.sqrt(ab_prev) * x0_eps + dir_coef, noise_coef=sigma,
                            x0_coef=zero, x0_from_x=zero, x0_from_eps=zero, clip=False)


# -- validation: each setting's rule, written once (make_plan and the contract's run_defaults use them) ----------
def sampler_problem(sampler: object) -> str | None:
    if sampler not in SAMPLERS:
        return f"unknown sampler {sampler!r} (expected {' or '.join(SAMPLERS)})"
    return None


def steps_problem(steps: object, timesteps: int) -> str | None:
    ok = isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and 1 <= steps <= timesteps
    return None if ok else f"steps must be between 1 and T = {timesteps}, got {steps}"


def eta_problem(eta: object) -> str | None:
    """η ∈ [0, 1]: DDIM's √(1 − ᾱ_{t−1} − σ_t²) is undefined for η > 1 at the last step (t = 1), where ᾱ_0 = 1."""
    if isinstance(eta, numbers.Real) and not isinstance(eta, bool) and 0 <= eta <= 1:
        return None
    return (f"eta must be between 0 and 1, got {eta} (for eta > 1, DDIM's sigma_t exceeds sqrt(1 - alphabar_(t-1)) "
            "and the update is undefined)" if isinstance(eta, numbers.Real) and eta > 1 else
            f"eta must be a number between 0 and 1, got {eta}")


def guidance_problem(guidance: object, conditional: bool) -> str | None:
    if not isinstance(guidance, numbers.Real) or isinstance(guidance, bool) or not abs(guidance) <= FLOAT32_MAX:
        return f"guidance must be a finite number (in float32), got {guidance!r}"
    if guidance != DEFAULT_GUIDANCE and not conditional:
        return "guidance needs a class-conditional model; this one is unconditional"
    return None


def variance_problem(variance: object) -> str | None:
    if variance not in VARIANCES:
        return f"unknown variance {variance!r} (expected {' or '.join(VARIANCES)})"
    return None


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingPlan:
    """Resolved run settings and each step's coefficients.

    ``variance`` is DDPM's σ² choice (None for DDIM); ``from_model`` names the settings taken from the model's
    recommendations because they were not given.
    """

    sampler: SamplerName
    steps: int
    eta: float
    guidance: float
    clip_denoised: bool
    variance: Variance | None
    coefs: StepCoefficients
    from_model: tuple[str, ...] = ()

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (a second, null-class prediction per step)."""
        return self.guidance != DEFAULT_GUIDANCE

    def run_settings(self) -> dict:
        """The sampler settings every image depends on, as ``run.json`` records them."""
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta if self.sampler == "ddim" else None,
                "guidance": self.guidance, "clip_denoised": self.clip_denoised, "variance": self.variance}

    def manifest_fields(self) -> dict:
        """The sampler settings each manifest record carries."""
        s = self.run_settings()
        return {k: s[k] for k in ("sampler", "steps", "eta", "guidance")}

    def describe(self) -> str:
        """E.g. ``ddim 50 steps, eta 0, guidance 1.5``."""
        eta = f", eta {self.eta:g}" if self.sampler == "ddim" else ""
        return f"{self.sampler} {self.steps} steps{eta}, guidance {self.guidance:g}"


def make_plan(contract: SamplingContract, sampler: SamplerName | None = None, steps: int | None = None,
              eta: float | None = None, guidance: float | None = None, clip_denoised: bool = False,
              variance: Variance | None = None, *, model_defaults: bool = True,
              schedule: NoiseSchedule | None = None) -> SamplingPlan:
    """Validate a run's settings against ``contract`` and precompute its per-step coefficients.

    ``None`` means "not given": the model's recommendation (``contract.run_defaults``, unless
    ``model_defaults`` is False) fills it, else the runtime's default. A recommended ``steps``/``eta`` applies
    only to the sampler it was recommended for. ``schedule`` is the contract's full schedule, if already built.
    Raises ``SettingsError`` with a one-line reason.
    """
    T = contract.schedule.timesteps
    rec = contract.run_defaults if model_defaults else None
    from_model = []

    def pick(name: str, given, default, applies: bool = True):
        recommended = getattr(rec, name, None) if applies else None
        if given is not None:
            return given
        if recommended is not None:
            from_model.append(name)
            return recommended
        return default

    sampler = pick("sampler", sampler, DEFAULT_SAMPLER)
    if problem := sampler_problem(sampler):
        raise SettingsError(problem)
    same_sampler = rec is not None and rec.sampler in (None, sampler)
    steps = pick("steps", steps, T if sampler == "ddpm" else min(DEFAULT_DDIM_STEPS, T), same_sampler)
    eta = pick("eta", eta, DEFAULT_ETA, same_sampler)
    guidance = pick("guidance", guidance, DEFAULT_GUIDANCE)
    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    for problem in (steps_problem(steps, T), guidance_problem(guidance, contract.conditional), eta_problem(eta),
                    None if variance is None else variance_problem(variance)):
        if problem:
            raise SettingsError(problem)
    schedule = schedule or contract.schedule.build()
    if steps != T:
        schedule = schedule.respace(int(steps))
    if sampler == "ddpm":
        # Full T: the contract's variance (Algorithm 2); respaced: β̃ of the respaced schedule (Improved DDPM).
        var = variance or (contract.variance if steps == T else "beta_tilde")
        coefs = ddpm_coefficients(schedule, var, clip_denoised)
    else:
        var = None
        coefs = ddim_coefficients(schedule, float(eta), clip_denoised)
    return SamplingPlan(sampler, int(steps), float(eta), float(guidance), bool(clip_denoised), var, coefs,
                        tuple(from_model))
