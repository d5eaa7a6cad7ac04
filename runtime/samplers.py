"""The host sampling loop, a plain function over a noise-predictor callable ``predict_eps(x, t) -> eps``.

It works on NumPy arrays and torch tensors alike (only indexing, ``*``, ``+`` and ``.clip``), so the eager
U-Net, TorchScript modules and ONNX sessions are adapters, never new samplers. Coefficients are turned into
Python floats before the loop so that float32 inputs stay float32. Classifier-free guidance for this
execution style is ``guided_predictor``; the fused ONNX step (``runtime.fused``) has its own, in the graph.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from runtime.plan import (NOISE_COLUMN, TABLE_COLUMNS, StepCoefficients, Variance, ddim_coefficients,
                          ddpm_coefficients)
from runtime.schedule import NoiseSchedule

Array = Any  # numpy.ndarray or torch.Tensor, (B, C, H, W) float32
PredictEps = Callable[[Array, int], Array]  # (x_t, model timestep) -> ε, same shape as x_t
NoiseFn = Callable[[int], Array]  # step index i -> z ~ N(0, I) shaped like x
OnStep = Callable[[int, Any], None]  # (step index i, the new x or None where it is not on the host)


def sample(predict_eps: PredictEps, x_T: Array, coefs: StepCoefficients, noise: NoiseFn, *,
           on_step: OnStep | None = None) -> Array:
    """The sampling loop: for i = K−1 … 0, ε = predict_eps(x, timesteps[i]) and
    x ← x_coef·x + eps_coef·ε + x0_coef·clip(x0_from_x·x + x0_from_eps·ε) + noise_coef·z (``StepCoefficients``).

    ``noise(i)`` is called exactly for the steps with noise_coef ≠ 0, in loop order. ``on_step(i, x)`` sees
    each new x (for progress and finiteness checks).
    """
    t_model = coefs.timesteps.tolist()
    rows = list(zip(*(getattr(coefs, name).tolist() for name in TABLE_COLUMNS)))  # Python floats: float32 stays
    x = x_T
    for i in reversed(range(len(t_model))):
        eps = predict_eps(x, t_model[i])
        x = update(x, eps, noise(i) if rows[i][NOISE_COLUMN] != 0.0 else None, *rows[i], clip=coefs.clip)
        if on_step is not None:
            on_step(i, x)
    return x


def update(x: Array, eps: Array, z: Array | None, x_coef, eps_coef, noise_coef, x0_coef, x0_from_x, x0_from_eps, *,
           clip: bool) -> Array:
    """One step: x_coef·x + eps_coef·ε [+ x0_coef·clip(x0_from_x·x + x0_from_eps·ε, −1, 1)] [+ noise_coef·z].

    Coefficients are Python floats (one plan) or arrays broadcasting against x, e.g. (B, 1, 1, 1) float32 for a
    batch whose images are at different steps of different plans (the server); ``z`` None adds no noise.
    """
    x_next = x_coef * x + eps_coef * eps
    if clip:
        x_next = x_next + x0_coef * (x0_from_x * x + x0_from_eps * eps).clip(-1.0, 1.0)
    if z is not None:
        x_next = x_next + noise_coef * z
    return x_next


def ddpm_sample(predict_eps: PredictEps, x_T: Array, schedule: NoiseSchedule, noise: NoiseFn, *,
                variance: Variance = "beta", clip_denoised: bool = False, **kw) -> Array:
    """Algorithm 2 (Ho et al. 2020) from ``x_T`` to x_0 on ``schedule`` (see ``plan.ddpm_coefficients``)."""
    return sample(predict_eps, x_T, ddpm_coefficients(schedule, variance, clip_denoised), noise, **kw)


def ddim_sample(predict_eps: PredictEps, x_T: Array, schedule: NoiseSchedule, noise: NoiseFn, *,
                eta: float = 0.0, clip_denoised: bool = False, **kw) -> Array:
    """DDIM (Song et al. 2021) from ``x_T`` to x_0 on ``schedule``'s steps (respace it for K < T steps)."""
    return sample(predict_eps, x_T, ddim_coefficients(schedule, eta, clip_denoised), noise, **kw)


def guided_eps(eps_cond: Array, eps_uncond: Array, guidance: float) -> Array:
    """Classifier-free guidance (Ho & Salimans 2022): ε = ε_uncond + w·(ε_cond − ε_uncond)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def guided_predictor(net: Callable[[Array, int, Array | None], Array], y: Array | None, *, guidance: float,
                     null_class: int | None, concat: Callable[[list[Array]], Array]) -> PredictEps:
    """``predict_eps(x, t)`` around ``net(x, t, y)`` for fixed labels ``y: (B,) int64`` (None: unconditional).

    With guidance w ≠ 1 (validated by ``runtime.plan``) the conditional and null-class predictions come from
    one batched call of 2B images and are combined by ``guided_eps``. ``concat`` joins arrays on axis 0
    (``np.concatenate`` or ``torch.cat``), so one implementation serves every backend.
    """
    if y is None or guidance == 1.0:
        return lambda x, t: net(x, t, y)
    y2 = concat([y, y * 0 + null_class])

    def predict(x: Array, t: int) -> Array:
        b = x.shape[0]
        eps = net(concat([x, x]), t, y2)
        return guided_eps(eps[:b], eps[b:], guidance)

    return predict


def array_predictor(net, y: np.ndarray | None, *, guidance: float, null_class: int | None) -> PredictEps:
    """``predict_eps(x, t: int)`` for a numpy net ``net(x, t: (B,) int64, y)`` (a backend's ``predict_eps``)."""

    def call(x: np.ndarray, t: int, labels: np.ndarray | None) -> np.ndarray:
        return net(x, np.full((x.shape[0],), t, dtype=np.int64), labels)

    return guided_predictor(call, y, guidance=guidance, null_class=null_class, concat=np.concatenate)
