"""Samplers as plain functions over a noise-predictor callable ``predict_eps(x, t) -> eps``.

They work on NumPy arrays and torch tensors alike (only indexing, ``*``, ``+`` and ``.clip``), so the
eager U-Net, TorchScript modules and ONNX sessions are adapters, never new samplers. Coefficients are
turned into Python floats before the loop so that float32 inputs stay float32.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np

from runtime.schedule import NoiseSchedule

Array = Any  # numpy.ndarray or torch.Tensor, (B, C, H, W) float32
PredictEps = Callable[[Array, int], Array]  # (x_t, model timestep) -> ε, same shape as x_t
NoiseFn = Callable[[int], Array]  # step index i -> z ~ N(0, I) shaped like x


def ddpm_sample(
    predict_eps: PredictEps,
    x_T: Array,
    schedule: NoiseSchedule,
    noise: NoiseFn,
    *,
    variance: Literal["beta", "beta_tilde"] = "beta",
    clip_denoised: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Array:
    """Algorithm 2 (Ho et al. 2020) from ``x_T`` down to x_0.

    For i = K−1 … 0 (paper t = i+1 … 1): z = noise(i) if i > 0 else 0 and
    x_{t−1} = (x_t − (1−α_t)/√(1−ᾱ_t)·ε) / √α_t + σ_t z.
    With ``clip_denoised`` the mean is the posterior mean μ̃(x_t, x̂_0) with x̂_0 clipped to [−1, 1],
    as in the paper's released code. ``progress(i)`` is called after each step.
    """
    c = schedule.ddpm_coefficients(variance)
    t_model = c.timesteps.tolist()
    x_coef, eps_coef, sigma = c.x_coef.tolist(), c.eps_coef.tolist(), c.sigma.tolist()
    if clip_denoised:
        r0 = schedule.sqrt_recip_alphas_cumprod.tolist()
        r1 = schedule.sqrt_recipm1_alphas_cumprod.tolist()
        m0 = schedule.posterior_mean_coef1.tolist()
        m1 = schedule.posterior_mean_coef2.tolist()
    x = x_T
    for i in reversed(range(len(t_model))):
        eps = predict_eps(x, t_model[i])
        if clip_denoised:
            x0 = (r0[i] * x - r1[i] * eps).clip(-1.0, 1.0)
            x = m0[i] * x0 + m1[i] * x
        else:
            x = x_coef[i] * x - eps_coef[i] * eps
        if i > 0:
            x = x + sigma[i] * noise(i)
        if progress is not None:
            progress(i)
    return x


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
