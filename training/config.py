"""``ModelConfig``: what defines a trained model — the checkpoint's hyperparameters as one typed dataclass.

No Lightning (torch only through ``training.unet``'s ``UNetConfig``): training builds ``DiffusionModel`` from it, export
reads it back from a checkpoint (``ModelConfig.from_hparams``), and it is the one place where hyperparameters become a
``UNetConfig``, a noise schedule and a ``SamplingContract``. ``to_hparams`` is exactly the dict a checkpoint stores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from runtime.metadata import Provenance, RunDefaults, SamplingContract, ScheduleSpec
from runtime.sampling.schedule import SCHEDULE_NAMES, default_params
from training.unet import UNetConfig

TRAINABLE_SCHEDULES = tuple(n for n in SCHEDULE_NAMES if n != "explicit")  # the named ones: a trainer makes its betas
GRID_SAMPLER = "dpmpp-2m"  # the sample grids' default: 20 steps instead of DDPM's T = 1000

# Every ddpm-train checkpoint has these; the other fields were added later and read as their defaults.
REQUIRED_HPARAMS = ("in_size", "t_range", "img_depth", "schedule", "base_channels", "channel_mult",
                    "num_res_blocks", "attention_resolutions", "num_classes")
# Defaults for a checkpoint that does not record a field, where they differ from the field's default:
# such checkpoints have always been exported with dropout 0 (which TorchScript keeps as a graph constant).
MISSING_HPARAM_DEFAULTS: dict[str, Any] = {"dropout": 0.0}


@dataclass(frozen=True)
class ModelConfig:
    """A DDPM over ``img_depth``-channel square images of ``in_size`` = side² pixels with ``t_range`` steps.

    ``schedule_params`` None means the schedule's defaults (filled in, so the field always holds every
    parameter); ``num_classes`` > 0 makes the model class-conditional, with labels dropped with probability
    ``p_uncond`` during training; ``ema_decay`` 0 disables EMA; ``dataset`` is provenance only. ``run_defaults``:
    the run settings the model recommends (``RunSettings.given()`` as plain data; None: none), which every export
    of it carries in its contract (``ddpm-export --run-defaults`` replaces given keys).
    """

    in_size: int = 32 * 32
    t_range: int = 1000
    img_depth: int = 1
    schedule: Literal["linear", "scaled_linear", "cosine", "sigmoid"] = "linear"
    schedule_params: dict[str, float] | None = None
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 1
    dropout: float = 0.1
    num_classes: int = 0
    class_names: tuple[str, ...] | None = None
    p_uncond: float = 0.1
    lr: float = 2e-4
    ema_decay: float = 0.999
    dataset: str | None = None
    run_defaults: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("channel_mult", tuple(self.channel_mult))
        put("attention_resolutions", tuple(self.attention_resolutions))
        if self.class_names is not None:
            put("class_names", tuple(self.class_names))
        size = math.isqrt(self.in_size)
        if size * size != self.in_size:
            raise ValueError(f"in_size must be a square number of pixels (e.g. 32*32), got {self.in_size}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names given for {self.num_classes} classes")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.schedule not in TRAINABLE_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r} (expected one of {', '.join(TRAINABLE_SCHEDULES)})")
        put("schedule_params", {**default_params(self.schedule), **(self.schedule_params or {})})
        if self.run_defaults is not None:
            if not isinstance(self.run_defaults, Mapping):
                raise ValueError(f"run_defaults must be a mapping of run settings, got {self.run_defaults!r}")
            try:
                given = RunDefaults.from_kwargs(dict(self.run_defaults))
            except TypeError as e:
                raise ValueError(str(e)) from None
            # conditional=True: the data decides the classes later (``run_defaults_problem`` checks with them)
            problems = given.problems(self.t_range, conditional=True)
            if problems:
                raise ValueError(f"run_defaults: {problems[0][1]}")
            put("run_defaults", {k: v for k, v in given.to_json().items() if v is not None} or None)

    def run_defaults_problem(self) -> str | None:
        """Why the recommended run settings do not fit this model as it is (its classes included), or None."""
        given = self.recommended()
        problems = [] if given is None else given.problems(self.t_range, self.num_classes > 0)
        return f"--run-defaults: {problems[0][1]}" if problems else None

    def recommended(self) -> RunDefaults | None:
        """The run settings the model recommends, as the contract holds them."""
        return None if self.run_defaults is None else RunDefaults.from_kwargs(dict(self.run_defaults))

    @property
    def image_size(self) -> int:
        """Side of the square images in pixels: √in_size."""
        return math.isqrt(self.in_size)

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def to_hparams(self) -> dict[str, Any]:
        """The hyperparameters a checkpoint stores: every field, sequences as lists (plain data for ``torch.load``)."""
        hp = {f.name: getattr(self, f.name) for f in fields(self)}
        hp["schedule_params"] = dict(self.schedule_params)
        hp["channel_mult"] = list(self.channel_mult)
        hp["attention_resolutions"] = list(self.attention_resolutions)
        hp["class_names"] = list(self.class_names) if self.class_names is not None else None
        hp["run_defaults"] = dict(self.run_defaults) if self.run_defaults is not None else None
        return hp

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> ModelConfig:
        """Read a checkpoint's hyperparameters (``to_hparams``, or an older checkpoint's subset of them).

        Raises ValueError naming missing required or unknown keys, or the first invalid value.
        """
        names = [f.name for f in fields(cls)]
        missing = [k for k in REQUIRED_HPARAMS if k not in hparams]
        if missing:
            raise ValueError(f"hyperparameters lack {', '.join(missing)}")
        unknown = sorted(set(hparams) - set(names))
        if unknown:
            raise ValueError(f"unknown hyperparameters: {', '.join(map(str, unknown))}")
        return cls(**{**MISSING_HPARAM_DEFAULTS, **hparams})

    # -- what the hyperparameters define ---------------------------------------------------------------------------
    def unet_config(self) -> UNetConfig:
        """The noise predictor's shape (raises ValueError if the U-Net cannot be built at this image size)."""
        return UNetConfig(
            image_size=self.image_size, in_channels=self.img_depth, base_channels=self.base_channels,
            channel_mult=self.channel_mult, num_res_blocks=self.num_res_blocks,
            attention_resolutions=self.attention_resolutions, num_heads=self.num_heads, dropout=self.dropout,
            num_classes=self.num_classes,
        )

    def schedule_spec(self) -> ScheduleSpec:
        """The noise schedule (``.build()`` gives its float64 tables)."""
        return ScheduleSpec(self.schedule, self.t_range, dict(self.schedule_params))

    def contract(self, *, ema: bool, provenance: Provenance | None = None,
                 run_defaults: RunDefaults | None = None) -> SamplingContract:
        """The sampling contract of this model's U-Net (with its ``ema`` or raw weights).

        ``provenance`` defaults to the training data set alone; ``run_defaults`` to the model's ``recommended()``.
        """
        return SamplingContract(
            image_size=self.image_size, channels=self.img_depth, schedule=self.schedule_spec(),
            num_classes=self.num_classes, class_names=list(self.class_names or []), ema=ema,
            provenance=provenance if provenance is not None else Provenance(dataset=self.dataset),
            run_defaults=run_defaults if run_defaults is not None else self.recommended(),
        )

