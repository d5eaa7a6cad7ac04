"""runtime.sampling.schedule against closed forms computed independently in the tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.sampling.samplers import ddpm
from runtime.sampling.schedule import NoiseSchedule, cosine_betas, linear_betas, make_betas, spaced_indices


def test_linear_schedule_closed_form():
    s = NoiseSchedule.from_name("linear", 1000)
    assert s.betas.dtype == np.float64 and s.betas.shape == (1000,)
    assert s.betas[0] == pytest.approx(1e-4, abs=1e-15) and s.betas[-1] == pytest.approx(0.02, abs=1e-15)
    # β_t = β_1 + (t−1)(β_T − β_1)/(T−1)
    t = 437
    assert s.betas[t - 1] == pytest.approx(1e-4 + (t - 1) * (0.02 - 1e-4) / 999, rel=1e-12)
    # ᾱ_t = ∏_{s≤t}(1 − β_s), multiplied out in plain Python floats.
    abar = 1.0
    for k in range(1000):
        abar *= 1.0 - (1e-4 + k * (0.02 - 1e-4) / 999)
        if k in (0, 499, 999):
            assert s.alphas_cumprod[k] == pytest.approx(abar, rel=1e-10)
    assert s.alphas_cumprod[-1] == pytest.approx(4.04e-5, rel=2e-3)
    assert s.alphas_cumprod[0] == pytest.approx(1 - 1e-4, rel=1e-15)  # inclusive product
    assert s.alphas_cumprod_prev[0] == 1.0 and s.alphas_cumprod_prev[10] == s.alphas_cumprod[9]


def test_posterior_variance_and_mean_coefficients():
    s = NoiseSchedule.from_name("linear", 1000)
    assert s.posterior_variance[0] == 0.0  # β̃_1 = 0
    t = 300
    b, ab, ab_prev = s.betas[t], s.alphas_cumprod[t], s.alphas_cumprod[t - 1]
    assert s.posterior_variance[t] == pytest.approx(b * (1 - ab_prev) / (1 - ab), rel=1e-12)
    assert np.all(s.posterior_variance <= s.betas)
    # μ̃(x_t, x_0) with x_0 = (x_t − √(1−ᾱ)ε)/√ᾱ equals Algorithm 2's mean (x_t − β/√(1−ᾱ) ε)/√α.
    x_t, eps = 0.7, -1.3
    x0 = s.sqrt_recip_alphas_cumprod[t] * x_t - s.sqrt_recipm1_alphas_cumprod[t] * eps
    mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x_t
    c = ddpm.coefficients(s)
    assert mean == pytest.approx(c.x_coef[t] * x_t + c.eps_coef[t] * eps, rel=1e-10)
    assert c.x_coef[t] == pytest.approx(1 / math.sqrt(1 - b), rel=1e-12)
    assert c.eps_coef[t] == pytest.approx(-b / math.sqrt(1 - ab) / math.sqrt(1 - b), rel=1e-12)
    assert c.noise_coef[0] == 0.0 and c.noise_coef[t] == pytest.approx(math.sqrt(b), rel=1e-12)
    assert (ddpm.coefficients(s, variance="beta_tilde").noise_coef[t]
            == pytest.approx(math.sqrt(s.posterior_variance[t]), rel=1e-12))
    assert c.table().shape == (1000, 7) and c.table().dtype == np.float32


def test_cosine_schedule_closed_form():
    T, s_ = 1000, 0.008
    s = NoiseSchedule.from_name("cosine", T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 500, 900):
        assert s.alphas_cumprod[t - 1] == pytest.approx(f(t) / f(0), rel=1e-9)
    assert s.betas.max() == pytest.approx(0.999) and s.betas[-1] == pytest.approx(0.999)
    assert np.all(np.diff(s.alphas_cumprod) < 0)


def test_respacing_keeps_alphas_cumprod_at_the_kept_steps():
    full = NoiseSchedule.from_name("linear", 1000)
    r = full.respace(50)
    assert len(r) == 50 and r.timesteps[0] == 0 and r.timesteps[-1] == 999
    assert np.all(np.diff(r.timesteps) > 0) and r.num_train_timesteps == 1000
    np.testing.assert_allclose(r.alphas_cumprod, full.alphas_cumprod[r.timesteps], rtol=1e-12)
    assert r.betas[0] == pytest.approx(full.betas[0])
    assert np.all(r.betas[1:] > full.betas[r.timesteps[1:]])  # a respaced step spans several original ones
    same = full.respace(1000)
    np.testing.assert_allclose(same.betas, full.betas, rtol=1e-12)
    explicit = full.respace([0, 10, 999])
    assert explicit.timesteps.tolist() == [0, 10, 999]


def test_tables_are_read_only_and_bad_input_is_refused():
    s = NoiseSchedule.from_name("linear", 10)
    with pytest.raises(ValueError):
        s.alphas_cumprod[0] = 0.5
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("laplace", 10)
    with pytest.raises(ValueError, match="an integer from 1 to 100000"):
        linear_betas(0)
    with pytest.raises(ValueError, match="an integer from 1 to 100000"):
        linear_betas(10**12)  # an absurd T is refused before anything is allocated
    with pytest.raises(ValueError, match="beta_start"):
        linear_betas(10, beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="between 1 and 10"):
        spaced_indices(10, 11)
    with pytest.raises(ValueError, match="strictly increasing"):
        s.respace([3, 2])
    assert cosine_betas(5).shape == (5,)
