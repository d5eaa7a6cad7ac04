"""A run's resolved settings and the per-step coefficients they give: the one place that computes them.

Shaped like diffusers' ``set_timesteps``: ``make_plan`` takes the settings a user gave (``runtime.sampling.settings.RunSettings``,
``None`` = not given), fills the rest — the model's recommendations (``contract.run_defaults``) first, then the
runtime's defaults (``runtime.sampling.settings.defaults``) —, checks them against the model's contract, and precomputes every
step's coefficients. The loops that run a plan (``samplers.sample`` on host arrays or torch tensors,
``fused.sample_fused`` as one ONNX graph per step, the server's per-image batch) only index them, through the one
step (``runtime.sampling.step``).

DDPM's σ² is the contract's variance at full T and β̃ when respaced (Improved DDPM). Every sampler runs on the same
respaced schedule: the K model timesteps of the run's ``spacing`` (``schedule.timestep_indices``; by default
``round(linspace(0, T−1, K))``). The coefficients are written for an ε-predictor and re-expressed in what the
model predicts (``for_prediction``: v or x̂₀), so no loop needs to know.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.errors import SettingsError
from runtime.sampling.schedule import NoiseSchedule, timestep_indices
from runtime.sampling.settings import (FLOAT32_MAX, NAMES, PER_IMAGE, SETTINGS, RunSettings, Variance, applies, defaults,
                              eta_problem, Context)

if TYPE_CHECKING:
    from runtime.metadata import SamplingContract

NO_CLIP = FLOAT32_MAX  # x0_clip of a step that does not clip x̂₀


# -- per-step coefficients ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StepCoefficients:
    """Per-step coefficients of any sampler step, float64 (K,) each; index i = paper step t = i + 1:

        x̂_0     = clip(x0_from_x·x_t + x0_from_eps·ε, −x0_clip, x0_clip)
        x_{t−1} = x_coef·x_t + eps_coef·ε + x0_coef·x̂_0 + prev_x0_coef·x̂_0' + noise_coef·z

    where x̂_0' is the x̂_0 of the step before (the state a multistep solver keeps; DDPM and DDIM have 0 there).
    The model is called with ``timesteps[i]`` and guidance scale ``guidance[i]`` (1: no null-class prediction);
    ``noise_coef`` is σ_t (0 where no noise is drawn); ``x0_clip`` is 1 where x̂_0 is clipped, ``NO_CLIP`` else.
    """

    timesteps: np.ndarray
    x_coef: np.ndarray
    eps_coef: np.ndarray
    noise_coef: np.ndarray
    x0_coef: np.ndarray
    x0_from_x: np.ndarray
    x0_from_eps: np.ndarray
    prev_x0_coef: np.ndarray = None  # type: ignore[assignment]  # default: zeros
    x0_clip: np.ndarray | float = NO_CLIP  # a scalar broadcasts to every step
    guidance: np.ndarray | float = 1.0

    def __post_init__(self) -> None:
        K = len(self.timesteps)
        for name in ("prev_x0_coef", "x0_clip", "guidance"):
            value = getattr(self, name)
            value = np.zeros(K) if value is None else np.broadcast_to(np.asarray(value, dtype=np.float64), (K,)).copy()
            object.__setattr__(self, name, value)

    def table(self) -> np.ndarray:
        """(K, 8) float32 rows in ``TABLE_COLUMNS`` order: the ``coef`` input of the fused step graph."""
        return np.stack([getattr(self, name) for name in TABLE_COLUMNS], axis=1).astype(np.float32)

    def rows(self) -> list[dict[str, float]]:
        """Each step's coefficients as Python floats (so float32 arrays stay float32 in the host loop)."""
        columns = [getattr(self, name).tolist() for name in TABLE_COLUMNS]
        return [dict(zip(TABLE_COLUMNS, values)) for values in zip(*columns)]


TABLE_COLUMNS = ("x_coef", "eps_coef", "noise_coef", "x0_coef", "x0_from_x", "x0_from_eps", "prev_x0_coef", "x0_clip")
NOISE_COLUMN = TABLE_COLUMNS.index("noise_coef")


def ddpm_coefficients(schedule: NoiseSchedule, variance: Variance = "beta", clip_denoised: bool = False,
                      clip_range: float = 1.0) -> StepCoefficients:
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
                                x0_from_eps=-s.sqrt_recipm1_alphas_cumprod, x0_clip=clip_range)
    return StepCoefficients(s.timesteps, x_coef=1.0 / np.sqrt(s.alphas),
                            eps_coef=-s.betas / (s.sqrt_one_minus_alphas_cumprod * np.sqrt(s.alphas)),
                            noise_coef=sigma, x0_coef=zero, x0_from_x=zero, x0_from_eps=zero)


def ddim_coefficients(schedule: NoiseSchedule, eta: float = 0.0, clip_denoised: bool = False,
                      clip_range: float = 1.0) -> StepCoefficients:
    """DDIM (Song et al. 2021, eq. 12) on the schedule's steps:

    x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t,  x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1−ᾱ_{t−1}−σ_t²)·ε + σ_t z,
    σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1}); η = 0 is deterministic. ``clip_denoised`` clips x̂_0 to
    ±``clip_range``.
    """
    if problem := eta_problem(eta, Context(len(schedule), True, "ddim")):
        raise SettingsError(problem)
    ab, ab_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    sigma = eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_prev)
    dir_coef = np.sqrt(np.maximum(1.0 - ab_prev - sigma**2, 0.0))
    x0_x, x0_eps = 1.0 / np.sqrt(ab), -np.sqrt(1.0 - ab) / np.sqrt(ab)
    zero = np.zeros_like(ab)
    if clip_denoised:
        return StepCoefficients(schedule.timesteps, x_coef=zero, eps_coef=dir_coef, noise_coef=sigma,
                                x0_coef=np.sqrt(ab_prev), x0_from_x=x0_x, x0_from_eps=x0_eps, x0_clip=clip_range)
    return StepCoefficients(schedule.timesteps, x_coef=np.sqrt(ab_prev) * x0_x,
                            eps_coef=np.sqrt(ab_prev) * x0_eps + dir_coef, noise_coef=sigma,
                            x0_coef=zero, x0_from_x=zero, x0_from_eps=zero)


def dpmpp_coefficients(schedule: NoiseSchedule, *, sde: bool = False, clip_denoised: bool = False,
                       clip_range: float = 1.0) -> StepCoefficients:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2; data prediction, second-order multistep) on the
    schedule's steps, or with ``sde`` its SDE variant (SDE-DPM-Solver++(2M), ibid. App. B).

    With α = √ᾱ, σ = √(1−ᾱ), λ = log α − log σ and x̂_0 = (x − σ·ε)/α, a step from s = t_i to t = t_{i−1}
    (after t_0, σ = 0: the last step returns x̂_0 without noise) with h = λ_t − λ_s is

        ODE:  x_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·D
        SDE:  x_t = (σ_t/σ_s)·e^{−h}·x_s + α_t·(1 − e^{−2h})·D + σ_t·√(1 − e^{−2h})·z

    with D = x̂_0 on the first and the last step (first order) and, in between, D = (1 + 1/(2r))·x̂_0 − 1/(2r)·x̂_0'
    (x̂_0' the previous step's, r = h'/h with h' the previous step's h): what diffusers'
    ``DPMSolverMultistepScheduler`` computes with ``solver_order=2``, ``solver_type="midpoint"``,
    ``lower_order_final=True`` and ``final_sigmas_type="zero"`` on the same timesteps. e^{−h} is formed as
    (α_s·σ_t)/(σ_s·α_t), so the last step's h = ∞ gives exactly 0. ``clip_denoised`` clips x̂_0 to ±``clip_range``
    (also as stored).
    """
    ab = schedule.alphas_cumprod
    K = len(ab)
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    alpha_to, sigma_to = np.append(1.0, alpha[:-1]), np.append(0.0, sigma[:-1])  # where step i goes
    e = alpha * sigma_to / (sigma * alpha_to)  # e^{−h_i}; 0 at the last step (i = 0)
    if sde:
        x_coef, d_coef, noise = sigma_to / sigma * e, alpha_to * (1.0 - e**2), sigma_to * np.sqrt(1.0 - e**2)
    else:
        x_coef, d_coef, noise = sigma_to / sigma, alpha_to * (1.0 - e), np.zeros(K)
    lam = np.log(alpha) - np.log(sigma)
    h = np.full(K, np.inf)
    h[1:] = lam[:-1] - lam[1:]  # h_i = λ_{i−1} − λ_i for the steps that do not end at σ = 0
    second = np.zeros(K, dtype=bool)
    second[1:K - 1] = True  # not the first step (i = K−1: no x̂_0' yet) and not the last (i = 0)
    r = np.ones(K)
    r[1:K - 1] = h[2:] / h[1:K - 1]  # the step before step i is step i + 1
    x0_coef = np.where(second, d_coef * (1.0 + 0.5 / r), d_coef)
    prev = np.where(second, -d_coef * 0.5 / r, 0.0)
    return StepCoefficients(schedule.timesteps, x_coef=x_coef, eps_coef=np.zeros(K), noise_coef=noise,
                            x0_coef=x0_coef, x0_from_x=1.0 / alpha, x0_from_eps=-sigma / alpha, prev_x0_coef=prev,
                            x0_clip=clip_range if clip_denoised else NO_CLIP)


def coefficients(sampler: str, schedule: NoiseSchedule, *, eta: float | None, clip_denoised: bool,
                 variance: Variance | None, clip_range: float = 1.0) -> StepCoefficients:
    """The step table of a named sampler on ``schedule``, for a noise (ε) predictor."""
    if sampler == "ddpm":
        return ddpm_coefficients(schedule, variance, clip_denoised, clip_range)
    if sampler == "ddim":
        return ddim_coefficients(schedule, float(eta), clip_denoised, clip_range)
    return dpmpp_coefficients(schedule, sde=sampler == "dpmpp-2m-sde", clip_denoised=clip_denoised,
                              clip_range=clip_range)


def for_prediction(coefs: StepCoefficients, schedule: NoiseSchedule, prediction: str) -> StepCoefficients:
    """``coefs`` (written for ε) re-expressed in what the network predicts, so every loop applies them to the
    network's output unchanged.

    With α = √ᾱ_t and σ = √(1−ᾱ_t) at each step's model timestep, the output o gives ε = a·x_t + b·o:
    ``v_prediction`` (v = α·ε − σ·x_0, Salimans & Ho 2022): ε = σ·x_t + α·v; ``sample`` (o = x̂_0):
    ε = (x_t − α·x̂_0)/σ. Every step is linear in ε and x̂_0 = x0_from_x·x_t + x0_from_eps·ε, so substituting
    gives the same form in o: x_coef + eps_coef·a, eps_coef·b, x0_from_x + x0_from_eps·a, x0_from_eps·b (float64;
    classifier-free guidance is linear in o as it is in ε). ``epsilon`` returns ``coefs`` itself.
    """
    if prediction == "epsilon":
        return coefs
    ab = schedule.alphas_cumprod
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    if prediction == "v_prediction":
        a, b = sigma, alpha
    elif prediction == "sample":
        a, b = 1.0 / sigma, -alpha / sigma
    else:
        raise ValueError(f"unknown prediction {prediction!r} (expected epsilon, v_prediction or sample)")
    c = coefs
    return dataclasses.replace(c, x_coef=c.x_coef + c.eps_coef * a, eps_coef=c.eps_coef * b,
                               x0_from_x=c.x0_from_x + c.x0_from_eps * a, x0_from_eps=c.x0_from_eps * b)


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingPlan:
    """Resolved run settings (``settings``: every field filled, ``None`` only where it does not apply) and each
    step's coefficients; ``from_model`` names the settings taken from the model's recommendations because they
    were not given. The settings read as attributes too: ``plan.sampler``, ``plan.steps``, ...
    """

    settings: RunSettings
    coefs: StepCoefficients
    from_model: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        if name in NAMES:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs on some step (a second, null-class prediction there)."""
        return bool(np.any(self.coefs.guidance != 1.0))

    def run_settings(self) -> dict:
        """The settings every image depends on, as ``run.json`` records them (settings added later than run folders
        only where set, so folders of earlier versions resume)."""
        return {f.name: v for f, v in zip(SETTINGS, self.settings.to_json().values())
                if v is not None or not f.metadata["new"]}

    def manifest_fields(self) -> dict:
        """The settings each manifest record carries."""
        s = self.run_settings()
        return {k: s[k] for k in PER_IMAGE if k in s}

    def describe(self) -> str:
        """E.g. ``ddim 50 steps, eta 0, guidance 1.5``."""
        eta = f", eta {self.eta:g}" if self.eta is not None else ""
        interval = "" if self.guidance_interval is None else " on t in [{}, {}]".format(*self.guidance_interval)
        spacing = "" if self.spacing is None else f" ({self.spacing}{f' + {self.steps_offset}' if self.steps_offset else ''})"
        return f"{self.sampler} {self.steps} steps{spacing}{eta}, guidance {self.guidance:g}{interval}"


def make_plan(contract: SamplingContract, settings: RunSettings | None = None, *, model_defaults: bool = True,
              schedule: NoiseSchedule | None = None, **given: Any) -> SamplingPlan:
    """Validate a run's settings against ``contract`` and precompute its per-step coefficients.

    ``settings`` and the keyword settings (``sampler=``, ``steps=`` …, which replace its fields) are what the run
    gives; ``None`` means "not given": the model's recommendation (``contract.run_defaults``, unless
    ``model_defaults`` is False) fills it where it applies to the sampler, else ``runtime.sampling.settings.defaults``.
    ``schedule`` is the contract's full schedule, if already built. Raises ``SettingsError`` with a one-line reason.
    """
    given_settings = RunSettings.from_kwargs(given, settings)
    T, conditional, guidable = contract.schedule.timesteps, contract.conditional, contract.null_class is not None
    if problems := given_settings.problems(T, conditional, guidable):
        raise SettingsError(problems[0][1])
    rec = contract.run_defaults if model_defaults else None
    values: dict[str, Any] = {}
    from_model = []
    for f in SETTINGS:
        value = getattr(given_settings, f.name)
        recommended = None if rec is None else getattr(rec, f.name)
        sampler = values.get("sampler")
        if value is None and recommended is not None and (sampler is None or applies(f.name, sampler)) and (
                not f.metadata["per_sampler"] or rec.sampler in (None, sampler)):
            value = recommended
            from_model.append(f.name)
        if value is None:
            value = defaults(sampler or "ddpm", T)[f.name]
        if f.metadata["new"] and value == f.metadata["implicit"]:
            value = None  # the same run reads the same whether or not it named the implicit value
            if from_model and from_model[-1] == f.name:
                from_model.pop()
        values[f.name] = value
    if values["sampler"] == "ddpm" and values["variance"] is None:
        # Full T: the contract's variance (Algorithm 2); respaced: β̃ of the respaced schedule (Improved DDPM).
        values["variance"] = contract.variance if values["steps"] == T else "beta_tilde"
    if values["steps_offset"] is not None and values["spacing"] != "leading":
        if "steps_offset" not in from_model:
            raise SettingsError(f"steps_offset applies to leading spacing only, not to {values['spacing'] or 'linspace'}")
        values["steps_offset"] = None  # a recommendation for the recommended spacing, not for this one
        from_model.remove("steps_offset")
    for name in ("eta", "guidance", "clip_range"):
        values[name] = None if values[name] is None else float(values[name])
    resolved = RunSettings(**values)
    if problems := resolved.problems(T, conditional, guidable):
        raise SettingsError(problems[0][1])
    schedule = schedule or contract.schedule.build()
    if resolved.steps != T:
        try:
            keep = timestep_indices(T, int(resolved.steps), resolved.spacing or "linspace", resolved.steps_offset or 0)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        schedule = schedule.respace(keep)
    coefs = coefficients(resolved.sampler, schedule, eta=resolved.eta, clip_denoised=resolved.clip_denoised,
                         variance=resolved.variance, clip_range=resolved.clip_range or 1.0)
    coefs = for_prediction(coefs, schedule, contract.prediction)
    w = np.full(len(schedule), resolved.guidance)
    if resolved.guidance_interval is not None:
        lo, hi = resolved.guidance_interval
        w[(coefs.timesteps < lo) | (coefs.timesteps > hi)] = 1.0
    return SamplingPlan(resolved, dataclasses.replace(coefs, guidance=w), tuple(from_model))
