"""DDIM (Song et al. 2021, eq. 12): η = 0 deterministic, η = 1 DDPM-like."""

from __future__ import annotations

import numpy as np

from runtime.sampling.samplers import Sampler
from runtime.sampling.schedule import NoiseSchedule
from runtime.sampling.table import StepCoefficients


def coefficients(schedule: NoiseSchedule, *, eta: float = 0.0, clip_denoised: bool = False,
                 clip_range: float = 1.0) -> StepCoefficients:
    """x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t,  x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1−ᾱ_{t−1}−σ_t²)·ε + σ_t z,
    σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1}). ``clip_denoised`` clips x̂_0 to ±``clip_range``.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be between 0 and 1, got {eta}")
    ab, ab_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    sigma = eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_prev)
    dir_coef = np.sqrt(np.maximum(1.0 - ab_prev - sigma**2, 0.0))
    x0_x, x0_eps = 1.0 / np.sqrt(ab), -np.sqrt(1.0 - ab) / np.sqrt(ab)
    zero = np.zeros_like(ab)
    if clip_denoised:
        return StepCoefficients(schedule.timesteps, x_coef=zero, eps_coef=dir_coef, noise_coef=sigma,
                                d_coef=np.sqrt(ab_prev), d_from_x=x0_x, d_from_eps=x0_eps, d_clip=clip_range)
    return StepCoefficients(schedule.timesteps, x_coef=np.sqrt(ab_prev) * x0_x,
                            eps_coef=np.sqrt(ab_prev) * x0_eps + dir_coef, noise_coef=sigma,
                            d_coef=zero, d_from_x=zero, d_from_eps=zero)


SAMPLER = Sampler("ddim", "Song et al. 2021; eta 0 is deterministic, eta 1 DDPM-like", coefficients,
                  default_steps=50, settings=("eta", "clip_denoised", "clip_range"))
