"""The host sampling loop, a plain function over a noise-predictor callable ``predict_eps(x, t) -> eps``.

It works on NumPy arrays and torch tensors alike (only indexing, ``*``, ``+`` and ``.clip``), so the eager
U-Net, TorchScript modules and ONNX sessions are adapters, never new samplers. Coefficients are turned into
Python floats before the loop so that float32 inputs stay float32. Classifier-free guidance for this
execution style is ``guided_predictor``; the fused ONNX step (``runtime.backends.fused``) has its own, in the graph.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from runtime.sampling.plan import StepCoefficients, ddim_coefficients, ddpm_coefficients
from runtime.sampling.schedule import NoiseSchedule
from runtime.sampling.settings import Variance
from runtime.sampling.step import step

Array = Any  # numpy.ndarray or torch.Tensor, (B, C, H, W) float32
PredictEps = Callable[..., Array]  # (x_t, model timestep[, w]) -> ε, same shape as x_t; w only where w ≠ 1
NoiseFn = Callable[[int], Array]  # step index i -> z ~ N(0, I) shaped like x
OnStep = Callable[[int, Any], None]  # (step index i, the new x or None where it is not on the host)


def sample(predict_eps: PredictEps, x_T: Array, coefs: StepCoefficients, noise: NoiseFn, *,
           on_step: OnStep | None = None) -> Array:
    """The sampling loop: for i = K−1 … 0, ε = predict_eps(x, timesteps[i][, guidance[i]]) and one
    ``runtime.sampling.step.step`` with row i of ``coefs``, carrying x̂_0 from step to step (a multistep solver's state).

    The guidance scale is passed only on the steps where it is not 1 (so an unguided predictor is ``f(x, t)``).
    ``noise(i)`` is called exactly for the steps with noise_coef ≠ 0, in loop order. ``on_step(i, x)`` sees
    each new x (for progress and finiteness checks).
    """
    t_model, w = coefs.timesteps.tolist(), coefs.guidance.tolist()
    rows = coefs.rows()  # Python floats: float32 stays float32
    x, x0 = x_T, None
    for i in reversed(range(len(t_model))):
        eps = predict_eps(x, t_model[i]) if w[i] == 1.0 else predict_eps(x, t_model[i], w[i])
        x, x0 = step(x, eps, x0, noise(i) if rows[i]["noise_coef"] != 0.0 else None, rows[i])
        if on_step is not None:
            on_step(i, x)
    return x


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


def guided_predictor(net: Callable[[Array, int, Array | None], Array], y: Array | None, *, null_class: int | None,
                     concat: Callable[[list[Array]], Array]) -> PredictEps:
    """``predict_eps(x, t, w=1)`` around ``net(x, t, y)`` for fixed labels ``y: (B,) int64`` (None: unconditional).

    At w = 1 it is one call of B images with the labels; with w ≠ 1 (validated by ``runtime.sampling.plan``; per step, so
    a guidance interval costs nothing outside it) the conditional and null-class predictions come from one batched
    call of 2B images, combined by ``guided_eps``. ``concat`` joins arrays on axis 0 (``np.concatenate`` or
    ``torch.cat``), so one implementation serves every backend.
    """
    y2 = None if y is None or null_class is None else concat([y, y * 0 + null_class])

    def predict(x: Array, t: int, w: float = 1.0) -> Array:
        if y is None or w == 1.0:
            return net(x, t, y)
        b = x.shape[0]
        eps = net(concat([x, x]), t, y2)
        return guided_eps(eps[:b], eps[b:], w)

    return predict


def array_predictor(net, y: np.ndarray | None, *, null_class: int | None) -> PredictEps:
    """``predict_eps(x, t: int, w=1)`` for a numpy net ``net(x, t: (B,) int64, y)`` (a backend's ``predict_eps``)."""

    def call(x: np.ndarray, t: int, labels: np.ndarray | None) -> np.ndarray:
        return net(x, np.full((x.shape[0],), t, dtype=np.int64), labels)

    return guided_predictor(call, y, null_class=null_class, concat=np.concatenate)
