"""The one precision vocabulary: what a network computes in. ``ddpm-export --dtype``, ``ddpm-generate --dtype``,
``runtime.load(dtype=...)``, each backend's ``precisions`` and the run's records all use these names."""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
