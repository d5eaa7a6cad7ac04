"""The sampling contract: JSON round trip and strict reading."""

from __future__ import annotations

import json

import pytest

from runtime.metadata import SCHEMA_VERSION, ContractError, Provenance, SamplingContract, ScheduleSpec


def conditional_contract() -> SamplingContract:
    return SamplingContract(
        image_size=32, channels=1, schedule=ScheduleSpec("cosine", 1000, {"s": 0.008, "max_beta": 0.999}),
        num_classes=3, class_names=["a", "b", "c"], ema=True, variance="beta_tilde",
        provenance=Provenance(dataset="fashion-mnist", training_steps=1200, torch_version="2.14.1"),
    )


def test_json_round_trip_is_exact():
    c = conditional_contract()
    back = SamplingContract.from_json(c.to_json())
    assert back == c
    assert back.to_json() == c.to_json()
    assert back.schema_version == SCHEMA_VERSION


def test_default_tensor_specs_follow_conditioning():
    c = conditional_contract()
    assert [(s.name, s.dtype, s.shape) for s in c.inputs] == [
        ("x", "float32", ["batch", 1, 32, 32]), ("t", "int64", ["batch"]), ("y", "int64", ["batch"])]
    assert [(s.name, s.dtype) for s in c.outputs] == [("eps", "float32")]
    assert c.null_class == 3 and c.conditional
    u = SamplingContract(image_size=64, channels=3)
    assert [s.name for s in u.inputs] == ["x", "t"] and u.null_class is None
    assert u.schedule.build().alphas_cumprod[-1] == pytest.approx(4.04e-5, rel=2e-3)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("variance"), "variance"),
        (lambda d: d["schedule"].pop("timesteps"), "schedule.timesteps"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.update(variance="learned"), "variance"),
        (lambda d: d["schedule"].update(name="sigmoid"), "schedule.name"),
        (lambda d: d.update(prediction_type="v"), "prediction_type"),
        (lambda d: d.update(channels=4), "channels"),
        (lambda d: d.update(pixel_range=[0, 1]), "pixel_range"),
        (lambda d: d.update(class_names=["a"]), "class_names"),
        (lambda d: d["inputs"][0].update(dtype="float64"), "inputs[0].dtype"),
        (lambda d: d["inputs"].pop(), "inputs"),
        (lambda d: d["provenance"].update(training_steps=-1), "provenance.training_steps"),
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "schema_version"),
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d["schedule"]["params"].update(beta_start=-0.1), "schedule.params"),
        (lambda d: d["schedule"]["params"].update(beta_end=1.0), "schedule.params"),
        (lambda d: d["schedule"].update(timesteps=10**12), "schedule.timesteps"),
        (lambda d: d["inputs"][0].update(shape=["batch", 3, 32, 32]), "inputs[0].shape"),
        (lambda d: d["outputs"][0].update(shape=["batch", 1, 16, 16]), "outputs[0].shape"),
    ],
)
def test_bad_contracts_name_the_field(mutate, field):
    d = json.loads(conditional_contract().to_json())
    mutate(d)
    with pytest.raises(ContractError) as e:
        SamplingContract.from_dict(d)
    assert f"'{field}'" in str(e.value) and "\n" not in str(e.value)


def test_newer_schema_says_to_upgrade():
    d = json.loads(conditional_contract().to_json())
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ContractError, match="newer"):
        SamplingContract.from_dict(d)


def test_not_json_is_a_contract_error():
    with pytest.raises(ContractError, match="JSON"):
        SamplingContract.from_json("{not json")


def test_schema_2_contracts_as_main_wrote_them_still_load():
    """Schema 2 (before every run setting could be recommended): run_defaults had four keys."""
    data = json.loads(SamplingContract(image_size=8, channels=1, num_classes=2).to_json())
    data["schema_version"] = 2
    data["run_defaults"] = {"sampler": "ddim", "steps": 50, "eta": None, "guidance": 1.5}
    c = SamplingContract.from_dict(data)
    assert (c.run_defaults.sampler, c.run_defaults.steps, c.run_defaults.guidance) == ("ddim", 50, 1.5)
    assert c.run_defaults.guidance_interval is None and c.schema_version == SCHEMA_VERSION
    data["run_defaults"]["guidance_interval"] = [0, 10]  # a schema 2 file could not hold it
    with pytest.raises(ContractError, match="run_defaults.guidance_interval': unknown field"):
        SamplingContract.from_dict(data)
