"""Improved PNDM (Zhang & Chen 2023, "DEIS", §4; diff-sampler's ``ipndm``): Adams–Bashforth on ε in x/√ᾱ."""

from __future__ import annotations

import numpy as np

from runtime.sampling.samplers import Sampler
from runtime.sampling.schedule import NoiseSchedule
from runtime.sampling.table import StepCoefficients

# Adams–Bashforth weights on ε of this step and the ones before, by order (the order grows while the history fills)
WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def coefficients(schedule: NoiseSchedule) -> StepCoefficients:
    """In y = x/α and s = σ/α (α = √ᾱ, σ = √(1−ᾱ)) the probability-flow ODE is dy/ds = ε; each step from s_i to
    s_{i−1} (0 after the last model timestep) is y ← y + (s_{i−1} − s_i)·Σ_j w_j·ε_{i+j} with the weights of order
    min(4, steps done + 1). In x: x_{i−1} = (α_{i−1}/α_i)·x_i + α_{i−1}(s_{i−1} − s_i)·Σ_j w_j·ε_{i+j}. Its state d is
    ε itself (d_from_eps = 1), so its history holds the three ε before.
    """
    ab = schedule.alphas_cumprod
    K = len(ab)
    alpha, s = np.sqrt(ab), np.sqrt(1.0 - ab) / np.sqrt(ab)
    alpha_to, s_to = np.append(1.0, alpha[:-1]), np.append(0.0, s[:-1])
    weights = np.zeros((K, 4))
    for i in range(K):
        w = WEIGHTS[min(4, K - i)]
        weights[i, :len(w)] = alpha_to[i] * (s_to[i] - s[i]) * np.array(w)
    return StepCoefficients(schedule.timesteps, x_coef=alpha_to / alpha, eps_coef=np.zeros(K), noise_coef=np.zeros(K),
                            d_coef=weights[:, 0], d_from_x=np.zeros(K), d_from_eps=np.ones(K), history=weights[:, 1:])


SAMPLER = Sampler("ipndm", "improved PNDM (Zhang & Chen 2023): 4th-order Adams-Bashforth on eps, no extra calls",
                  coefficients, default_steps=10, history=3, min_steps=4)
