"""Algorithm 2 over a callable, against an independent float64 implementation written here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.sampling.engine import guided_eps, sample
from runtime.sampling.samplers import ddim, ddpm
from runtime.sampling.schedule import NoiseSchedule
from runtime.tolerances import TOLERANCES
from tests.nets import per_step

FP64, SAME = TOLERANCES["fp64"], TOLERANCES["fp32-same-math"]


def ddpm_sample(fn, x_T, schedule, noise, ops=None, **settings):
    kw = {} if ops is None else {"ops": ops}
    return sample(per_step(fn), x_T, ddpm.coefficients(schedule, **settings), noise, **kw)


def ddim_sample(fn, x_T, schedule, noise, **settings):
    return sample(per_step(fn), x_T, ddim.coefficients(schedule, **settings), noise)


def fake_eps(x, t):
    """A deterministic, timestep-dependent stand-in for a noise predictor (works on numpy and torch)."""
    return 0.5 * x * math.sin(0.01 * t + 0.3) + 0.1 * math.cos(0.02 * t)


def reference_algorithm_2(x_T, betas, noises, clip=False):
    """Ho et al. 2020, Algorithm 2, straight from the paper in float64 with plain loops over t = T … 1."""
    T = len(betas)
    x = x_T.astype(np.float64)
    for t in range(T, 0, -1):
        beta = betas[t - 1]
        alpha = 1 - beta
        abar = float(np.prod(1 - betas[:t]))
        abar_prev = float(np.prod(1 - betas[: t - 1]))
        eps = fake_eps(x, t - 1)
        if clip:
            x0 = np.clip((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar), -1, 1)
            x = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)) * x
        else:
            x = (x - (1 - alpha) / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
        if t > 1:
            x = x + math.sqrt(beta) * noises[t - 1]
    return x


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_matches_the_paper_in_float64(clip):
    T = 50
    betas = np.linspace(1e-3, 0.2, T)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((2, 1, 4, 4))
    noises = rng.standard_normal((T, 2, 1, 4, 4))
    ref = reference_algorithm_2(x_T, betas, noises, clip=clip)
    out = ddpm_sample(fake_eps, x_T, NoiseSchedule(betas), lambda i: noises[i], clip_denoised=clip)
    np.testing.assert_allclose(out, ref, rtol=FP64.rtol, atol=FP64.atol)


def reference_ddim(x_T, abar, timesteps, noises, eta, clip=False):
    """Song et al. 2021 eq. 12 over the given ᾱ sequence (ᾱ_prev = 1 at the end), float64, plain loops."""
    x = x_T.astype(np.float64)
    for i in range(len(abar) - 1, -1, -1):
        a, a_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
        eps = fake_eps(x, int(timesteps[i]))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip:
            x0 = np.clip(x0, -1, 1)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        if sigma > 0:
            x = x + sigma * noises[i]
    return x


@pytest.mark.parametrize("eta, clip", [(0.0, False), (1.0, False), (0.5, True)])
def test_ddim_matches_the_paper_in_float64(eta, clip):
    full = NoiseSchedule.from_name("linear", 1000)
    s = full.respace(25)
    rng = np.random.default_rng(2)
    x_T = rng.standard_normal((2, 1, 4, 4))
    noises = rng.standard_normal((25, 2, 1, 4, 4))
    abar = full.alphas_cumprod[s.timesteps]  # ᾱ of the original schedule at the kept steps
    ref = reference_ddim(x_T, abar, s.timesteps, noises, eta, clip)
    out = ddim_sample(fake_eps, x_T, s, lambda i: noises[i], eta=eta, clip_denoised=clip)
    np.testing.assert_allclose(out, ref, rtol=FP64.rtol, atol=FP64.atol)


def test_ddim_with_eta_0_draws_no_noise():
    s = NoiseSchedule.from_name("linear", 100).respace(10)
    calls = []
    ddim_sample(fake_eps, np.zeros((1, 1, 2, 2)), s, lambda i: calls.append(i) or np.zeros((1, 1, 2, 2)))
    assert calls == []


@pytest.mark.needs_torch
def test_float32_stays_float32_and_torch_agrees_with_numpy():
    torch = pytest.importorskip("torch")
    s = NoiseSchedule.from_name("linear", 100)
    rng = np.random.default_rng(1)
    x_T = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    noises = rng.standard_normal((100, 3, 1, 8, 8)).astype(np.float32)
    out_np = ddpm_sample(fake_eps, x_T, s, lambda i: noises[i])
    from runtime.backends.torch_loop import torch_ops

    out_t = ddpm_sample(fake_eps, torch.from_numpy(x_T), s, lambda i: torch.from_numpy(noises[i]), torch_ops("cpu"))
    assert out_np.dtype == np.float32 and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=SAME.rtol, atol=SAME.atol)


def test_respaced_schedule_calls_the_model_with_original_timesteps():
    s = NoiseSchedule.from_name("linear", 1000).respace(10)
    seen = []
    ddpm_sample(lambda x, t: seen.append(t) or 0 * x, np.zeros((1, 1, 2, 2)), s, lambda i: np.zeros((1, 1, 2, 2)))
    assert seen == s.timesteps[::-1].tolist() and seen[0] == 999 and seen[-1] == 0


def test_guidance_formula():
    c, u = np.array([2.0]), np.array([1.0])
    assert guided_eps(c, u, 1.0) == 2.0 and guided_eps(c, u, 0.0) == 1.0 and guided_eps(c, u, 3.0) == 4.0
