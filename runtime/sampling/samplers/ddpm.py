"""DDPM, Algorithm 2 of Ho et al. 2020 (respaced when steps < T: Improved DDPM)."""

from __future__ import annotations

import numpy as np

from runtime.sampling.samplers import Sampler
from runtime.sampling.schedule import NoiseSchedule
from runtime.sampling.table import StepCoefficients


def coefficients(schedule: NoiseSchedule, *, variance: str = "beta", clip_denoised: bool = False,
                 clip_range: float = 1.0) -> StepCoefficients:
    """x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t + σ_t z, σ_t² = β_t or β̃_t (``variance``).

    With ``clip_denoised`` the mean is the posterior mean μ̃ = coef1·x̂_0 + coef2·x_t (eq. 7) of the clipped
    x̂_0 = clip(x_t/√ᾱ_t − √(1/ᾱ_t − 1)·ε), as in the paper's released code. σ is 0 at the last step (t = 1),
    where Algorithm 2 adds no noise.
    """
    s = schedule
    var = {"beta": s.betas, "beta_tilde": s.posterior_variance}[variance].copy()
    sigma = np.sqrt(var)
    sigma[0] = 0.0
    zero = np.zeros_like(s.betas)
    if clip_denoised:
        return StepCoefficients(s.timesteps, x_coef=s.posterior_mean_coef2, eps_coef=zero, noise_coef=sigma,
                                d_coef=s.posterior_mean_coef1, d_from_x=s.sqrt_recip_alphas_cumprod,
                                d_from_eps=-s.sqrt_recipm1_alphas_cumprod, d_clip=clip_range)
    return StepCoefficients(s.timesteps, x_coef=1.0 / np.sqrt(s.alphas),
                            eps_coef=-s.betas / (s.sqrt_one_minus_alphas_cumprod * np.sqrt(s.alphas)),
                            noise_coef=sigma, d_coef=zero, d_from_x=zero, d_from_eps=zero)


SAMPLER = Sampler("ddpm", "Algorithm 2 of Ho et al. 2020, stochastic (respaced when steps < T)", coefficients,
                  default_steps=None, settings=("variance", "clip_denoised", "clip_range"), stochastic=True)
