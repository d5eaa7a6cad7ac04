"""DPM-Solver++(3M) (Lu et al. 2022, "DPM-Solver++", §4 and App. C): data prediction, third-order multistep."""

from __future__ import annotations

import numpy as np

from runtime.sampling.samplers import Sampler
from runtime.sampling.schedule import NoiseSchedule
from runtime.sampling.table import NO_CLIP, StepCoefficients

LOWER_ORDER_SECOND_BELOW = 15  # runs of fewer steps take their second-to-last step at second order (as diffusers)


def coefficients(schedule: NoiseSchedule, *, clip_denoised: bool = False, clip_range: float = 1.0) -> StepCoefficients:
    """Each step from s₀ = t_i to t = t_{i−1}, with m₀, m₁, m₂ the x̂₀ of this step and the two before, h = λ_t − λ_{s₀},
    r₀ = h₀/h and r₁ = h₁/h (h₀, h₁ the h of the two steps before)::

        D1₀ = (m₀ − m₁)/r₀,  D1₁ = (m₁ − m₂)/r₁,  D1 = D1₀ + r₀/(r₀ + r₁)·(D1₀ − D1₁),  D2 = (D1₀ − D1₁)/(r₀ + r₁)
        x_t = (σ_t/σ_{s₀})·x − α_t(e^{−h} − 1)·m₀ + α_t((e^{−h} − 1)/h + 1)·D1 − α_t((e^{−h} − 1 + h)/h² − ½)·D2

    expanded into weights on m₀, m₁, m₂. Order 1 on the first step and on the last (to σ = 0: x_0 = m₀), order 2 on
    the second and, in runs of fewer than 15 steps, on the second-to-last (DPM-Solver++(2M)'s midpoint step), else
    order 3: what diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3,
    lower_order_final=True, final_sigmas_type="zero")`` does on the same timesteps. ``clip_denoised`` clips x̂₀.
    """
    ab = schedule.alphas_cumprod
    K = len(ab)
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    alpha_to, sigma_to = np.append(1.0, alpha[:-1]), np.append(0.0, sigma[:-1])  # where step i goes
    e = alpha * sigma_to / (sigma * alpha_to)  # e^{−h_i}; 0 at the last step (i = 0)
    lam = np.log(alpha) - np.log(sigma)
    h = np.full(K, np.inf)
    h[1:] = lam[:-1] - lam[1:]
    weights = np.zeros((K, 3))  # on m₀ (this step's x̂₀), m₁, m₂
    for i in range(K):
        done = K - 1 - i  # steps before this one
        A = alpha_to[i] * (1.0 - e[i])
        if done == 0 or i == 0:
            order = 1
        elif done == 1 or (i == 1 and K < LOWER_ORDER_SECOND_BELOW):
            order = 2
        else:
            order = 3
        if order == 1:
            weights[i, 0] = A
            continue
        r0 = h[i + 1] / h[i]
        if order == 2:
            weights[i, :2] = A * (1.0 + 0.5 / r0), -A * 0.5 / r0
            continue
        r1 = h[i + 2] / h[i]
        em1 = np.expm1(-h[i])  # e^{−h} − 1
        B = alpha_to[i] * (em1 / h[i] + 1.0)
        C = -alpha_to[i] * ((em1 + h[i]) / h[i] ** 2 - 0.5)
        u = np.array([1.0 / r0, -1.0 / r0, 0.0])  # D1₀
        v = np.array([1.0 / r0, -(1.0 / r0 + 1.0 / r1), 1.0 / r1])  # D1₀ − D1₁
        weights[i] = np.array([A, 0.0, 0.0]) + B * (u + r0 / (r0 + r1) * v) + C * v / (r0 + r1)
    return StepCoefficients(schedule.timesteps, x_coef=sigma_to / sigma, eps_coef=np.zeros(K), noise_coef=np.zeros(K),
                            d_coef=weights[:, 0], d_from_x=1.0 / alpha, d_from_eps=-sigma / alpha,
                            history=weights[:, 1:], d_clip=clip_range if clip_denoised else NO_CLIP)


SAMPLER = Sampler("dpmpp-3m", "DPM-Solver++(3M), Lu et al. 2022: third-order multistep, 6-15 steps", coefficients,
                  default_steps=10, settings=("clip_denoised", "clip_range"), history=2, min_steps=3)
