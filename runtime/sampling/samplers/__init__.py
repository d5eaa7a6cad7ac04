"""The registry of samplers: each sampler is one file of this package holding one ``Sampler``, and one line below.

A ``Sampler`` is data: its name, a one-line summary, its default steps, the run settings it takes beyond the common
ones, how many earlier steps' d it reads (its history slots), the fewest steps that reach its order, and its
coefficient function, which writes its whole per-step table (``runtime.sampling.table``) in float64 from the
(respaced) schedule. Nothing else in the tree lists samplers: ``RunSettings``' sampler type and help, ``ddpm-generate``
and ``ddpm-train`` options, the ``/v1/images`` schema, the playground and the docs' table are derived from ``SAMPLERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from runtime.sampling.table import StepCoefficients

Coefficients = Callable[..., StepCoefficients]  # (schedule, **the settings it takes) -> its table, float64


@dataclass(frozen=True)
class Sampler:
    """One sampler (see the module docstring).

    ``settings``: the sampler-specific run settings it takes (``RunSettings`` fields declared ``specific``: eta,
    variance, clip_denoised, clip_range); its coefficient function gets those of them that are set, as keywords.
    ``default_steps`` None: every model timestep (T). ``history``: H, the slots of earlier d's its step reads.
    ``min_steps``: fewer steps than this never leave its warm-up (it would silently be a lower-order sampler).
    """

    name: str
    summary: str
    coefficients: Coefficients
    default_steps: int | None = None
    settings: tuple[str, ...] = ()
    history: int = 0
    min_steps: int = 1
    stochastic: bool = False


def _registry() -> dict[str, Sampler]:
    from runtime.sampling.samplers import ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, ipndm, unipc

    return {s.name: s for s in (
        ddpm.SAMPLER,
        ddim.SAMPLER,
        dpmpp_2m.SAMPLER,
        dpmpp_2m_sde.SAMPLER,
        dpmpp_3m.SAMPLER,
        unipc.SAMPLER,
        ipndm.SAMPLER,
    )}


SAMPLERS: dict[str, Sampler] = _registry()
NAMES: tuple[str, ...] = tuple(SAMPLERS)
MAX_HISTORY: int = max(s.history for s in SAMPLERS.values())


def markdown_table() -> str:
    """The docs' sampler table (docs/generate.md holds it; a test keeps the two equal)."""
    lines = ["| sampler | what it is | default steps | history slots | fewest steps | settings of its own |",
             "|---|---|---:|---:|---:|---|"]
    for s in SAMPLERS.values():
        steps = "T" if s.default_steps is None else str(s.default_steps)
        own = ", ".join(f"`{name}`" for name in s.settings) or "—"
        lines.append(f"| `{s.name}` | {s.summary} | {steps} | {s.history} | {s.min_steps} | {own} |")
    return "\n".join(lines)
