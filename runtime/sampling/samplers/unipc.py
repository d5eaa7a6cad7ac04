"""UniPC (Zhao et al. 2023): the UniP-2 predictor with B(h) = e^h − 1 ("bh2") and the UniC corrector, data
prediction."""

from __future__ import annotations

import math

import numpy as np

from runtime.sampling.samplers import Sampler
from runtime.sampling.schedule import NoiseSchedule
from runtime.sampling.table import NO_CLIP, StepCoefficients

ORDER = 2


def _rhos(h: float, rks: list[float], order: int) -> np.ndarray:
    """UniPC's ρ of a corrector of ``order`` (Zhao et al. 2023, eq. 8 with B(h) = e^{hh} − 1, hh = −h): the solution of
    R ρ = b with R[k−1][j] = r_j^{k−1} and b_k = k!·h·φ_{k+1}(hh)/B(h), h·φ_{k+1} by its recurrence (k = 1 … order)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial, R, b = 1, [], []
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.linalg.solve(np.array(R), np.array(b))


def coefficients(schedule: NoiseSchedule, *, clip_denoised: bool = False, clip_range: float = 1.0) -> StepCoefficients:
    """The model is called at the predictor's x_i; its x̂₀ m_i first corrects x_i (UniC, of the order the predictor
    that made x_i used; from the second step on), then the predictor (UniP) goes from the corrected x_i to t_{i−1}.

    With h = λ_t − λ_{s₀}, α, σ at the target t and s₀, m₀ the x̂₀ at s₀, r = (λ_{s₁} − λ_{s₀})/h and
    D = (m₁ − m₀)/r, both are x_t = (σ_t/σ_{s₀})·x_{s₀} − α_t(e^{−h} − 1)·m₀ − α_t(e^{−h} − 1)·res with
    res_P = ½·D (order 2) or 0 (order 1) and res_C = ρ₀·D + ρ₁·(m_t − m₀) (ρ: ``_rhos``; order 1: ρ₁ = ½). The corrector
    and the predictor that made x_i start from the same x_{s₀} and m₀, so the corrected x_i is x_i plus
    −α(e^{−h} − 1)·(res_C − res_P): the correction needs no state beyond the x̂₀ history, and the step becomes
    x_{i−1} = (σ_{i−1}/σ_i)·x_i + weights on m_i, m_{i+1}, m_{i+2}. Orders: min(2, steps left, steps done + 1)
    (warm-up and ``lower_order_final``); the last step goes to σ = 0 (x_0 = m_0). This is diffusers'
    ``UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
    final_sigmas_type="zero")`` on the same timesteps, with no extra model call. ``clip_denoised`` clips x̂₀.
    """
    ab = schedule.alphas_cumprod
    K = len(ab)
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha) - np.log(sigma)
    alpha_to, sigma_to = np.append(1.0, alpha[:-1]), np.append(0.0, sigma[:-1])
    lam_to = np.append(np.inf, lam[:-1])
    order = [min(ORDER, i + 1, K - i) for i in range(K)]  # at step i: i + 1 steps left, K − 1 − i done
    weights = np.zeros((K, 3))  # on m_i (this step's x̂₀), m_{i+1}, m_{i+2}
    x_coef = sigma_to / sigma
    for i in range(K):
        # the predictor from (corrected) x_i to t_{i−1}
        h = lam_to[i] - lam[i]
        g = -alpha_to[i] * math.expm1(-h)  # −α_t(e^{−h} − 1)
        weights[i, 0] += g
        if order[i] == 2:
            r = (lam[i + 1] - lam[i]) / h
            weights[i, 0] += g * 0.5 * (-1.0 / r)  # ½·(m_{i+1} − m_i)/r
            weights[i, 1] += g * 0.5 / r
        if i == K - 1:
            continue  # no corrector on the first step
        # the corrector of x_i (from x_{i+1}, m_{i+1}), of the order of the predictor that made x_i
        q = order[i + 1]
        hc = lam[i] - lam[i + 1]
        gc = -alpha[i] * math.expm1(-hc)
        delta = np.zeros(3)  # res_C − res_P on m_i, m_{i+1}, m_{i+2}
        if q == 1:
            delta += [0.5, -0.5, 0.0]
        else:
            rc = (lam[i + 2] - lam[i + 1]) / hc
            rho = _rhos(hc, [rc, 1.0], 2)
            delta += [rho[1], -rho[1] - rho[0] / rc, rho[0] / rc]  # ρ₀(m_{i+2} − m_{i+1})/r + ρ₁(m_i − m_{i+1})
            delta -= [0.0, -0.5 / rc, 0.5 / rc]  # the predictor's ½·(m_{i+2} − m_{i+1})/r
        weights[i] += x_coef[i] * gc * delta
    return StepCoefficients(schedule.timesteps, x_coef=x_coef, eps_coef=np.zeros(K), noise_coef=np.zeros(K),
                            d_coef=weights[:, 0], d_from_x=1.0 / alpha, d_from_eps=-sigma / alpha,
                            history=weights[:, 1:], d_clip=clip_range if clip_denoised else NO_CLIP)


SAMPLER = Sampler("unipc", "UniPC, Zhao et al. 2023: bh2 predictor-corrector of order 2, no extra calls", coefficients,
                  default_steps=10, settings=("clip_denoised", "clip_range"), history=2, min_steps=2)
