"""A run's resolved settings and the per-step coefficients they give: the one place that computes them.

Shaped like diffusers' ``set_timesteps``: ``make_plan`` takes the settings a user gave
(``runtime.sampling.settings.RunSettings``, ``None`` = not given), fills the rest — the model's recommendations
(``contract.run_defaults``) first, then the runtime's defaults (``runtime.sampling.settings.defaults``) —, checks them
against the model's contract, and precomputes every step's coefficients with the sampler's own function
(``runtime.sampling.samplers``). The batch engine (``runtime.sampling.engine``) only indexes them, through the one step
(``runtime.sampling.step``) or its fused ONNX form.

DDPM's σ² is the contract's variance at full T and β̃ when respaced (Improved DDPM). Every sampler runs on the same
respaced schedule: the K model timesteps of the run's ``spacing`` (``schedule.timestep_indices``; by default
``round(linspace(0, T−1, K))``). The coefficients are written for an ε-predictor and re-expressed in what the
model predicts (``for_prediction``: v or x̂₀), so no loop needs to know.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from runtime.errors import SettingsError
from runtime.sampling import samplers
from runtime.sampling.schedule import NoiseSchedule, timestep_indices
from runtime.sampling.settings import NAMES, PER_IMAGE, SETTINGS, RunSettings, applies, defaults
from runtime.sampling.table import StepCoefficients


class Contract(Protocol):
    """What ``make_plan`` reads of a model's contract (``runtime.metadata.SamplingContract``, which imports this
    package: the plan names only the fields it uses)."""

    schedule: Any  # runtime.metadata.ScheduleSpec: timesteps and build()
    conditional: bool
    null_class: int | None
    prediction: str
    variance: str
    run_defaults: RunSettings | None
    tuned_timesteps: dict[str, list[int]]  # "K": timesteps ddpm-tune chose for K steps


def coefficients(sampler: str, schedule: NoiseSchedule, **settings: Any) -> StepCoefficients:
    """The step table of a named sampler on ``schedule``, for a noise (ε) predictor: its registry entry's coefficient
    function with the settings of its own that are set (``clip_range`` only where ``clip_denoised`` is on)."""
    entry = samplers.SAMPLERS[sampler]
    given = {name: settings[name] for name in entry.settings if settings.get(name) is not None}
    if not given.get("clip_denoised"):
        given.pop("clip_range", None)
    return entry.coefficients(schedule, **given)


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
                               d_from_x=c.d_from_x + c.d_from_eps * a, d_from_eps=c.d_from_eps * b)


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
        spacing = ("" if self.spacing is None
                   else f" ({self.spacing}{f' + {self.steps_offset}' if self.steps_offset else ''})")
        return f"{self.sampler} {self.steps} steps{spacing}{eta}, guidance {self.guidance:g}{interval}"


def make_plan(contract: Contract, settings: RunSettings | None = None, *, model_defaults: bool = True,
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
    tuned = contract.tuned_timesteps if model_defaults else {}
    if tuned and values["timesteps"] is None and given_settings.spacing is None and values["steps"] != T:
        # a tuned model: its timesteps for this many steps, unless a spacing is asked for
        K = values["steps"]
        if str(K) not in tuned:
            listed = ", ".join(sorted(tuned, key=int))
            raise SettingsError(f"this model has tuned timesteps for {listed} steps, not for {K}; pass --spacing "
                                f"linspace (or another spacing) to run {K} steps with evenly spaced ones")
        values["timesteps"] = tuple(tuned[str(K)])
        from_model.append("timesteps")
    if values["timesteps"] is not None:  # an explicit list: its length is the steps, no spacing chooses them
        listed = len(values["timesteps"])
        if given_settings.steps is not None and given_settings.steps != listed:
            raise SettingsError(f"timesteps lists {listed} timesteps but steps is {given_settings.steps}; "
                                "give one of them, or both in agreement")
        if given_settings.spacing is not None or given_settings.steps_offset is not None:
            raise SettingsError("spacing and steps_offset choose the timesteps of a run without a timesteps list; "
                                "give either a list or a spacing")
        values.update(steps=listed, spacing=None, steps_offset=None)
        from_model = [name for name in from_model if name not in ("steps", "spacing", "steps_offset")]
    if applies("variance", values["sampler"]) and values["variance"] is None:
        # Full T: the contract's variance (Algorithm 2); respaced: β̃ of the respaced schedule (Improved DDPM).
        values["variance"] = contract.variance if values["steps"] == T else "beta_tilde"
    if values["steps_offset"] is not None and values["spacing"] != "leading":
        if "steps_offset" not in from_model:
            raise SettingsError("steps_offset applies to leading spacing only, "
                                f"not to {values['spacing'] or 'linspace'}")
        values["steps_offset"] = None  # a recommendation for the recommended spacing, not for this one
        from_model.remove("steps_offset")
    for name in ("eta", "guidance", "clip_range"):
        values[name] = None if values[name] is None else float(values[name])
    resolved = RunSettings(**values)
    if problems := resolved.problems(T, conditional, guidable):
        raise SettingsError(problems[0][1])
    schedule = schedule or contract.schedule.build()
    if resolved.timesteps is not None:
        keep = np.array(resolved.timesteps[::-1], dtype=np.int64)
    else:
        try:
            keep = timestep_indices(T, int(resolved.steps), resolved.spacing or "linspace", resolved.steps_offset or 0,
                                    schedule.alphas_cumprod)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        # every run records the timesteps it visits (run.json), whatever chose them
        resolved = dataclasses.replace(resolved, timesteps=tuple(int(t) for t in keep[::-1]))
    if len(keep) != T:
        schedule = schedule.respace(keep)
    coefs = coefficients(resolved.sampler, schedule, eta=resolved.eta, clip_denoised=resolved.clip_denoised,
                         variance=resolved.variance, clip_range=resolved.clip_range or 1.0)
    coefs = for_prediction(coefs, schedule, contract.prediction)
    w = np.full(len(schedule), resolved.guidance)
    if resolved.guidance_interval is not None:
        lo, hi = resolved.guidance_interval
        w[(coefs.timesteps < lo) | (coefs.timesteps > hi)] = 1.0
    return SamplingPlan(resolved, dataclasses.replace(coefs, guidance=w), tuple(from_model))
