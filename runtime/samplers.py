"""Samplers as plain functions over a noise-predictor callable ``predict_eps(x, t) -> eps``.

They work on NumPy arrays and torch tensors alike (only indexing, ``*``, ``+`` and ``.clip``), so the
eager U-Net, TorchScript modules and ONNX sessions are adapters, never new samplers. Coefficients are
turned into Python floats before the loop so that float32 inputs stay float32.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np

from runtime.schedule import NoiseSchedule, StepCoefficients

Array = Any  # numpy.ndarray or torch.Tensor, (B, C, H, W) float32
PredictEps = Callable[[Array, int], Array]  # (x_t, model timestep) -> ε, same shape as x_t
NoiseFn = Callable[[int], Array]  # step index i -> z ~ N(0, I) shaped like x


def sample(
    predict_eps: PredictEps,
    x_T: Array,
    coefs: StepCoefficients,
    noise: NoiseFn,
    *,
    on_step: Callable[[int, Array], None] | None = None,
) -> Array:
    """The one sampling loop: for i = K−1 … 0, ε = predict_eps(x, timesteps[i]) and
    x ← A_i·x + B_i·ε + D_i·clip(P_i·x + Q_i·ε) + C_i·z_i (see ``StepCoefficients``).

    ``noise(i)`` is called exactly for the steps with C_i ≠ 0, in loop order. ``on_step(i, x)`` sees each new x
    (for progress and finiteness checks).
    """
    t_model = coefs.timesteps.tolist()
    A, B, C, D, P, Q = (getattr(coefs, k).tolist() for k in "ABCDPQ")
    x = x_T
    for i in reversed(range(len(t_model))):
        eps = predict_eps(x, t_model[i])
        x_next = A[i] * x + B[i] * eps
        if coefs.clip:
            x_next = x_next + D[i] * (P[i] * x + Q[i] * eps).clip(-1.0, 1.0)
        if C[i] != 0.0:
            x_next = x_next + C[i] * noise(i)
        x = x_next
        if on_step is not None:
            on_step(i, x)
    return x


def ddpm_sample(predict_eps: PredictEps, x_T: Array, schedule: NoiseSchedule, noise: NoiseFn, *,
                variance: Literal["beta", "beta_tilde"] = "beta", clip_denoised: bool = False, **kw) -> Array:
    """Algorithm 2 (Ho et al. 2020) from ``x_T`` to x_0 on ``schedule`` (see ``ddpm_step_coefficients``)."""
    return sample(predict_eps, x_T, schedule.ddpm_step_coefficients(variance, clip_denoised), noise, **kw)


def ddim_sample(predict_eps: PredictEps, x_T: Array, schedule: NoiseSchedule, noise: NoiseFn, *,
                eta: float = 0.0, clip_denoised: bool = False, **kw) -> Array:
    """DDIM (Song et al. 2021) from ``x_T`` to x_0 on ``schedule``'s steps (respace it for K < T steps)."""
    return sample(predict_eps, x_T, schedule.ddim_step_coefficients(eta, clip_denoised), noise, **kw)


def guided_eps(eps_cond: Array, eps_uncond: Array, guidance: float) -> Array:
    """Classifier-free guidance (Ho & Salimans 2022): ε = ε_uncond + w·(ε_cond − ε_uncond)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def conditioned_predictor(
    net: Callable[[Array, int, Array | None], Array],
    y: Array | None,
    *,
    guidance: float = 1.0,
    null_class: int | None = None,
    concat: Callable[[list[Array]], Array],
) -> PredictEps:
    """``predict_eps(x, t)`` around ``net(x, t, y)`` for fixed labels ``y: (B,) int64`` (None: unconditional).

    With ``guidance`` ≠ 1 the conditional and null-class predictions come from one batched call of 2B
    images and are combined by ``guided_eps``. ``concat`` joins arrays on axis 0 (``np.concatenate`` or
    ``torch.cat``), so one implementation serves every backend.
    """
    if y is None:
        return lambda x, t: net(x, t, None)
    if guidance == 1.0:
        return lambda x, t: net(x, t, y)
    if null_class is None:
        raise ValueError("classifier-free guidance needs the null class label")
    y2 = concat([y, y * 0 + null_class])

    def predict(x: Array, t: int) -> Array:
        b = x.shape[0]
        eps = net(concat([x, x]), t, y2)
        return guided_eps(eps[:b], eps[b:], guidance)

    return predict


def array_predictor(net, y: np.ndarray | None, *, guidance: float, null_class: int | None) -> PredictEps:
    """``predict_eps(x, t: int)`` for a numpy net ``net(x, t: (B,) int64, y)``."""

    def call(x: np.ndarray, t: int, labels: np.ndarray | None) -> np.ndarray:
        return net(x, np.full((x.shape[0],), t, dtype=np.int64), labels)

    return conditioned_predictor(call, y, guidance=guidance, null_class=null_class, concat=np.concatenate)
