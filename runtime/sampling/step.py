"""The one sampler step, for every sampler, on arrays of any kind (numpy or torch).

``step(x, eps, history, z, c)`` computes, with one row ``c`` of a step table (``runtime.sampling.table``)::

    d      = clip(d_from_x·x + d_from_eps·ε, −d_clip, d_clip)
    x_next = x_coef·x + eps_coef·ε + d_coef·d + Σ_j c["history"][j]·history[j] + noise_coef·z

and returns (x_next, d): d is the newest entry of the history the next step reads (``history[0]`` is the step
before's d). The batch engine (``runtime.sampling.engine``) calls it on the host and on a torch device; the fused ONNX
step graph (``runtime.backends.step_graph``) is the same arithmetic, node by node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Mapping

from runtime.sampling.table import FLOAT32_MAX

Array = Any  # numpy.ndarray or torch.Tensor


def _zero(c: Any) -> bool:
    """A Python-float coefficient that is exactly 0: its term is left out (arrays always compute theirs)."""
    return isinstance(c, float) and c == 0.0


def step(x: Array, eps: Array, history: Sequence[Array], z: Array | None,
         c: Mapping[str, Any]) -> tuple[Array, Array | None]:
    """One step (see the module docstring); ``c`` maps ``table.COLUMNS`` to Python floats (one row for the whole
    batch) or to arrays broadcasting against x, e.g. (B, 1, 1, 1) float32 for images at different rows, and
    ``"history"`` to a list of as many.

    ``z`` None (no noise) leaves its term out; so do Python-float coefficients that are 0, and d is None where both of
    its coefficients are 0 (DDPM and DDIM without clipping fold it into ``x_coef`` and ``eps_coef``). ``history`` may
    be shorter than ``c["history"]`` (before it fills; those coefficients are 0 there).
    """
    d = None
    if not (_zero(c["d_from_x"]) and _zero(c["d_from_eps"])):
        d = c["d_from_x"] * x + c["d_from_eps"] * eps
        bound = c["d_clip"]
        if not (isinstance(bound, float) and bound >= FLOAT32_MAX):
            d = d.clip(-bound, bound)
    x_next = c["x_coef"] * x + c["eps_coef"] * eps
    if d is not None and not _zero(c["d_coef"]):
        x_next = x_next + c["d_coef"] * d
    for coef, earlier in zip(c["history"], history):
        if not _zero(coef):
            x_next = x_next + coef * earlier
    if z is not None:
        x_next = x_next + c["noise_coef"] * z
    return x_next, d
