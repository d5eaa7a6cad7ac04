"""The one sampler step, for every sampler and every loop that runs on arrays (numpy or torch).

``step(x, eps, x0_prev, z, c)`` computes, with one step's coefficients ``c`` (``runtime.sampling.plan.StepCoefficients``)::

    x̂_0    = clip(x0_from_x·x + x0_from_eps·ε, −x0_clip, x0_clip)
    x_next = x_coef·x + eps_coef·ε + x0_coef·x̂_0 + prev_x0_coef·x̂_0' + noise_coef·z

and returns (x_next, x̂_0): x̂_0 is the state the next step gets as ``x0_prev`` (a multistep solver's history).
The host loop (``runtime.sampling.samplers.sample``), the torch device loop and the server's batch of images at different
steps call it; the fused ONNX step graph (``runtime.backends.step_graph``) is the same arithmetic, node by node.
"""

from __future__ import annotations

from typing import Any, Mapping

from runtime.sampling.settings import FLOAT32_MAX

Array = Any  # numpy.ndarray or torch.Tensor


def _zero(c: Any) -> bool:
    """A Python-float coefficient that is exactly 0: its term is left out (arrays always compute theirs)."""
    return isinstance(c, float) and c == 0.0


def step(x: Array, eps: Array, x0_prev: Array | None, z: Array | None, c: Mapping[str, Any]) -> tuple[Array, Array | None]:
    """One step (see the module docstring); ``c`` maps ``TABLE_COLUMNS`` to Python floats (one plan) or to arrays
    broadcasting against x, e.g. (B, 1, 1, 1) float32 for images at different steps of different plans.

    ``x0_prev`` None (no history yet) and ``z`` None (no noise) leave their terms out; so do Python-float
    coefficients that are 0, and x̂_0 is None where both of its coefficients are 0 (DDPM and DDIM without clipping
    fold it into ``x_coef`` and ``eps_coef``).
    """
    x0 = None
    if not (_zero(c["x0_from_x"]) and _zero(c["x0_from_eps"])):
        x0 = c["x0_from_x"] * x + c["x0_from_eps"] * eps
        bound = c["x0_clip"]
        if not (isinstance(bound, float) and bound >= FLOAT32_MAX):
            x0 = x0.clip(-bound, bound)
    x_next = c["x_coef"] * x + c["eps_coef"] * eps
    if x0 is not None and not _zero(c["x0_coef"]):
        x_next = x_next + c["x0_coef"] * x0
    if x0_prev is not None and not _zero(c["prev_x0_coef"]):
        x_next = x_next + c["prev_x0_coef"] * x0_prev
    if z is not None:
        x_next = x_next + c["noise_coef"] * z
    return x_next, x0
