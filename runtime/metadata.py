"""The sampling contract: everything a runtime needs to sample from an exported noise predictor.

One versioned dataclass with a strict JSON round trip. It travels inside every exported model (ONNX
``metadata_props``, TorchScript extra files) under the key ``CONTRACT_KEY``. Reading a contract with a
missing or unknown field, an unknown value or a newer schema version raises ``ContractError`` naming
the field. Schema 2 added ``run_defaults`` (the run settings a model recommends: sampler, steps, eta, guidance);
schema 3 lets it hold every run setting (``runtime.sampling.settings.RunSettings``); schema 4 (models from elsewhere)
adds ``prediction`` (epsilon, v_prediction or sample; it replaces ``prediction_type``, which could only be epsilon),
an explicit ``null_class`` (or none: no guidance), the scaled_linear, sigmoid and explicit β schedules (``betas``),
``provenance.source`` and, as run settings, ``clip_range``, ``spacing`` and ``steps_offset``. Schema 5 added
``tuned_timesteps`` and ``tuning`` (ddpm-tune). Schema 6 (latent models) separates the latent from the image:
``stages`` lists the networks in the order they run, the denoiser (its inputs and outputs, which were the top-level
``inputs``/``outputs`` before; on a latent model its x is the latent) and, for a latent model, a decoder (its file and
sha256, its input scaling and its output's pixel range); ``image_size``/``channels`` are always the image the user
gets. Older contracts read as the current schema: schema 1 as having no recommendations, schema 2's recommendations
with the later settings not given, schemas 1-3 as predicting ε with the null class after the classes (the ddpm-train
convention), schemas 1-5 as one denoiser on the image.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np

from runtime.errors import ContractError
from runtime.sampling.schedule import MAX_TIMESTEPS, SCHEDULE_NAMES, NoiseSchedule, default_params, make_betas
from runtime.sampling.settings import VARIANCES, RunSettings

SCHEMA_VERSION = 6  # 5: tuned_timesteps and tuning (ddpm-tune); 6: stages (latent models: a decoder after the loop)
SCHEMA_2_RUN_DEFAULTS = ("sampler", "steps", "eta", "guidance")  # what run_defaults held before schema 3
SCHEMA_3_RUN_DEFAULTS = (*SCHEMA_2_RUN_DEFAULTS, "guidance_interval", "clip_denoised", "variance")  # before 4
SCHEMA_4_RUN_DEFAULTS = (*SCHEMA_3_RUN_DEFAULTS, "clip_range", "spacing", "steps_offset")  # before 5
CONTRACT_KEY = "ddpm_contract"  # ONNX metadata_props key
STAGE_KEY = "ddpm_stage"  # ONNX metadata_props key of a stage in a file of its own: the stage's name
CONTRACT_FILE = "ddpm_contract.json"  # TorchScript extra-file name
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what the network outputs (diffusers' names)
AFTER_CLASSES = "after_classes"  # null_class default: the label num_classes (ddpm-train's convention)
TENSOR_DTYPES = ("float32", "float16", "int64")  # what a contract's inputs and outputs may be
STAGES = ("denoiser", "decoder")  # the networks a model may have, in the order they run


@dataclass(frozen=True)
class ScheduleSpec:
    """Which noise schedule the model was trained with: name, T and the schedule's parameters (``explicit``: its
    T betas, e.g. diffusers' ``trained_betas``; None for the named schedules)."""

    name: Literal["linear", "scaled_linear", "cosine", "sigmoid", "explicit"] = "linear"
    timesteps: int = 1000
    params: dict[str, float] = field(default_factory=lambda: default_params("linear"))
    betas: list[float] | None = None

    def build(self) -> NoiseSchedule:
        """The full T-step schedule tables (float64)."""
        return NoiseSchedule.from_name(self.name, self.timesteps, self.betas, **self.params)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, dtype and symbolic shape (strings are dynamic dimensions)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class Provenance:
    """Where the model came from. Free-form strings; ``None`` where unknown."""

    dataset: str | None = None
    training_steps: int | None = None
    package: str | None = None
    package_version: str | None = None
    torch_version: str | None = None
    exporter: str | None = None
    exporter_version: str | None = None
    source: str | None = None  # what it was exported from, e.g. "diffusers UNet2DModel + DDPMScheduler (0.42.1)"


@dataclass(frozen=True)
class Stage:
    """One network of a model, in ``STAGES`` order: the ``denoiser`` (always; inside the model file) and, for a latent
    model, the ``decoder`` that turns each finished latent into the image, once.

    ``file``/``sha256``: a stage in a file of its own beside the model file (its name there, and its SHA-256, which
    binds it to this contract); None for one inside the model file. ``inputs``/``outputs``: its graph's tensors.
    The denoiser's x is the latent (the image, for a pixel-space model); ``prediction_channels``: where it outputs
    more channels than x has (DiT's learned variance), the first this many are the prediction (the samplers use
    those, with fixed variances, and ignore the rest); None: all of them. The decoder's input is
    ``latent / scaling_factor + shift`` and its output an image in ``pixel_range``."""

    name: Literal["denoiser", "decoder"]
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    file: str | None = None
    sha256: str | None = None
    prediction_channels: int | None = None
    scaling_factor: float | None = None
    shift: float | None = None
    pixel_range: tuple[float, float] | None = None


RunDefaults = RunSettings  # the run settings a model recommends: the same type a run gives (None: no recommendation)


@dataclass(frozen=True)
class SamplingContract:
    """The sampling contract of one exported model (schema ``SCHEMA_VERSION``).

    Images are (B, channels, image_size, image_size) float32 in ``pixel_range``; class-conditional
    models take labels 0 … num_classes−1 and, for classifier-free guidance, ``null_class`` (the unconditional
    label: ``num_classes``, as ddpm-train reserves it, by default; ``None``: the model has none, and guidance is
    refused). The denoiser's output is ``prediction``: ε, v or x̂₀. ``stages``: the networks (``Stage``): the
    denoiser (by default on the image, with inputs x, t[, y] and output eps), then a decoder for a latent model.
    """

    image_size: int
    channels: int
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    pixel_range: tuple[float, float] = (-1.0, 1.0)
    prediction: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    variance: Literal["beta", "beta_tilde"] = "beta"
    num_classes: int = 0
    null_class: int | None = AFTER_CLASSES  # type: ignore[assignment]  # resolved in __post_init__
    class_names: list[str] = field(default_factory=list)
    ema: bool = False
    stages: list[Stage] = field(default_factory=list)
    provenance: Provenance = field(default_factory=Provenance)
    run_defaults: RunDefaults | None = None
    tuned_timesteps: dict[str, list[int]] = field(default_factory=dict)  # "K": the K timesteps ddpm-tune chose
    tuning: dict | None = None  # how they were chosen: method, the source model's sha256, the reference run
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.null_class == AFTER_CLASSES:
            object.__setattr__(self, "null_class",
                               self.num_classes if _is_int(self.num_classes) and self.num_classes > 0 else None)
        if not self.stages:
            object.__setattr__(self, "stages", [Stage("denoiser")])
        first = self.stages[0] if isinstance(self.stages, list) else None
        if isinstance(first, Stage) and len(self.stages) == 1 and not (first.inputs and first.outputs):
            object.__setattr__(self, "stages", [replace(  # a pixel-space denoiser: x, t[, y] on the image, eps out
                first, inputs=first.inputs or default_inputs(self.channels, self.image_size, self.num_classes),
                outputs=first.outputs or default_outputs(self.channels, self.image_size))])
        _validate(self)

    @property
    def denoiser(self) -> Stage:
        return self.stages[0]

    @property
    def decoder(self) -> Stage | None:
        """The decoder of a latent model; None for a pixel-space model."""
        return self.stages[1] if len(self.stages) > 1 else None

    @property
    def inputs(self) -> list[TensorSpec]:
        """The denoiser's inputs (x, t[, y])."""
        return self.denoiser.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        """The denoiser's outputs."""
        return self.denoiser.outputs

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser works on: the latent (the image, for a pixel-space model)."""
        return tuple(self.inputs[0].shape[1:])  # type: ignore[return-value]

    @property
    def prediction_channels(self) -> int | None:
        """How many leading output channels of the denoiser are the prediction (None: all)."""
        return self.denoiser.prediction_channels

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def guidable(self) -> bool:
        """Whether classifier-free guidance can run: the model is class-conditional and has a null label."""
        return self.null_class is not None

    @property
    def labels(self) -> int:
        """How many label values the network takes: the classes, and the null label where there is one."""
        return self.num_classes + (1 if self.guidable else 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel_range"] = list(self.pixel_range)
        for stage in d["stages"]:
            if stage["pixel_range"] is not None:
                stage["pixel_range"] = list(stage["pixel_range"])
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> SamplingContract:
        if not isinstance(data, dict):
            raise ContractError("contract: expected a JSON object")
        version = data.get("schema_version")
        if version is None:
            raise ContractError("contract field 'schema_version': missing")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ContractError(f"contract field 'schema_version': expected a positive integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise ContractError(
                f"contract field 'schema_version': {version} is newer than this runtime understands "
                f"({SCHEMA_VERSION}); upgrade ddpm-toolkit"
            )
        if version == 1:  # schema 1 had no run_defaults
            data = {**data, "run_defaults": data.get("run_defaults")}
        if version < 5 and isinstance(data.get("run_defaults"), dict):  # fewer settings could be recommended
            rd = data["run_defaults"]
            known = (SCHEMA_2_RUN_DEFAULTS if version < 3 else SCHEMA_3_RUN_DEFAULTS if version < 4
                     else SCHEMA_4_RUN_DEFAULTS)
            extra = sorted(set(rd) - set(known))
            if extra:
                raise ContractError(f"contract field 'run_defaults.{extra[0]}': unknown field "
                                    f"(in a schema {version} contract)")
            data = {**data, "run_defaults": {name: rd.get(name) for name in RunSettings.__dataclass_fields__}}
        if version < 4:  # ε only, the null class after the classes, named schedules only
            data = _as_schema_4(data)
        if version < 5:  # no tuned timesteps before ddpm-tune
            data = {"tuned_timesteps": {}, "tuning": None, **data}
        if version < 6:  # one denoiser on the image: its inputs and outputs were the contract's
            data = dict(data)
            denoiser = {f.name: None for f in fields(Stage)} | {"name": "denoiser"}
            for key in ("inputs", "outputs"):
                if key not in data:
                    raise ContractError(f"contract field '{key}': missing")
                denoiser[key] = data.pop(key)
            data["stages"] = [denoiser]
        data = {**data, "schema_version": SCHEMA_VERSION}  # read as the current schema
        kw = _fields(cls, data, "")
        kw["schedule"] = ScheduleSpec(**_fields(ScheduleSpec, kw["schedule"], "schedule."))
        kw["provenance"] = Provenance(**_fields(Provenance, kw["provenance"], "provenance."))
        if kw["run_defaults"] is not None:
            kw["run_defaults"] = RunDefaults(**_fields(RunDefaults, kw["run_defaults"], "run_defaults."))
        if not isinstance(kw["stages"], list) or not kw["stages"]:
            raise ContractError("contract field 'stages': expected a non-empty list")
        stages = []
        for n, raw in enumerate(kw["stages"]):
            st = _fields(Stage, raw, f"stages[{n}].")
            for key in ("inputs", "outputs"):
                if not isinstance(st[key], list):
                    raise ContractError(f"contract field 'stages[{n}].{key}': expected a list")
                st[key] = [TensorSpec(**_fields(TensorSpec, s, f"stages[{n}].{key}[{i}]."))
                           for i, s in enumerate(st[key])]
            if isinstance(st["pixel_range"], list):
                st["pixel_range"] = tuple(st["pixel_range"])
            stages.append(Stage(**st))
        kw["stages"] = stages
        if not isinstance(kw["pixel_range"], list | tuple):
            raise ContractError("contract field 'pixel_range': expected [low, high]")
        kw["pixel_range"] = tuple(kw["pixel_range"])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str | bytes) -> SamplingContract:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ContractError(f"contract: not valid JSON ({e})") from None
        return cls.from_dict(data)


def _as_schema_4(data: dict) -> dict:
    """A schema 1-3 contract's dict in schema 4's fields (``prediction_type`` → ``prediction``, ``null_class``,
    ``schedule.betas``); what it lacks or gets wrong is left for the strict reading to name."""
    data = dict(data)
    if "prediction_type" in data:
        data["prediction"] = data.pop("prediction_type")
    classes = data.get("num_classes")
    data.setdefault("null_class", classes if _is_int(classes) and classes > 0 else None)
    if isinstance(data.get("schedule"), dict):
        data["schedule"] = {"betas": None, **data["schedule"]}
    if isinstance(data.get("provenance"), dict):
        data["provenance"] = {"source": None, **data["provenance"]}
    return data


def default_inputs(channels: int, image_size: int, num_classes: int) -> list[TensorSpec]:
    """x float32 [B,C,H,W], t int64 [B], and y int64 [B] for class-conditional models."""
    specs = [
        TensorSpec("x", "float32", ["batch", channels, image_size, image_size]),
        TensorSpec("t", "int64", ["batch"]),
    ]
    if num_classes > 0:
        specs.append(TensorSpec("y", "int64", ["batch"]))
    return specs


def default_outputs(channels: int, image_size: int) -> list[TensorSpec]:
    return [TensorSpec("eps", "float32", ["batch", channels, image_size, image_size])]


def latent_stages(latent_channels: int, latent_size: int, *, channels: int, image_size: int, num_classes: int = 0,
                  out_channels: int | None = None, scaling_factor: float = 1.0, shift: float = 0.0) -> list[Stage]:
    """The stages of a latent model: a denoiser on (latent_channels, latent_size, latent_size) latents (x, t[, y];
    output eps of ``out_channels``, default the latent's, the first latent_channels of them the prediction), then a
    decoder ``z`` → ``image`` (channels, image_size, image_size) in [-1, 1] of ``z = latent / scaling_factor +
    shift``. ``ddpm-export`` fills in the decoder's file and sha256."""
    out = out_channels or latent_channels
    return [Stage("denoiser", default_inputs(latent_channels, latent_size, num_classes),
                  default_outputs(out, latent_size), prediction_channels=latent_channels if out != latent_channels
                  else None),
            Stage("decoder", [TensorSpec("z", "float32", ["batch", latent_channels, latent_size, latent_size])],
                  [TensorSpec("image", "float32", ["batch", channels, image_size, image_size])],
                  scaling_factor=float(scaling_factor), shift=float(shift), pixel_range=(-1.0, 1.0))]


def _fields(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """The dict's entries for ``cls``'s fields; missing or unknown keys raise ContractError."""
    if not isinstance(data, dict):
        raise ContractError(f"contract field '{prefix.rstrip('.') or 'contract'}': expected a JSON object")
    names = [f.name for f in fields(cls) if f.init]
    missing = [n for n in names if n not in data]
    if missing:
        raise ContractError(f"contract field '{prefix}{missing[0]}': missing")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ContractError(f"contract field '{prefix}{unknown[0]}': unknown field")
    return {n: data[n] for n in names}


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ContractError(f"contract field '{name}': {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(c: SamplingContract) -> None:
    _check(_is_int(c.schema_version) and 1 <= c.schema_version <= SCHEMA_VERSION, "schema_version",
           f"unsupported version {c.schema_version!r}")
    _check(_is_int(c.image_size) and c.image_size > 0, "image_size",
           f"expected a positive integer, got {c.image_size!r}")
    _check(c.channels in (1, 3) and _is_int(c.channels), "channels", f"expected 1 or 3, got {c.channels!r}")
    lo_hi = c.pixel_range
    _check(len(lo_hi) == 2 and all(isinstance(v, int | float) for v in lo_hi) and tuple(lo_hi) == (-1.0, 1.0),
           "pixel_range", f"only [-1, 1] is supported, got {list(lo_hi)!r}")
    _check(c.prediction in PREDICTION_TYPES, "prediction",
           f"unknown value {c.prediction!r} (expected one of {', '.join(PREDICTION_TYPES)})")
    _check(c.variance in VARIANCES, "variance",
           f"unknown value {c.variance!r} (expected one of {', '.join(VARIANCES)})")
    _check(_is_int(c.num_classes) and c.num_classes >= 0, "num_classes",
           f"expected a non-negative integer, got {c.num_classes!r}")
    _check(isinstance(c.class_names, list) and all(isinstance(n, str) for n in c.class_names), "class_names",
           "expected a list of strings")
    _check(len(c.class_names) in (0, c.num_classes), "class_names",
           f"has {len(c.class_names)} names for {c.num_classes} classes")
    _check(isinstance(c.ema, bool), "ema", f"expected true or false, got {c.ema!r}")
    _check(c.null_class is None or (_is_int(c.null_class) and c.conditional and c.null_class == c.num_classes),
           "null_class", f"expected none or the label after the classes, num_classes = {c.num_classes}, of a "
                         f"class-conditional model (the classes are 0 ... num_classes - 1), got {c.null_class!r}")
    s = c.schedule
    _check(s.name in SCHEDULE_NAMES, "schedule.name",
           f"unknown value {s.name!r} (expected one of {', '.join(SCHEDULE_NAMES)})")
    _check(_is_int(s.timesteps) and 0 < s.timesteps <= MAX_TIMESTEPS, "schedule.timesteps",
           f"expected an integer from 1 to {MAX_TIMESTEPS}, got {s.timesteps!r}")
    _check(isinstance(s.params, dict), "schedule.params", "expected an object")
    expected = set(default_params(s.name))
    _check(set(s.params) == expected, "schedule.params",
           f"{s.name} schedule takes exactly {sorted(expected)}, got {sorted(s.params)}")
    for k, v in s.params.items():
        _check(isinstance(v, int | float) and math.isfinite(v), f"schedule.params.{k}", f"expected a number, got {v!r}")
    explicit = s.name == "explicit"
    _check((s.betas is not None) == explicit, "schedule.betas",
           "an explicit schedule needs its betas" if explicit
           else f"only an explicit schedule lists betas, not {s.name}")
    _check(s.betas is None or (isinstance(s.betas, list) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                                 for v in s.betas)),
           "schedule.betas", "expected a list of numbers")
    try:
        betas = make_betas(s.name, s.timesteps, s.betas, **s.params)
    except ValueError as e:
        raise ContractError(f"contract field 'schedule.{'betas' if explicit else 'params'}': {e}") from None
    _check(bool(np.all((betas > 0) & (betas <= 1))), "schedule.params",
           f"the {s.name} schedule with {s.params} gives betas outside (0, 1]")
    _validate_stages(c)
    r = c.run_defaults
    if r is not None:
        _check(isinstance(r, RunDefaults), "run_defaults", "expected an object")
        for name, problem in r.problems(s.timesteps, c.conditional, c.guidable):
            _check(False, f"run_defaults.{name}", problem)
    tuned = c.tuned_timesteps
    _check(isinstance(tuned, dict), "tuned_timesteps", "expected an object of step counts")
    for key, timesteps in tuned.items():
        _check(isinstance(key, str) and key.isdigit() and int(key) > 0, "tuned_timesteps",
               f"expected step counts as keys, got {key!r}")
        _check(isinstance(timesteps, list) and len(timesteps) == int(key) and all(_is_int(t) for t in timesteps)
               and all(a > b for a, b in zip(timesteps, timesteps[1:])) and 0 <= timesteps[-1]
               and timesteps[0] < s.timesteps, f"tuned_timesteps.{key}",
               f"expected {key} strictly decreasing model timesteps in [0, {s.timesteps}), got {timesteps!r}")
    _check(c.tuning is None or isinstance(c.tuning, dict), "tuning", "expected an object or null")
    p = c.provenance
    _check(p.training_steps is None or (_is_int(p.training_steps) and p.training_steps >= 0),
           "provenance.training_steps", f"expected a non-negative integer, got {p.training_steps!r}")
    for f in fields(Provenance):
        if f.name != "training_steps":
            v = getattr(p, f.name)
            _check(v is None or isinstance(v, str), f"provenance.{f.name}", f"expected a string, got {v!r}")


def _validate_stages(c: SamplingContract) -> None:
    """The stages: the denoiser, then optionally a decoder; their tensors, the latent between them, the image."""
    _check(isinstance(c.stages, list) and all(isinstance(st, Stage) for st in c.stages)
           and [st.name for st in c.stages] in (list(STAGES[:1]), list(STAGES)), "stages",
           f"expected the denoiser, then optionally a decoder, got {[getattr(st, 'name', st) for st in c.stages]}")
    for n, st in enumerate(c.stages):
        for key in ("inputs", "outputs"):
            where = f"stages[{n}].{key}"
            _check(isinstance(getattr(st, key), list) and len(getattr(st, key)) > 0, where,
                   "expected a list of tensors")
            for i, spec in enumerate(getattr(st, key)):
                _check(isinstance(spec.name, str) and spec.name != "", f"{where}[{i}].name",
                       "expected a non-empty string")
                _check(spec.dtype in TENSOR_DTYPES, f"{where}[{i}].dtype",
                       f"unknown value {spec.dtype!r} (expected one of {', '.join(TENSOR_DTYPES)})")
                _check(isinstance(spec.shape, list) and all(_is_int(d) or isinstance(d, str) for d in spec.shape),
                       f"{where}[{i}].shape", "expected a list of integers and dimension names")
    den, dec = c.stages[0], c.decoder
    _check(den.file is None and den.sha256 is None, "stages[0].file", "the denoiser is the model file itself")
    _check(den.scaling_factor is None and den.shift is None and den.pixel_range is None, "stages[0]",
           "scaling_factor, shift and pixel_range are a decoder's")
    names = [spec.name for spec in den.inputs]
    _check(names[:2] == ["x", "t"] and (("y" in names) == c.conditional), "stages[0].inputs",
           f"expected x, t{', y' if c.conditional else ''}, got {', '.join(names)}")
    x, out = den.inputs[0].shape, den.outputs[0].shape
    _check(len(x) == 4 and all(_is_int(d) and d > 0 for d in x[1:]) and x[2] == x[3], "stages[0].inputs[0].shape",
           f"expected [batch, channels, size, size], got {x}")
    latent = list(x[1:])
    image = [c.channels, c.image_size, c.image_size]
    _check(dec is not None or latent == image, "stages[0].inputs[0].shape",
           f"expected [batch, {c.channels}, {c.image_size}, {c.image_size}] (channels, image_size; a model "
           f"without a decoder works on the image), got {x}")
    p = den.prediction_channels
    _check(p is None or (_is_int(p) and p == latent[0]), "stages[0].prediction_channels",
           f"expected none or the latent's {latent[0]} channels, got {p!r}")
    wide = latent[0] if p is None else "more"
    _check(len(out) == 4 and out[2:] == latent[1:] and _is_int(out[1])
           and (out[1] == latent[0] if p is None else out[1] > latent[0]), "stages[0].outputs[0].shape",
           f"expected [batch, {wide} channels, {latent[1]}, {latent[2]}] (prediction_channels says how many are the "
           f"prediction), got {out}")
    if dec is None:
        return
    _check((dec.file is None) == (dec.sha256 is None), "stages[1].sha256",
           "a decoder in a file of its own needs the file's sha256 (and one inside the model file neither)")
    _check(dec.file is None or (isinstance(dec.file, str) and dec.file not in ("", ".", "..")
                                and "/" not in dec.file and "\\" not in dec.file),
           "stages[1].file", f"expected a file name beside the model file, got {dec.file!r}")
    _check(dec.sha256 is None or (isinstance(dec.sha256, str) and len(dec.sha256) == 64
                                  and all(ch in "0123456789abcdef" for ch in dec.sha256)),
           "stages[1].sha256", f"expected 64 hex digits, got {dec.sha256!r}")
    _check(dec.prediction_channels is None, "stages[1].prediction_channels", "only the denoiser predicts")
    _check(isinstance(dec.scaling_factor, int | float) and not isinstance(dec.scaling_factor, bool)
           and math.isfinite(dec.scaling_factor) and dec.scaling_factor > 0, "stages[1].scaling_factor",
           f"expected a positive number, got {dec.scaling_factor!r}")
    _check(isinstance(dec.shift, int | float) and not isinstance(dec.shift, bool) and math.isfinite(dec.shift),
           "stages[1].shift", f"expected a number, got {dec.shift!r}")
    _check(dec.pixel_range is not None and len(dec.pixel_range) == 2 and tuple(dec.pixel_range) == (-1.0, 1.0),
           "stages[1].pixel_range", f"only [-1, 1] is supported, got {dec.pixel_range!r}")
    _check(len(dec.inputs) == 1 and dec.inputs[0].shape[1:] == latent and len(dec.inputs[0].shape) == 4,
           "stages[1].inputs", f"expected one input [batch, {', '.join(map(str, latent))}] (the denoiser's latent), "
                               f"got {[s.shape for s in dec.inputs]}")
    _check(len(dec.outputs) == 1 and dec.outputs[0].shape[1:] == image and len(dec.outputs[0].shape) == 4,
           "stages[1].outputs", f"expected one output [batch, {', '.join(map(str, image))}] (channels, image_size), "
                                f"got {[s.shape for s in dec.outputs]}")
