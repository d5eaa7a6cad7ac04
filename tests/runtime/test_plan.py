"""runtime.sampling.plan: the one definition of a run's sampler settings, their defaults, the model's recommendations
and the per-step coefficients."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from runtime.errors import ContractError, SettingsError
from runtime.metadata import RunDefaults, SamplingContract
from runtime.sampling.plan import make_plan
from runtime.sampling.samplers import ddim, ddpm, dpmpp_3m
from runtime.sampling.table import COLUMNS, history_columns
from tests.runtime.test_metadata import as_schema

COND = SamplingContract(image_size=8, channels=1, num_classes=3)
UNCOND = SamplingContract(image_size=8, channels=1)
RECOMMENDS = dataclasses.replace(COND, run_defaults=RunDefaults(sampler="ddim", steps=20, eta=0.5, guidance=1.5))


def test_runtime_defaults_without_recommendations():
    p = make_plan(COND)
    assert (p.sampler, p.steps, p.eta, p.guidance, p.variance, p.from_model) == ("ddpm", 1000, None, 1.0, "beta", ())
    assert make_plan(COND, sampler="ddim").steps == 50 and make_plan(COND, sampler="ddim").variance is None
    assert make_plan(COND, sampler="ddpm", steps=100).variance == "beta_tilde"  # respaced: β̃ (Improved DDPM)
    assert make_plan(COND, sampler="ddpm", steps=1000).variance == "beta"  # full T: the contract's choice
    assert make_plan(dataclasses.replace(COND, variance="beta_tilde")).variance == "beta_tilde"
    assert make_plan(COND, sampler="ddpm", steps=100, variance="beta").variance == "beta"


def test_the_models_recommendations_fill_what_is_not_given():
    p = make_plan(RECOMMENDS)
    assert (p.sampler, p.steps, p.eta, p.guidance) == ("ddim", 20, 0.5, 1.5)
    assert p.from_model == ("sampler", "steps", "eta", "guidance")
    p = make_plan(RECOMMENDS, steps=10, guidance=1.0)  # given settings win
    assert (p.sampler, p.steps, p.eta, p.guidance, p.from_model) == ("ddim", 10, 0.5, 1.0, ("sampler", "eta"))
    p = make_plan(RECOMMENDS, sampler="ddpm")  # steps and eta were recommended for DDIM only
    assert (p.sampler, p.steps, p.guidance, p.from_model) == ("ddpm", 1000, 1.5, ("guidance",))
    p = make_plan(RECOMMENDS, model_defaults=False)  # the paper's settings, one flag away
    assert (p.sampler, p.steps, p.guidance, p.from_model) == ("ddpm", 1000, 1.0, ())


def test_explicit_settings_give_the_same_coefficients_with_or_without_recommendations():
    a = make_plan(COND, sampler="ddim", steps=20, eta=0.5, guidance=1.5)
    b = make_plan(RECOMMENDS)
    assert np.array_equal(a.coefs.table(), b.coefs.table()) and np.array_equal(a.coefs.timesteps, b.coefs.timesteps)
    assert a.run_settings() == b.run_settings()


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="plms"), "unknown sampler"),
    (dict(steps=0), "between 1 and T = 1000"),
    (dict(steps=1001), "between 1 and T = 1000"),
    (dict(steps=2.5), "between 1 and T"),
    (dict(sampler="ddim", eta=-0.1), "eta must be a number between 0 and 1"),
    (dict(sampler="ddim", eta=2.0), "the update is undefined"),
    (dict(sampler="ddim", eta=float("nan")), "eta must be a number between 0 and 1"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(guidance=float("inf")), "guidance must be a finite number"),
    (dict(guidance=1e300), "guidance must be a finite number from 0 to 50"),
    (dict(guidance=3e38), "guidance must be from 0 \\(unconditional\\) to 50, got 3e\\+38"),
    (dict(guidance=50.5), "guidance must be from 0 \\(unconditional\\) to 50, got 50.5"),
    (dict(guidance=-0.5), "guidance must be from 0 \\(unconditional\\) to 50, got -0.5"),
    (dict(variance="learned"), "unknown variance"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        make_plan(COND, **kwargs)


def test_guidance_needs_a_conditional_model():
    with pytest.raises(SettingsError, match="unconditional"):
        make_plan(UNCOND, guidance=2.0)
    assert make_plan(UNCOND, guidance=1.0).guided is False
    assert make_plan(COND, guidance=2.0).guided is True


def test_run_settings_and_manifest_fields():
    p = make_plan(COND, sampler="ddim", steps=10, eta=0.0, guidance=2.0)
    assert p.run_settings() == {"sampler": "ddim", "steps": 10, "eta": 0.0, "guidance": 2.0, "clip_denoised": False,
                                "variance": None, "timesteps": [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]}
    assert p.manifest_fields() == {"sampler": "ddim", "steps": 10, "eta": 0.0, "guidance": 2.0}
    assert make_plan(COND, sampler="ddpm", steps=10).run_settings()["eta"] is None  # DDPM has no η
    assert p.describe() == "ddim 10 steps, eta 0, guidance 2"


def test_coefficient_table_follows_the_named_columns():
    s = COND.schedule.build().respace(10)
    for c in (ddpm.coefficients(s, variance="beta_tilde", clip_denoised=True), ddim.coefficients(s, eta=0.3),
              dpmpp_3m.coefficients(s)):
        table = c.table()
        assert table.shape == (10, len(COLUMNS) + c.slots) and table.dtype == np.float32
        for k, name in enumerate(COLUMNS):
            np.testing.assert_array_equal(table[:, k], getattr(c, name).astype(np.float32))
        for j, name in enumerate(history_columns(c.slots)):
            np.testing.assert_array_equal(table[:, len(COLUMNS) + j], c.history[:, j].astype(np.float32))
        padded = c.table(3)  # a mixed batch pads the history columns with zeros
        assert padded.shape == (10, len(COLUMNS) + 3) and not padded[:, len(COLUMNS) + c.slots:].any()


def test_contract_run_defaults_are_validated_and_round_trip():
    assert SamplingContract.from_json(RECOMMENDS.to_json()) == RECOMMENDS
    with pytest.raises(ContractError, match="run_defaults.guidance"):
        dataclasses.replace(UNCOND, run_defaults=RunDefaults(guidance=2.0))
    with pytest.raises(ContractError, match="run_defaults.steps"):
        dataclasses.replace(COND, run_defaults=RunDefaults(steps=5000))
    with pytest.raises(ContractError, match="run_defaults.sampler"):
        dataclasses.replace(COND, run_defaults=RunDefaults(sampler="plms"))


def test_schema_1_contracts_read_without_run_defaults():
    data = json.loads(COND.to_json())
    as_schema(data, 1)
    del data["run_defaults"]
    assert SamplingContract.from_dict(data).run_defaults is None
