"""Models from elsewhere: v- and x̂₀-predicting models, diffusers' β schedules and timestep spacings, against float64
references written from the papers (and from diffusers' documented formulas), sharing no code with the runtime.

* prediction: a step written directly in v (Salimans & Ho 2022: x̂₀ = α·x − σ·v, ε = α·v + σ·x) or in x̂₀
  (Ho et al. eq. 7, the posterior mean of the predicted x̂₀), and the equivalence that defines them: a v- or
  x̂₀-network built from an ε-network samples exactly what the ε-network samples, for every sampler;
* schedules: scaled_linear (√β evenly spaced), sigmoid (GeoDiff) and explicit betas, in plain Python;
* spacing: diffusers' ``timestep_spacing`` (linspace, leading with ``steps_offset``, trailing), in plain Python.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.errors import ContractError, SettingsError
from runtime.metadata import RunDefaults, SamplingContract, ScheduleSpec
from runtime.sampling.engine import sample
from runtime.sampling.plan import make_plan
from runtime.sampling.schedule import NoiseSchedule, make_betas, timestep_indices
from runtime.sampling.settings import SAMPLERS, applies
from runtime.tolerances import TOLERANCES
from tests.nets import per_step

F64 = TOLERANCES["fp64"]
T = 200


def contract(prediction: str = "epsilon", **kw) -> SamplingContract:
    return SamplingContract(image_size=4, channels=1, schedule=ScheduleSpec("linear", T, {"beta_start": 1e-4,
                                                                                        "beta_end": 0.02}),
                            prediction=prediction, **kw)


ABAR = contract().schedule.build().alphas_cumprod


def fake_eps(x, t):
    """A smooth ε-predictor that depends on x and t (float64)."""
    return np.tanh(0.8 * x + 0.002 * t) * 0.9 + 0.05 * np.cos(x)


def to_v(eps_net):
    """The v-network equivalent to an ε-network: v = α·ε − σ·x̂₀ with x̂₀ = (x − σ·ε)/α."""
    def v(x, t):
        a, s = math.sqrt(ABAR[t]), math.sqrt(1.0 - ABAR[t])
        eps = eps_net(x, t)
        return a * eps - s * (x - s * eps) / a
    return v


def to_x0(eps_net):
    """The x̂₀-network equivalent to an ε-network."""
    def x0(x, t):
        a, s = math.sqrt(ABAR[t]), math.sqrt(1.0 - ABAR[t])
        return (x - s * eps_net(x, t)) / a
    return x0


as_v, as_x0 = to_v(fake_eps), to_x0(fake_eps)
NETS = {"epsilon": fake_eps, "v_prediction": as_v, "sample": as_x0}


def run(plan, net, x_T, noises):
    K = len(plan.coefs.timesteps)
    return sample(per_step(net), x_T, plan.coefs, lambda i: noises[K - 1 - i])


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("clip", [False, True])
def test_v_and_x0_models_sample_what_the_equivalent_eps_model_samples(prediction, sampler, clip):
    if clip and not applies("clip_denoised", sampler):
        pytest.skip(f"{sampler} does not clip")
    steps = T if sampler == "ddpm" and not clip else 12
    kw = dict(sampler=sampler, steps=steps, clip_denoised=clip if applies("clip_denoised", sampler) else None,
              eta=0.7 if sampler == "ddim" else None)
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((2, 1, 4, 4))
    noises = rng.standard_normal((steps, 2, 1, 4, 4))
    want = run(make_plan(contract(), **kw), fake_eps, x_T, noises)
    got = run(make_plan(contract(prediction), **kw), NETS[prediction], x_T, noises)
    np.testing.assert_allclose(got, want, atol=F64.atol, rtol=F64.rtol)


def reference_ddim_v(v_net, x_T, timesteps, clip_range=None):
    """DDIM (η = 0) in v directly: x̂₀ = α·x − σ·v, ε = α·v + σ·x, x' = α'·x̂₀ + σ'·ε (ᾱ = 1 after the last)."""
    x = x_T
    for j, t in enumerate(timesteps):
        a, s = math.sqrt(ABAR[t]), math.sqrt(1.0 - ABAR[t])
        ab_next = ABAR[timesteps[j + 1]] if j + 1 < len(timesteps) else 1.0
        v = v_net(x, t)
        x0, eps = a * x - s * v, a * v + s * x
        if clip_range is not None:
            x0 = np.clip(x0, -clip_range, clip_range)
        x = math.sqrt(ab_next) * x0 + math.sqrt(1.0 - ab_next) * eps
    return x


def reference_ddpm_x0(x0_net, x_T, noises, clip_range):
    """Algorithm 2 in x̂₀ form: x_{t−1} = μ̃(x_t, clip(x̂₀)) + √β̃_t·z (Ho et al. eq. 6-7), all T steps."""
    x = x_T
    for j, t in enumerate(range(T - 1, -1, -1)):
        ab, ab_prev = ABAR[t], ABAR[t - 1] if t > 0 else 1.0
        beta = 1.0 - ab / ab_prev
        x0 = np.clip(x0_net(x, t), -clip_range, clip_range)
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        x = mean + (math.sqrt(beta * (1 - ab_prev) / (1 - ab)) * noises[j] if t > 0 else 0.0)
    return x


def test_ddim_on_a_v_model_matches_the_v_form_of_the_paper():
    rng = np.random.default_rng(5)
    x_T = rng.standard_normal((2, 1, 4, 4))
    plan = make_plan(contract("v_prediction"), sampler="ddim", steps=10, clip_denoised=True, clip_range=0.8)
    got = sample(per_step(as_v), x_T, plan.coefs, lambda i: None)
    want = reference_ddim_v(as_v, x_T, plan.coefs.timesteps[::-1].tolist(), clip_range=0.8)
    np.testing.assert_allclose(got, want, atol=F64.atol, rtol=F64.rtol)


def test_ddpm_on_an_x0_model_matches_the_posterior_mean_form():
    rng = np.random.default_rng(6)
    x_T = rng.standard_normal((2, 1, 4, 4))
    noises = rng.standard_normal((T, 2, 1, 4, 4))
    plan = make_plan(contract("sample", variance="beta_tilde"), sampler="ddpm", clip_denoised=True, clip_range=1.5)
    got = sample(per_step(as_x0), x_T, plan.coefs, lambda i: noises[T - 1 - i])
    np.testing.assert_allclose(got, reference_ddpm_x0(as_x0, x_T, noises, 1.5), atol=F64.atol, rtol=F64.rtol)


def test_guidance_is_linear_in_any_prediction():
    """ε is affine in the network's output, so guiding the output guides ε."""
    c_eps, c_v = contract(num_classes=2), contract("v_prediction", num_classes=2)

    def uncond_eps(x, t):
        return np.sin(0.5 * x - 0.001 * t) * 0.7

    def guided(cond, uncond):  # label 0: the conditional net, 1 (the null class): the unconditional one
        def net(x, t, y):
            tt = int(t[0])  # one row: every image at the same t
            return np.where(y[:, None, None, None] == 0, cond(x, tt), uncond(x, tt))
        return net

    x_T = np.random.default_rng(7).standard_normal((1, 1, 4, 4))
    plan_eps, plan_v = (make_plan(c, sampler="ddim", steps=8, guidance=2.5) for c in (c_eps, c_v))
    want = sample(guided(fake_eps, uncond_eps), x_T, plan_eps.coefs, lambda i: None, labels=[0], null_class=1)
    got = sample(guided(as_v, to_v(uncond_eps)), x_T, plan_v.coefs, lambda i: None, labels=[0], null_class=1)
    np.testing.assert_allclose(got, want, atol=F64.atol, rtol=F64.rtol)


# -- schedules -----------------------------------------------------------------------------------------------------
def test_scaled_linear_sigmoid_and_explicit_betas_closed_forms():
    n = 50
    sl = make_betas("scaled_linear", n, beta_start=0.00085, beta_end=0.012)
    for i in (0, 17, n - 1):
        root = math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / (n - 1)
        assert sl[i] == pytest.approx(root * root, rel=1e-12)
    sg = make_betas("sigmoid", n, beta_start=1e-4, beta_end=0.02)
    for i in (0, 25, n - 1):
        u = -6.0 + 12.0 * i / (n - 1)
        assert sg[i] == pytest.approx(1e-4 + (0.02 - 1e-4) / (1.0 + math.exp(-u)), rel=1e-12)
    given = [0.01 + 0.001 * i for i in range(n)]
    assert make_betas("explicit", n, given).tolist() == given
    for bad, message in (([0.1] * (n - 1), "T = 50 betas"), ([0.1] * (n - 1) + [1.0], r"\(0, 1\)")):
        with pytest.raises(ValueError, match=message):
            make_betas("explicit", n, bad)


def test_explicit_schedule_round_trips_in_the_contract():
    betas = np.linspace(1e-4, 0.03, 40).tolist()
    c = SamplingContract(image_size=8, channels=3, schedule=ScheduleSpec("explicit", 40, {}, betas),
                         prediction="v_prediction", num_classes=5, null_class=None)
    back = SamplingContract.from_json(c.to_json())
    assert back == c and back.schedule.build().betas.tolist() == betas
    assert back.null_class is None and not back.guidable and back.conditional


def test_a_model_without_a_null_class_refuses_guidance_and_says_why():
    c = contract(num_classes=4, null_class=None)
    make_plan(c, sampler="ddim", steps=5)  # unguided: fine
    for kw in (dict(guidance=2.0), dict(guidance_interval=(0, 50))):
        with pytest.raises(SettingsError, match="null .*label, and this model has none.*--null-class"):
            make_plan(c, sampler="ddim", steps=5, **kw)
    with pytest.raises(ContractError, match="run_defaults.guidance"):
        contract(num_classes=4, null_class=None, run_defaults=RunDefaults(guidance=2.0))
    assert contract(num_classes=4).null_class == 4 and contract().null_class is None


# -- spacing ---------------------------------------------------------------------------------------------------------
def diffusers_timesteps(n_train, k, spacing, offset=0):
    """diffusers' ``set_timesteps`` (DDPMScheduler / DDIMScheduler), descending, in plain Python."""
    if spacing == "linspace":
        return [round(i * (n_train - 1) / (k - 1)) for i in reversed(range(k))]
    if spacing == "leading":
        ratio = n_train // k
        return [i * ratio + offset for i in reversed(range(k))]
    return [round(n_train - i * n_train / k) - 1 for i in range(k)]


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("k", [1, 3, 7, 10, 50, 333, 999])
def test_spacings_give_diffusers_timesteps(spacing, offset, k):
    got = timestep_indices(1000, k, spacing, offset)[::-1].tolist()
    if spacing == "linspace" and k == 1:  # diffusers' linspace of one step is t = 0; ours has always kept T − 1
        assert got == [999]
    else:
        assert got == diffusers_timesteps(1000, k, spacing, offset)


def test_spacing_reaches_the_plan_and_the_offset_needs_leading():
    plan = make_plan(contract(), sampler="ddim", steps=10, spacing="leading", steps_offset=1)
    assert plan.coefs.timesteps.tolist() == [1 + 20 * i for i in range(10)]
    assert "leading + 1" in plan.describe()
    assert make_plan(contract(), sampler="ddim", steps=10, spacing="trailing").coefs.timesteps[-1] == T - 1
    with pytest.raises(SettingsError, match="steps_offset applies to leading spacing only"):
        make_plan(contract(), sampler="ddim", steps=10, spacing="trailing", steps_offset=1)
    with pytest.raises(SettingsError, match="past T - 1"):
        make_plan(contract(), sampler="ddim", steps=2, spacing="leading", steps_offset=150)
    # a recommended offset holds for leading only, and a run that names the implicit values reads the same
    rec = contract(run_defaults=RunDefaults(spacing="leading", steps_offset=1))
    assert make_plan(rec, sampler="ddim", steps=10, spacing="trailing").steps_offset is None
    plain = make_plan(contract(), sampler="ddim", steps=10)
    named = make_plan(contract(), sampler="ddim", steps=10, spacing="linspace", steps_offset=None, clip_range=1.0)
    assert named.run_settings() == plain.run_settings() and "spacing" not in plain.run_settings()
    assert np.array_equal(named.coefs.table(), plain.coefs.table())


def test_respaced_schedule_keeps_alphabar_at_the_kept_timesteps():
    s = NoiseSchedule.from_name("scaled_linear", 1000)
    keep = timestep_indices(1000, 20, "leading", 1)
    np.testing.assert_allclose(s.respace(keep).alphas_cumprod, s.alphas_cumprod[keep], rtol=1e-12)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("settings", [dict(sampler="ddpm", steps=30, clip_denoised=True, guidance=2.0),
                                      dict(sampler="ddim", steps=10, eta=0.5, guidance=1.5),
                                      dict(sampler="dpmpp-2m", steps=8, guidance=2.0, spacing="trailing")])
def test_every_loop_runs_v_and_x0_models_alike(tmp_path, prediction, settings):
    """The host loop and the fused ONNX step graph apply the same re-expressed coefficients (the server: its test)."""
    import runtime
    from tests.toy_onnx import make_toy_predictor

    model = runtime.load(make_toy_predictor(tmp_path / "m.onnx", channels=3, image_size=8, num_classes=3,
                                            prediction=prediction), "cpu")
    host, fused = (model.generate(4, seed=3, classes=[0, 1, 2, 0], fused=f, **settings) for f in (False, True))
    assert np.abs(host.astype(int) - fused).max() <= TOLERANCES["fp32-same-math"].max_levels
    eps_model = runtime.load(make_toy_predictor(tmp_path / "e.onnx", channels=3, image_size=8, num_classes=3), "cpu")
    assert np.abs(eps_model.generate(4, seed=3, classes=[0, 1, 2, 0], **settings).astype(int) - host).max() > 0
