"""DPM-Solver++(2M) and its SDE variant against a float64 reference written from the paper, and the guidance interval.

The reference follows Lu et al. 2022 ("DPM-Solver++", Algorithm 2 and its SDE variant) literally: λ = log α − log σ,
h = λ_t − λ_s, r = h_prev/h, e^{−h} from ``np.exp``; the runtime forms e^{−h} as a ratio and folds everything into
the step table, so the two share no code.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.errors import SettingsError
from runtime.metadata import RunDefaults, SamplingContract
from runtime.sampling.engine import sample
from runtime.sampling.plan import make_plan
from runtime.tolerances import TOLERANCES
from tests.nets import per_step

F64 = TOLERANCES["fp64"]
COND = SamplingContract(image_size=4, channels=1, num_classes=3)
UNCOND = SamplingContract(image_size=4, channels=1)


def fake_eps(x, t):
    """A smooth predictor that depends on x and t (float64 in, float64 out)."""
    return np.tanh(0.8 * x + 0.002 * t) * 0.9 + 0.05 * np.cos(x)


def reference_dpmpp(eps, x_T, alphas_cumprod, timesteps, noises, *, sde: bool, clip: bool = False):
    """DPM-Solver++(2M) / SDE-DPM-Solver++(2M) from the paper, float64; timesteps in sampling order (t high → low).

    After the last model timestep the solver goes to σ = 0, where x_0 = x̂_0 (its limit h → ∞).
    """
    ab = alphas_cumprod[timesteps]
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha) - np.log(sigma)
    x, prev_x0, prev_h = x_T, None, None
    M = len(timesteps)
    for j in range(M):
        x0 = (x - sigma[j] * eps(x, int(timesteps[j]))) / alpha[j]
        if clip:
            x0 = np.clip(x0, -1.0, 1.0)
        if j == M - 1:  # to σ = 0: first order, e^{−h} = 0
            return x0
        h = lam[j + 1] - lam[j]
        if prev_x0 is None:  # the first step: first order
            D = x0
        else:
            r = prev_h / h
            D = (1.0 + 1.0 / (2.0 * r)) * x0 - 1.0 / (2.0 * r) * prev_x0
        if sde:
            x = (sigma[j + 1] / sigma[j] * np.exp(-h) * x + alpha[j + 1] * (1.0 - np.exp(-2.0 * h)) * D
                 + sigma[j + 1] * np.sqrt(1.0 - np.exp(-2.0 * h)) * noises[j])
        else:
            x = sigma[j + 1] / sigma[j] * x - alpha[j + 1] * (np.exp(-h) - 1.0) * D
        prev_x0, prev_h = x0, h
    raise AssertionError("unreachable")


def run_runtime(plan, x_T, noises):
    K = len(plan.coefs.timesteps)
    used = []

    def noise(i):  # step index i runs K−1 … 0; the reference's j = K−1−i
        used.append(i)
        return noises[K - 1 - i]

    out = sample(per_step(fake_eps), x_T, plan.coefs, noise)
    return out, used


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "dpmpp-2m-sde"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 15, 20, 50])
@pytest.mark.parametrize("clip", [False, True])
def test_dpmpp_matches_the_paper_in_float64(sampler, steps, clip):
    plan = make_plan(COND, sampler=sampler, steps=steps, clip_denoised=clip)
    rng = np.random.default_rng(steps)
    x_T = rng.standard_normal((2, 1, 4, 4)) * 1.5
    noises = rng.standard_normal((steps, 2, 1, 4, 4))
    ours, used = run_runtime(plan, x_T, noises)
    assert ours.dtype == np.float64
    timesteps = plan.coefs.timesteps[::-1]
    ab = COND.schedule.build().alphas_cumprod
    want = reference_dpmpp(fake_eps, x_T, ab, timesteps, noises, sde=sampler == "dpmpp-2m-sde", clip=clip)
    np.testing.assert_allclose(ours, want, atol=F64.atol, rtol=F64.rtol)
    # noise: the SDE draws one z per step but the last (σ = 0 there); the ODE none
    assert used == (list(range(steps - 1, 0, -1)) if sampler == "dpmpp-2m-sde" else [])


def test_second_order_steps_are_second_order():
    """The multistep correction is there (not first order everywhere) and vanishes where the paper says."""
    plan = make_plan(COND, sampler="dpmpp-2m", steps=10)
    prev = plan.coefs.history[:, 0]
    assert prev[-1] == 0.0 and prev[0] == 0.0  # the first step (i = K−1) and the last (i = 0) are first order
    assert np.all(prev[1:-1] < 0)  # D = (1 + 1/2r) x̂₀ − 1/2r x̂₀': a negative weight on the previous x̂₀
    # first-order DPM-Solver++ is DDIM (η = 0): with two steps the two agree
    x_T = np.random.default_rng(0).standard_normal((3, 1, 4, 4))
    a = sample(per_step(fake_eps), x_T, make_plan(COND, sampler="dpmpp-2m", steps=2).coefs, lambda i: None)
    b = sample(per_step(fake_eps), x_T, make_plan(COND, sampler="ddim", steps=2).coefs, lambda i: None)
    np.testing.assert_allclose(a, b, atol=F64.atol, rtol=F64.rtol)


def test_ddpm_and_ddim_rows_carry_no_history():
    for settings in (dict(sampler="ddpm", steps=20), dict(sampler="ddim", steps=20, eta=0.5),
                     dict(sampler="ddim", steps=20, clip_denoised=True)):
        assert make_plan(COND, **settings).coefs.slots == 0


def test_default_steps_and_same_spacing_for_every_sampler():
    plans = {s: make_plan(COND, sampler=s) for s in ("dpmpp-2m", "dpmpp-2m-sde")}
    assert all(p.steps == 20 for p in plans.values())
    ddim = make_plan(COND, sampler="ddim", steps=20)
    assert all(np.array_equal(p.coefs.timesteps, ddim.coefs.timesteps) for p in plans.values())
    assert list(ddim.coefs.timesteps[[0, 1, -1]]) == [0, 53, 999]  # round(linspace(0, T − 1, K))


def test_guidance_interval_guides_only_inside_and_halves_the_rest():
    plan = make_plan(COND, sampler="dpmpp-2m", steps=20, guidance=2.0, guidance_interval=(100, 600))
    t = plan.coefs.timesteps
    inside = (t >= 100) & (t <= 600)
    assert 0 < inside.sum() < len(t)
    assert np.all(plan.coefs.guidance[inside] == 2.0) and np.all(plan.coefs.guidance[~inside] == 1.0)
    calls = []

    def net(x, t, y):  # the engine doubles the batch with the null class (3) on the guided steps only
        calls.append((int(t[0]), y.tolist()))
        return fake_eps(x, t[:, None, None, None])

    sample(net, np.zeros((1, 1, 4, 4)), plan.coefs, lambda i: None, labels=[1], null_class=3)
    assert [y for _, y in calls] == [[1, 3] if 100 <= tt <= 600 else [1] for tt, _ in calls]
    assert plan.guided and plan.run_settings()["guidance_interval"] == [100, 600]
    assert plan.manifest_fields()["guidance_interval"] == [100, 600]
    assert plan.describe() == "dpmpp-2m 20 steps, guidance 2 on t in [100, 600]"
    # without an interval, run.json records exactly what it did before the setting existed
    assert "guidance_interval" not in make_plan(COND, guidance=2.0).run_settings()


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="euler"), "unknown sampler 'euler'"),
    (dict(sampler="dpmpp-2m", eta=0.5), "eta applies to the ddim sampler only, not to dpmpp-2m"),
    (dict(sampler="ddpm", eta=0.0), "eta applies to the ddim sampler only"),
    (dict(sampler="dpmpp-2m-sde", variance="beta"), "variance applies to the ddpm sampler only"),
    (dict(guidance_interval=(5,)), "two integers"),
    (dict(guidance_interval=(1.5, 3)), "two integers"),
    (dict(guidance_interval=(-1, 3)), "0 <= LO <= HI < T = 1000"),
    (dict(guidance_interval=(10, 1000)), "0 <= LO <= HI < T = 1000"),
    (dict(guidance_interval=(600, 100)), "0 <= LO <= HI < T = 1000, got 600,100"),
])
def test_bad_multistep_and_interval_settings(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        make_plan(COND, **kwargs)


def test_an_interval_needs_a_conditional_model():
    with pytest.raises(SettingsError, match="needs a class-conditional model"):
        make_plan(UNCOND, guidance_interval=(0, 500))


def test_recommended_interval_and_sampler_round_trip_and_apply():
    rec = dataclasses.replace(COND, run_defaults=RunDefaults(sampler="dpmpp-2m", steps=15, guidance=2.0,
                                                             guidance_interval=(80, 580)))
    back = SamplingContract.from_json(rec.to_json())
    assert back == rec and back.run_defaults.guidance_interval == (80, 580)
    p = make_plan(back)
    assert (p.sampler, p.steps, p.guidance, p.guidance_interval) == ("dpmpp-2m", 15, 2.0, (80, 580))
    assert p.from_model == ("sampler", "steps", "guidance", "guidance_interval")
    # a recommendation for another sampler's setting is not used: eta recommended with ddim, run with dpmpp
    ddim_rec = dataclasses.replace(COND, run_defaults=RunDefaults(sampler="ddim", eta=0.5, steps=30))
    q = make_plan(ddim_rec, sampler="dpmpp-2m")
    assert (q.eta, q.steps, q.from_model) == (None, 20, ())


def test_run_defaults_text_covers_every_setting():
    from runtime.sampling.settings import NAMES, RunSettings

    s = RunSettings.parse("sampler=dpmpp-2m,steps=15,guidance=2,guidance_interval=0:400,clip_denoised=false")
    assert s == RunSettings(sampler="dpmpp-2m", steps=15, guidance=2.0, guidance_interval=(0, 400), clip_denoised=False)
    assert RunSettings.parse("none") is None and RunSettings.parse("") is None
    for text, message in (("steps=x", "steps needs an integer"), ("euler=1", "KEY one of " + ", ".join(NAMES)),
                          ("guidance_interval=5", "two integers"), ("clip_denoised=maybe", "true or false")):
        with pytest.raises(ValueError, match=message):
            RunSettings.parse(text)
    with pytest.raises(TypeError, match="unknown run setting 'sampler_name'"):
        RunSettings.from_kwargs({"sampler_name": "ddim"})
