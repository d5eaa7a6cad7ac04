"""The run settings: every setting a sampling run takes, with its type, default and rule, declared once.

``RunSettings`` is a frozen dataclass; a field left ``None`` means "not given" (``make_plan`` fills it from the
model's recommendations, then from ``default``). Everything else that lists run settings is derived from its
fields: ``ddpm-generate``'s options, the ``/v1/images`` request, the contract's recommended settings
(``SamplingContract.run_defaults`` is a ``RunSettings``), ``--run-defaults KEY=VALUE``, ``run.json`` and the
manifest (``SamplingPlan.run_settings``), ``Pipeline.generate``, ``Scheduler.submit`` and ``DiffusionModel.sample``.
Adding a setting is one field here (with its help and rule) and its use in ``runtime.sampling.plan``.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args

from runtime.sampling import samplers
from runtime.sampling.schedule import SPACINGS
from runtime.sampling.table import FLOAT32_MAX

SAMPLERS: tuple[str, ...] = samplers.NAMES  # the registry's names, in its order
SamplerName = Literal[SAMPLERS]  # type: ignore[valid-type]
Variance = Literal["beta", "beta_tilde"]
Spacing = Literal[SPACINGS]  # type: ignore[valid-type]  # linspace, leading, trailing
VARIANCES: tuple[str, ...] = get_args(Variance)
GUIDANCE_RANGE = (0.0, 50.0)  # w = 0: the unconditional model, 1: the conditional one; images saturate long before 50


@dataclass(frozen=True)
class Context:
    """What a setting's rule depends on: the model's T, whether it is class-conditional and has a null class
    (``guidable``: classifier-free guidance needs one), and the sampler."""

    timesteps: int
    conditional: bool
    sampler: str | None = None
    guidable: bool | None = None  # None: as conditional (a model of this project reserves its null class)

    def unguidable(self, what: str) -> str | None:
        """Why ``what`` cannot be used with this model, or None."""
        if not self.conditional:
            return f"{what} needs a class-conditional model; this one is unconditional"
        if self.guidable is False:
            return (f"{what} needs the model's null ('no class') label, and this model has none: it was not trained "
                    "with one (export it with ddpm-export --null-class K if its training reserved label K for it)")
        return None


# -- each setting's rule: a one-line problem, or None --------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def sampler_problem(sampler: object, ctx: Context) -> str | None:
    return None if sampler in SAMPLERS else f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})"


def steps_problem(steps: object, ctx: Context) -> str | None:
    if not (_is_int(steps) and 1 <= steps <= ctx.timesteps):
        return f"steps must be between 1 and T = {ctx.timesteps}, got {steps}"
    fewest = samplers.SAMPLERS[ctx.sampler].min_steps if ctx.sampler in samplers.SAMPLERS else 1
    if steps < fewest:
        return (f"{ctx.sampler} needs at least {fewest} steps (its first {fewest - 1} warm up its history), "
                f"got {steps}")
    return None


def eta_problem(eta: object, ctx: Context) -> str | None:
    """η ∈ [0, 1]: DDIM's √(1 − ᾱ_{t−1} − σ_t²) is undefined for η > 1 at the last step (t = 1), where ᾱ_0 = 1."""
    if _is_real(eta) and 0 <= eta <= 1:
        return None
    return (f"eta must be between 0 and 1, got {eta} (for eta > 1, DDIM's sigma_t exceeds sqrt(1 - alphabar_(t-1)) "
            "and the update is undefined)" if _is_real(eta) and eta > 1 else
            f"eta must be a number between 0 and 1, got {eta}")


def guidance_problem(guidance: object, ctx: Context) -> str | None:
    lo, hi = GUIDANCE_RANGE
    if not _is_real(guidance) or not abs(guidance) <= FLOAT32_MAX:
        return f"guidance must be a finite number from {lo:g} to {hi:g}, got {guidance!r}"
    if not lo <= guidance <= hi:
        return (f"guidance must be from {lo:g} (unconditional) to {hi:g}, got {guidance:g} (1 is the conditional "
                "model; useful values are about 1 to 10)")
    return ctx.unguidable("guidance") if guidance != 1.0 else None


def interval_problem(interval: object, ctx: Context) -> str | None:
    T = ctx.timesteps
    if not isinstance(interval, tuple | list) or len(interval) != 2 or not all(_is_int(v) for v in interval):
        return f"guidance interval must be two integers LO,HI (model timesteps), got {interval!r}"
    lo, hi = interval
    if not 0 <= lo <= hi < T:
        return f"guidance interval must have 0 <= LO <= HI < T = {T}, got {lo},{hi}"
    return ctx.unguidable("a guidance interval")


def timesteps_problem(timesteps: object, ctx: Context) -> str | None:
    T = ctx.timesteps
    if not isinstance(timesteps, tuple | list) or not timesteps or not all(_is_int(v) for v in timesteps):
        return f"timesteps must be a list of model timesteps (integers), got {timesteps!r}"
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        return ("timesteps must be strictly decreasing (the order a run visits them), "
                f"got {','.join(map(str, timesteps))}")
    if not 0 <= timesteps[-1] <= timesteps[0] < T:
        return f"timesteps must lie in [0, T) = [0, {T}), got {timesteps[0]} … {timesteps[-1]}"
    return None


def clip_problem(clip: object, ctx: Context) -> str | None:
    return None if isinstance(clip, bool) else f"clip_denoised must be true or false, got {clip!r}"


def variance_problem(variance: object, ctx: Context) -> str | None:
    if variance not in VARIANCES:
        return f"unknown variance {variance!r} (expected one of {', '.join(VARIANCES)})"
    return None


def clip_range_problem(bound: object, ctx: Context) -> str | None:
    if _is_real(bound) and 0 < bound <= FLOAT32_MAX:
        return None
    return f"clip_range must be a positive number, got {bound!r}"


def spacing_problem(spacing: object, ctx: Context) -> str | None:
    return None if spacing in SPACINGS else f"unknown spacing {spacing!r} (expected one of {', '.join(SPACINGS)})"


def offset_problem(offset: object, ctx: Context) -> str | None:
    ok = _is_int(offset) and 0 <= offset < ctx.timesteps
    return None if ok else f"steps_offset must be an integer from 0 to T - 1 = {ctx.timesteps - 1}, got {offset!r}"


def parse_interval(text: str) -> tuple[int, int]:
    """``"200,700"`` → (200, 700); ValueError if it is not two integers."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"guidance interval must be two integers LO,HI (model timesteps), got {text!r}") from None
    return lo, hi


def parse_timesteps(text: str) -> tuple[int, ...]:
    """``"999,600,200,0"`` → (999, 600, 200, 0); ValueError if they are not integers."""
    try:
        return tuple(int(p.strip()) for p in str(text).split(","))
    except ValueError:
        raise ValueError(f"timesteps must be integers T1,T2,... (model timesteps, decreasing), got {text!r}") from None


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def setting(help: str, rule: Callable[[object, Context], str | None], parse: Callable[[str], Any], *,
            specific: bool = False, per_sampler: bool = False, per_image: bool = False,
            new: bool = False, implicit: Any = None, bounds: tuple[float | None, float | None] = (None, None),
            metavar: str | None = None) -> Any:
    """A ``RunSettings`` field (default None = not given) and what is derived from it.

    ``help``: the text of its CLI option and HTTP field; ``rule``: its validator; ``parse``: from a string
    (``--run-defaults``); ``specific``: it applies only to the samplers that list it in their ``settings``
    (``runtime.sampling.samplers``; given for another: an error; recommended for another: not used); ``per_sampler``: a
    recommendation of it holds for the recommended sampler only; ``per_image``: each manifest record carries it;
    ``new``: added after run folders existed, so ``run.json`` records it only when set (folders of earlier versions
    resume); ``implicit``: a new setting's value when not set (a run that gives exactly it is recorded as not setting
    it, so the same run reads the same); ``bounds``: (min, max) of a number, for documents such as the OpenAPI schema
    (``rule`` enforces them); ``metavar``: how a list is written on the command line.
    """
    return field(default=None, metadata={"help": help, "rule": rule, "parse": parse, "specific": specific,
                                         "per_sampler": per_sampler, "per_image": per_image, "new": new,
                                         "implicit": implicit, "bounds": bounds, "metavar": metavar})


@dataclass(frozen=True)
class RunSettings:
    """The settings of a sampling run; ``None`` = not given (see the module docstring)."""

    sampler: SamplerName | None = setting(
        "; ".join(f"{s.name}: {s.summary}" for s in samplers.SAMPLERS.values())
        + ". Default: the model's recommendation, else ddpm.", sampler_problem, str, per_image=True)
    steps: int | None = setting(
        "Sampling steps (1 ... T; the same model timesteps for every sampler; at least "
        + ", ".join(f"{s.min_steps} for {s.name}" for s in samplers.SAMPLERS.values() if s.min_steps > 1)
        + ", whose first steps warm up their history). Default: the model's recommendation for this sampler, else "
        + ", ".join(f"{'T' if s.default_steps is None else s.default_steps} for {s.name}"
                    for s in samplers.SAMPLERS.values()) + ".",
        steps_problem, int, per_sampler=True, per_image=True, bounds=(1, None))
    eta: float | None = setting(
        "DDIM noise scale in [0, 1] (0: deterministic, 1: DDPM-like). Default: the model's "
        "recommendation, else 0.", eta_problem, float, specific=True, per_sampler=True, per_image=True,
        bounds=(0, 1))
    guidance: float | None = setting(
        "Classifier-free guidance scale w: eps = eps_uncond + w (eps_cond - eps_uncond); 1 = conditional only. "
        f"Default: the model's recommendation, else 1. From {GUIDANCE_RANGE[0]:g} to {GUIDANCE_RANGE[1]:g}.",
        guidance_problem, float, per_image=True, bounds=GUIDANCE_RANGE)
    guidance_interval: tuple[int, int] | None = setting(
        "LO,HI: guidance only on the steps whose model timestep t lies in [LO, HI] (0 <= LO <= HI < T; "
        "Kynkaanniemi et al. 2024); the other steps use w = 1 and make no null-class prediction. "
        "Default: the model's recommendation, else every step (0,T-1 also means every step).",
        interval_problem, parse_interval, per_image=True, new=True, metavar="LO,HI")
    clip_denoised: bool | None = setting(
        "Clip the predicted x0 to [-clip_range, clip_range] in each step (ddpm: the posterior-mean form). "
        "Default: the model's recommendation, else off.", clip_problem, parse_bool, specific=True)
    clip_range: float | None = setting(
        "The bound of clip_denoised (diffusers' clip_sample_range). Default: the model's recommendation, else 1.",
        clip_range_problem, float, specific=True, new=True, implicit=1.0)
    spacing: Spacing | None = setting(
        "Which model timesteps a run of fewer than T steps visits (diffusers' timestep_spacing): linspace = "
        "round(linspace(0, T-1, steps)); leading = k*(T//steps) + steps_offset; trailing = round(T - k*T/steps) - 1; "
        "logsnr = the timesteps nearest to steps values evenly spaced in log-SNR. "
        "Default: the model's recommendation, else linspace.", spacing_problem, str, new=True, implicit="linspace")
    timesteps: tuple[int, ...] | None = setting(
        "The model timesteps a run visits, strictly decreasing, in [0, T) (e.g. 999,700,400,100,0): steps is their "
        "count, and spacing does not apply. Every run records the ones it used in run.json. Default: the ones "
        "spacing gives.", timesteps_problem, parse_timesteps, new=True, metavar="T1,T2,...")
    steps_offset: int | None = setting(
        "Added to every timestep of leading spacing (diffusers' steps_offset). Default: the model's "
        "recommendation, else 0.", offset_problem, int, new=True, implicit=0, bounds=(0, None))
    variance: Variance | None = setting(
        "DDPM sigma^2. Default: the model's recommendation, else the contract's (beta) at full T and "
        "beta_tilde when respaced.", variance_problem, str, specific=True)

    def __post_init__(self) -> None:
        for name in ("guidance_interval", "timesteps"):
            if isinstance(getattr(self, name), list):  # JSON has no tuples
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.steps, float) and self.steps.is_integer():  # 50.0 is 50 steps
            object.__setattr__(self, "steps", int(self.steps))

    def problems(self, timesteps: int, conditional: bool, guidable: bool | None = None) -> list[tuple[str, str]]:
        """(field, problem) of every given setting that breaks its rule for such a model."""
        ctx = Context(timesteps, conditional, self.sampler if self.sampler in SAMPLERS else None, guidable)
        found = []
        for f in SETTINGS:
            value = getattr(self, f.name)
            if value is None:
                continue
            if ctx.sampler is not None and not applies(f.name, ctx.sampler):
                takers = taking(f.name)
                found.append((f.name, f"{f.name} applies to the {', '.join(takers)} sampler{'s' * (len(takers) > 1)} "
                                      f"only, not to {ctx.sampler}"))
            elif problem := f.metadata["rule"](value, ctx):
                found.append((f.name, problem))
        return found

    def given(self) -> dict[str, Any]:
        """The settings that are not None."""
        return {f.name: getattr(self, f.name) for f in SETTINGS if getattr(self, f.name) is not None}

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (the interval as a list)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in SETTINGS}

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], base: RunSettings | None = None) -> RunSettings:
        """``base`` with the named settings replaced; an unknown name is a TypeError naming it."""
        unknown = sorted(set(kwargs) - set(NAMES))
        if unknown:
            raise TypeError(f"unknown run setting {unknown[0]!r} (run settings: {', '.join(NAMES)})")
        return dataclasses.replace(base or cls(), **kwargs)

    @classmethod
    def parse(cls, text: str | None) -> RunSettings | None:
        """``"sampler=ddim,steps=50,guidance=1.5"`` (``--run-defaults``) → RunSettings; ``""``/``"none"`` → None.

        A list (the interval, timesteps) is written with ``:``, e.g. ``guidance_interval=200:700``.
        ValueError if malformed.
        """
        if text is None or text.strip().lower() in ("", "none"):
            return None
        values = {}
        for item in text.split(","):
            key, sep, value = (part.strip() for part in item.partition("="))
            key = key.replace("-", "_")
            if not sep or key not in NAMES:
                raise ValueError(f"expected KEY=VALUE with KEY one of {', '.join(NAMES)}, got {item.strip()!r}")
            parse = FIELDS[key].metadata["parse"]
            try:
                values[key] = parse(value.replace(":", ",") if FIELDS[key].metadata["metavar"] else value)
            except ValueError as e:
                kind = {int: "n integer", float: " number"}.get(parse)
                raise ValueError(f"{key} needs a{kind}, got {value!r}" if kind else f"{key}: {e}") from None
        return cls(**values)


def applies(name: str, sampler: str) -> bool:
    """Whether the setting ``name`` means anything for ``sampler`` (a specific one: the sampler lists it)."""
    return not FIELDS[name].metadata["specific"] or name in samplers.SAMPLERS[sampler].settings


def taking(name: str) -> list[str]:
    """The samplers the setting ``name`` applies to."""
    return [s for s in SAMPLERS if applies(name, s)]


def help_text(name: str) -> str:
    """The help of the setting ``name`` (its CLI option, its HTTP field), with the samplers it applies to where it
    is sampler-specific (from the registry)."""
    f = FIELDS[name]
    takers = taking(name)
    return f.metadata["help"] + (f" Applies to {', '.join(takers)} only." if f.metadata["specific"] else "")


def defaults(sampler: str, timesteps: int) -> dict[str, Any]:
    """The runtime's value of every setting a run leaves unset (no recommendation either) for ``sampler``.

    The paper's DDPM (Algorithm 2) at all T steps, w = 1 on every step, no clipping; every other sampler its
    registry entry's ``default_steps`` (at most T), η = 0 where it applies. ``variance`` None: ``make_plan`` takes the
    contract's at full T and β̃ when respaced. The new settings' None is their ``implicit`` value (clip range 1,
    linspace spacing, offset 0); a setting that does not apply to ``sampler`` is None.
    """
    steps = samplers.SAMPLERS[sampler].default_steps
    values = {"sampler": "ddpm", "steps": timesteps if steps is None else min(steps, timesteps), "eta": 0.0,
              "guidance": 1.0, "guidance_interval": None, "clip_denoised": False, "variance": None, "clip_range": None,
              "spacing": None, "steps_offset": None, "timesteps": None}
    return {name: value if applies(name, sampler) else None for name, value in values.items()}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


SETTINGS: tuple[dataclasses.Field, ...] = dataclasses.fields(RunSettings)
NAMES: tuple[str, ...] = tuple(f.name for f in SETTINGS)
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in SETTINGS}
PER_IMAGE: tuple[str, ...] = tuple(f.name for f in SETTINGS if f.metadata["per_image"])
