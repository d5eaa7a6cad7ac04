"""iPNDM (Zhang & Chen 2023, "DEIS", §4; diff-sampler's ``ipndm``) against a float64 reference written here from the
paper: Adams–Bashforth in y = x/α over s = σ/α (dy/ds = ε), orders 1 → 4 as its own list of ε fills. It shares no
code with the step table. There is no diffusers equivalent."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.errors import SettingsError
from runtime.metadata import RunDefaults, SamplingContract
from runtime.sampling.engine import sample
from runtime.sampling.plan import make_plan
from runtime.sampling.settings import taking
from runtime.tolerances import TOLERANCES
from tests.nets import per_step

F64 = TOLERANCES["fp64"]
COND = SamplingContract(image_size=4, channels=1, num_classes=3)
AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def fake_eps(x, t):
    return np.tanh(0.8 * x + 0.002 * t) * 0.9 + 0.05 * np.cos(x)


def reference_ipndm(timesteps, x_T):
    """timesteps in sampling order; after the last one, σ = 0 (s = 0, α = 1)."""
    ab = COND.schedule.build().alphas_cumprod[timesteps]
    alpha, sigma = np.append(np.sqrt(ab), 1.0), np.append(np.sqrt(1.0 - ab), 0.0)
    s = sigma / alpha
    x, es = x_T, []
    for j, t in enumerate(timesteps):
        es.append(fake_eps(x, int(t)))
        w = AB[min(4, j + 1)]
        y = x / alpha[j] + (s[j + 1] - s[j]) * sum(wk * es[-1 - k] for k, wk in enumerate(w))
        x = alpha[j + 1] * y
    return x


@pytest.mark.parametrize("steps", [4, 5, 6, 10, 16, 25])
def test_matches_the_paper_in_float64(steps):
    plan = make_plan(COND, sampler="ipndm", steps=steps)
    x_T = np.random.default_rng(steps).standard_normal((2, 1, 4, 4)) * 1.5
    ours = sample(per_step(fake_eps), x_T, plan.coefs, lambda i: pytest.fail("iPNDM draws no noise"))
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, reference_ipndm(plan.coefs.timesteps[::-1], x_T), atol=F64.atol, rtol=F64.rtol)


def test_the_order_grows_while_the_history_fills():
    plan = make_plan(COND, sampler="ipndm")
    h = plan.coefs.history[::-1]  # sampling order; slots h1, h2, h3
    assert plan.steps == 10 and plan.coefs.slots == 3
    assert [int(np.count_nonzero(row)) for row in h[:5]] == [0, 1, 2, 3, 3]
    assert np.all(plan.coefs.d_from_eps == 1.0) and not np.any(plan.coefs.d_from_x)  # its state is ε itself


@pytest.mark.parametrize("settings, message", [
    (dict(sampler="ipndm", clip_denoised=True), f"clip_denoised applies to the {', '.join(taking('clip_denoised'))} "
                                                "samplers only, not to ipndm"),
    (dict(sampler="ipndm", clip_range=0.5), "clip_range applies to"),
    (dict(sampler="ipndm", eta=0.0), "eta applies to the ddim sampler only, not to ipndm"),
    (dict(sampler="ipndm", steps=3), "ipndm needs at least 4 steps (its first 3 warm up its history), got 3"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(SettingsError) as e:
        make_plan(COND, **settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_recommendation_it_cannot_take_is_not_applied():
    """A model that recommends clipping: ipndm (which cannot clip) runs without it and does not claim it."""
    model = dataclasses.replace(COND, run_defaults=RunDefaults(sampler="ddim", clip_denoised=True, eta=0.5))
    plan = make_plan(model, sampler="ipndm")
    assert plan.clip_denoised is None and plan.eta is None and "clip_denoised" not in plan.from_model
