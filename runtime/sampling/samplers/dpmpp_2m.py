"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): data prediction, second-order multistep."""

from __future__ import annotations

import numpy as np

from runtime.sampling.samplers import Sampler
from runtime.sampling.schedule import NoiseSchedule
from runtime.sampling.table import NO_CLIP, StepCoefficients


def coefficients(schedule: NoiseSchedule, *, sde: bool = False, clip_denoised: bool = False,
                 clip_range: float = 1.0) -> StepCoefficients:
    """DPM-Solver++(2M), or with ``sde`` its SDE variant (SDE-DPM-Solver++(2M), ibid. App. B).

    With α = √ᾱ, σ = √(1−ᾱ), λ = log α − log σ and x̂_0 = (x − σ·ε)/α, a step from s = t_i to t = t_{i−1}
    (after t_0, σ = 0: the last step returns x̂_0 without noise) with h = λ_t − λ_s is

        ODE:  x_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·D
        SDE:  x_t = (σ_t/σ_s)·e^{−h}·x_s + α_t·(1 − e^{−2h})·D + σ_t·√(1 − e^{−2h})·z

    with D = x̂_0 on the first and the last step (first order) and, in between, D = (1 + 1/(2r))·x̂_0 − 1/(2r)·x̂_0'
    (x̂_0' the previous step's, r = h'/h with h' the previous step's h): what diffusers'
    ``DPMSolverMultistepScheduler`` computes with ``solver_order=2``, ``solver_type="midpoint"``,
    ``lower_order_final=True`` and ``final_sigmas_type="zero"`` on the same timesteps. e^{−h} is formed as
    (α_s·σ_t)/(σ_s·α_t), so the last step's h = ∞ gives exactly 0. ``clip_denoised`` clips x̂_0 to ±``clip_range``
    (also as stored).
    """
    ab = schedule.alphas_cumprod
    K = len(ab)
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    alpha_to, sigma_to = np.append(1.0, alpha[:-1]), np.append(0.0, sigma[:-1])  # where step i goes
    e = alpha * sigma_to / (sigma * alpha_to)  # e^{−h_i}; 0 at the last step (i = 0)
    if sde:
        x_coef, d_coef, noise = sigma_to / sigma * e, alpha_to * (1.0 - e**2), sigma_to * np.sqrt(1.0 - e**2)
    else:
        x_coef, d_coef, noise = sigma_to / sigma, alpha_to * (1.0 - e), np.zeros(K)
    lam = np.log(alpha) - np.log(sigma)
    h = np.full(K, np.inf)
    h[1:] = lam[:-1] - lam[1:]  # h_i = λ_{i−1} − λ_i for the steps that do not end at σ = 0
    second = np.zeros(K, dtype=bool)
    second[1:K - 1] = True  # not the first step (i = K−1: no x̂_0' yet) and not the last (i = 0)
    r = np.ones(K)
    r[1:K - 1] = h[2:] / h[1:K - 1]  # the step before step i is step i + 1
    x0_coef = np.where(second, d_coef * (1.0 + 0.5 / r), d_coef)
    prev = np.where(second, -d_coef * 0.5 / r, 0.0)
    return StepCoefficients(schedule.timesteps, x_coef=x_coef, eps_coef=np.zeros(K), noise_coef=noise,
                            d_coef=x0_coef, d_from_x=1.0 / alpha, d_from_eps=-sigma / alpha, history=prev[:, None],
                            d_clip=clip_range if clip_denoised else NO_CLIP)


SAMPLER = Sampler("dpmpp-2m", "DPM-Solver++(2M), Lu et al. 2022: second-order multistep, 10-20 steps", coefficients,
                  default_steps=20, settings=("clip_denoised", "clip_range"), history=1)
