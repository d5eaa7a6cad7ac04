"""DPM-Solver++(3M) and UniPC against float64 references written here from their papers, with loops that keep their
own state (x̂₀ lists, the corrector's previous sample): they share no code with the step tables.

* DPM-Solver++(3M): Lu et al. 2022, "DPM-Solver++", the multistep update of order 3 (with diffusers' order schedule:
  first order on the first and last step, second order on the second and, below 15 steps, the second-to-last).
* UniPC: Zhao et al. 2023, UniP-2 with B(h) = e^h − 1 and the UniC corrector applied to x_t with the model output
  at x_t before the next prediction (φ functions φ_1(z) = (e^z − 1)/z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.errors import SettingsError
from runtime.metadata import SamplingContract
from runtime.sampling.engine import sample
from runtime.sampling.plan import make_plan
from runtime.sampling.settings import SAMPLERS
from runtime.tolerances import TOLERANCES
from tests.nets import per_step

F64 = TOLERANCES["fp64"]
COND = SamplingContract(image_size=4, channels=1, num_classes=3)


def fake_eps(x, t):
    return np.tanh(0.8 * x + 0.002 * t) * 0.9 + 0.05 * np.cos(x)


def tables(plan):
    """ᾱ, α, σ, λ at the run's timesteps in sampling order, then the target after the last step (σ = 0)."""
    ab = COND.schedule.build().alphas_cumprod[plan.coefs.timesteps[::-1]]
    alpha, sigma = np.append(np.sqrt(ab), 1.0), np.append(np.sqrt(1.0 - ab), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return plan.coefs.timesteps[::-1].tolist(), alpha, sigma, lam


def reference_3m(plan, x_T, clip):
    ts, alpha, sigma, lam = tables(plan)
    M = len(ts)
    x, ms, hs = x_T, [], []
    for j in range(M):
        m = (x - sigma[j] * fake_eps(x, ts[j])) / alpha[j]
        m = np.clip(m, -1, 1) if clip else m
        ms.append(m)
        if j == M - 1:
            return m  # to σ = 0, first order: x_0 = x̂₀
        h = lam[j + 1] - lam[j]
        e = math.exp(-h)
        order = 1 if j == 0 else 2 if j == 1 or (j == M - 2 and M < 15) else 3
        base = sigma[j + 1] / sigma[j] * x - alpha[j + 1] * (e - 1.0) * m
        if order == 1:
            x = base
        elif order == 2:
            D1 = (m - ms[-2]) / (hs[-1] / h)
            x = base - 0.5 * alpha[j + 1] * (e - 1.0) * D1
        else:
            r0, r1 = hs[-1] / h, hs[-2] / h
            D1_0, D1_1 = (m - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
            x = base + alpha[j + 1] * ((e - 1.0) / h + 1.0) * D1 - alpha[j + 1] * ((e - 1.0 + h) / h**2 - 0.5) * D2
        hs.append(h)
    raise AssertionError("unreachable")


def phi(k: int, z: float) -> float:
    """φ_k(z) by its recurrence from φ_0 = e^z."""
    value = math.exp(z)
    for i in range(1, k + 1):
        value = (value - 1.0 / math.factorial(i - 1)) / z
    return value


def reference_unipc(plan, x_T, clip):
    ts, alpha, sigma, lam = tables(plan)
    M = len(ts)
    x, ms, last, last_order = x_T, [], None, None
    for j in range(M):
        m = (x - sigma[j] * fake_eps(x, ts[j])) / alpha[j]
        m = np.clip(m, -1, 1) if clip else m
        if j > 0:  # UniC: correct x_j (made from `last` by a predictor of `last_order`) with m_j
            h = lam[j] - lam[j - 1]
            Bh = math.expm1(-h)
            if last_order == 1:
                rho, D = [0.5], []
            else:
                r = (lam[j - 2] - lam[j - 1]) / h
                R = np.array([[1.0, 1.0], [r, 1.0]])
                b = np.array([math.factorial(k) * -h * phi(k + 1, -h) / Bh for k in (1, 2)])
                rho, D = np.linalg.solve(R, b).tolist(), [(ms[-2] - ms[-1]) / r]
            res = sum(p * d for p, d in zip(rho[:-1], D)) + rho[-1] * (m - ms[-1])
            x = sigma[j] / sigma[j - 1] * last - alpha[j] * math.expm1(-h) * ms[-1] - alpha[j] * Bh * res
        ms.append(m)
        order = min(2, j + 1, M - j)
        last, last_order = x, order
        # UniP to the next time (σ = 0 after the last step)
        h = lam[j + 1] - lam[j]
        x_next = sigma[j + 1] / sigma[j] * x - alpha[j + 1] * math.expm1(-h) * m
        if order == 2:
            r = (lam[j - 1] - lam[j]) / h
            x_next = x_next - alpha[j + 1] * math.expm1(-h) * 0.5 * (ms[-2] - m) / r
        x = x_next
    return x


REFERENCES = {"dpmpp-3m": reference_3m, "unipc": reference_unipc}


@pytest.mark.parametrize("sampler", list(REFERENCES))
@pytest.mark.parametrize("steps", [4, 5, 6, 10, 15, 16, 25])
@pytest.mark.parametrize("clip", [False, True])
def test_matches_the_paper_in_float64(sampler, steps, clip):
    plan = make_plan(COND, sampler=sampler, steps=steps, **({"clip_denoised": True} if clip else {}))
    rng = np.random.default_rng(steps)
    x_T = rng.standard_normal((2, 1, 4, 4)) * 1.5
    ours = sample(per_step(fake_eps), x_T, plan.coefs, lambda i: pytest.fail("a deterministic sampler drew noise"))
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, REFERENCES[sampler](plan, x_T, clip), atol=F64.atol, rtol=F64.rtol)


@pytest.mark.parametrize("sampler, slots, first_full", [("dpmpp-3m", 2, 3), ("unipc", 2, 3)])
def test_warm_up_and_the_final_steps_are_rows_of_the_table(sampler, slots, first_full):
    """The history columns are 0 where it is not yet filled and on the last step (to σ = 0); filled in between."""
    plan = make_plan(COND, sampler=sampler, steps=20)
    h = plan.coefs.history[::-1]  # in sampling order
    assert plan.coefs.slots == slots
    for j in range(slots):
        assert not np.any(h[:j + 1, j]), f"slot {j + 1} used before it is filled"
    assert np.all(h[first_full - 1:-1] != 0)  # full order from the step whose history is full, to the end
    assert not np.any(h[-1])  # the last step is first order: x_0 = x̂₀


def test_default_steps_and_one_call_a_step():
    for sampler in REFERENCES:
        plan = make_plan(COND, sampler=sampler)
        assert plan.steps == 10
        calls = []
        sample(lambda x, t, y: calls.append(1) or fake_eps(x, int(t[0])), np.zeros((1, 1, 4, 4)), plan.coefs,
               lambda i: None)
        assert len(calls) == 10  # the UniC corrector reuses the next call


@pytest.mark.parametrize("settings, message", [
    (dict(sampler="dpmpp-3m", eta=0.5), "eta applies to the ddim sampler only, not to dpmpp-3m"),
    (dict(sampler="unipc", variance="beta"), "variance applies to the ddpm sampler only, not to unipc"),
    (dict(sampler="dpmpp-3m", steps=2), "dpmpp-3m needs at least 3 steps (its first 2 warm up its history), got 2"),
    (dict(sampler="unipc", steps=1), "unipc needs at least 2 steps"),
    (dict(sampler="unipc-3"), f"unknown sampler 'unipc-3' (expected one of {', '.join(SAMPLERS)})"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(SettingsError) as e:
        make_plan(COND, **settings)
    assert message in str(e.value) and "\n" not in str(e.value)
