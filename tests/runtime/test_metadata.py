"""The sampling contract: JSON round trip and strict reading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from runtime.metadata import SCHEMA_VERSION, ContractError, Provenance, SamplingContract, ScheduleSpec


def as_schema(d: dict, version: int) -> dict:
    """A current contract's dict laid out as schema ``version`` (< 6) wrote it: the denoiser's inputs and outputs at
    the top, no stages (the fields other schemas lacked are the caller's to remove)."""
    stage = d.pop("stages")[0]
    d.update(schema_version=version, inputs=stage["inputs"], outputs=stage["outputs"])
    return d

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
        (lambda d: d["schedule"].update(name="laplace"), "schedule.name"),
        (lambda d: d["schedule"].update(name="sigmoid"), "schedule.params"),  # sigmoid takes beta_start, beta_end
        (lambda d: d["schedule"].update(betas=[0.1] * 1000), "schedule.betas"),  # only explicit lists them
        (lambda d: d["schedule"].update(name="explicit", params={}), "schedule.betas"),  # it needs them
        (lambda d: d["schedule"].update(name="explicit", params={}, betas=[0.1] * 999), "schedule.betas"),
        (lambda d: d["schedule"].update(name="explicit", params={}, betas=[0.1] * 999 + [1.0]), "schedule.betas"),
        (lambda d: d.update(null_class=2), "null_class"),  # a class cannot be the null label
        (lambda d: d.update(null_class=5), "null_class"),  # the label after the classes or none
        (lambda d: d.update(null_class="3"), "null_class"),
        (lambda d: d.update(prediction="v"), "prediction"),
        (lambda d: d.update(channels=4), "channels"),
        (lambda d: d.update(pixel_range=[0, 1]), "pixel_range"),
        (lambda d: d.update(class_names=["a"]), "class_names"),
        (lambda d: d["stages"][0]["inputs"][0].update(dtype="float64"), "stages[0].inputs[0].dtype"),
        (lambda d: d["stages"][0]["inputs"].pop(), "stages[0].inputs"),
        (lambda d: d["stages"][0].update(file="den.onnx"), "stages[0].file"),
        (lambda d: d["stages"].append(d["stages"][0]), "stages"),
        (lambda d: d.update(stages=[]), "stages"),
        (lambda d: d["provenance"].update(training_steps=-1), "provenance.training_steps"),
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "schema_version"),
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d["schedule"]["params"].update(beta_start=-0.1), "schedule.params"),
        (lambda d: d["schedule"]["params"].update(beta_end=1.0), "schedule.params"),
        (lambda d: d["schedule"].update(timesteps=10**12), "schedule.timesteps"),
        (lambda d: d["stages"][0]["inputs"][0].update(shape=["batch", 3, 32, 32]), "stages[0].inputs[0].shape"),
        (lambda d: d["stages"][0]["outputs"][0].update(shape=["batch", 1, 16, 16]), "stages[0].outputs[0].shape"),
        (lambda d: d["stages"][0].update(prediction_channels=2), "stages[0].prediction_channels"),
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
    as_schema(data, 2)
    data["run_defaults"] = {"sampler": "ddim", "steps": 50, "eta": None, "guidance": 1.5}
    c = SamplingContract.from_dict(data)
    assert (c.run_defaults.sampler, c.run_defaults.steps, c.run_defaults.guidance) == ("ddim", 50, 1.5)
    assert c.run_defaults.guidance_interval is None and c.schema_version == SCHEMA_VERSION
    data["run_defaults"]["guidance_interval"] = [0, 10]  # a schema 2 file could not hold it
    with pytest.raises(ContractError, match="run_defaults.guidance_interval': unknown field"):
        SamplingContract.from_dict(data)


DATA = Path(__file__).resolve().parent.parent / "data" / "schema3"


def test_schema_3_files_made_by_the_previous_main_load_and_sample_as_before(tmp_path):
    """tests/data/schema3/*.onnx were written by main before schema 4 (commit ad46dbd, tests.toy_onnx and
    ddpm_export.run_defaults); they read as ε-predictors with the null class after the classes, keep their
    recommendations, and sample exactly what the same toy model written today samples."""
    import runtime
    from tests.toy_onnx import make_toy_predictor

    old = runtime.load(DATA / "toy-cond.onnx", "cpu")
    c = old.contract
    assert (c.prediction, c.num_classes, c.null_class, c.schema_version) == ("epsilon", 3, 3, SCHEMA_VERSION)
    assert c.schedule.betas is None and c.provenance.source is None
    rd = c.run_defaults
    assert ((rd.sampler, rd.steps, rd.guidance, rd.guidance_interval, rd.clip_denoised)
            == ("ddim", 10, 1.5, (0, 30), True))
    assert rd.spacing is None and rd.clip_range is None and rd.steps_offset is None
    new = runtime.load(make_toy_predictor(tmp_path / "cond.onnx", num_classes=3, timesteps=50,
                                          class_names=["a", "b", "c"]), "cpu")
    settings = dict(sampler="ddim", steps=10, guidance=1.5, guidance_interval=(0, 30), clip_denoised=True)
    assert np.array_equal(old.generate(3, seed=4, classes=[0, 1, 2]),
                          new.generate(3, seed=4, classes=[0, 1, 2], **settings))
    uncond = runtime.load(DATA / "toy-uncond.onnx", "cpu")
    assert uncond.contract.null_class is None and not uncond.contract.guidable
    fresh = runtime.load(make_toy_predictor(tmp_path / "u.onnx", channels=3, timesteps=50), "cpu")
    assert np.array_equal(uncond.generate(2, seed=1), fresh.generate(2, seed=1))


def test_a_schema_4_contract_loads_without_what_schema_5_added():
    """Files written before tuned timesteps and the timesteps setting: their run_defaults lack "timesteps", the
    contract lacks tuned_timesteps and tuning; they load with none, and a key schema 4 never had is still refused."""
    from runtime.metadata import RunDefaults

    current = SamplingContract(image_size=8, channels=1, num_classes=2,
                               run_defaults=RunDefaults(sampler="ddim", steps=20, spacing="trailing"))
    d = json.loads(current.to_json())
    as_schema(d, 4)
    del d["tuned_timesteps"], d["tuning"], d["run_defaults"]["timesteps"]
    c = SamplingContract.from_dict(d)
    assert c.tuned_timesteps == {} and c.tuning is None and c.run_defaults.timesteps is None
    assert c.run_defaults.spacing == "trailing" and c.schema_version == SCHEMA_VERSION
    d["run_defaults"]["timesteps"] = [999, 0]
    with pytest.raises(ContractError, match="run_defaults.timesteps': unknown field \\(in a schema 4 contract\\)"):
        SamplingContract.from_dict(d)


def test_tuned_timesteps_are_validated():
    good = SamplingContract(image_size=8, channels=1, tuned_timesteps={"3": [999, 500, 20]})
    assert SamplingContract.from_json(good.to_json()).tuned_timesteps == {"3": [999, 500, 20]}
    for bad, message in (({"3": [999, 500]}, "tuned_timesteps.3"), ({"2": [5, 50]}, "tuned_timesteps.2"),
                         ({"2": [1000, 5]}, "tuned_timesteps.2"), ({"x": [5]}, "step counts as keys")):
        with pytest.raises(ContractError, match=message):
            SamplingContract(image_size=8, channels=1, tuned_timesteps=bad)


def latent_contract(**decoder) -> SamplingContract:
    from runtime.metadata import latent_stages

    stages = latent_stages(4, 8, channels=3, image_size=32, num_classes=10, out_channels=8, scaling_factor=0.18215)
    stages[1] = dataclasses.replace(stages[1], file="m.decoder.onnx", sha256="ab" * 32, **decoder)
    return SamplingContract(image_size=32, channels=3, num_classes=10, stages=stages)


def test_a_latent_contract_separates_the_latent_from_the_image():
    c = latent_contract()
    assert (c.latent_shape, c.prediction_channels, c.channels, c.image_size) == ((4, 8, 8), 4, 3, 32)
    assert c.decoder.scaling_factor == 0.18215 and c.decoder.pixel_range == (-1.0, 1.0)
    assert SamplingContract.from_json(c.to_json()) == c
    pixel = SamplingContract(image_size=8, channels=1)
    assert pixel.decoder is None and pixel.latent_shape == (1, 8, 8) and pixel.prediction_channels is None


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["stages"][1].update(scaling_factor=0), "stages[1].scaling_factor"),
    (lambda d: d["stages"][1].update(shift=None), "stages[1].shift"),
    (lambda d: d["stages"][1].update(pixel_range=[0, 1]), "stages[1].pixel_range"),
    (lambda d: d["stages"][1].update(file="../m.onnx"), "stages[1].file"),
    (lambda d: d["stages"][1].update(sha256="xyz"), "stages[1].sha256"),
    (lambda d: d["stages"][1].update(sha256=None), "stages[1].sha256"),
    (lambda d: d["stages"][1]["inputs"][0].update(shape=["batch", 3, 8, 8]), "stages[1].inputs"),
    (lambda d: d["stages"][1]["outputs"][0].update(shape=["batch", 3, 16, 16]), "stages[1].outputs"),
    (lambda d: d["stages"][0].update(prediction_channels=None), "stages[0].outputs[0].shape"),
    (lambda d: d["stages"][0].update(scaling_factor=1.0), "stages[0]"),
    (lambda d: d["stages"][1].update(name="vae"), "stages"),
    (lambda d: d["stages"][1].pop("shift"), "stages[1].shift"),
])
def test_bad_stages_name_the_field(mutate, field):
    d = json.loads(latent_contract().to_json())
    mutate(d)
    with pytest.raises(ContractError) as e:
        SamplingContract.from_dict(d)
    assert f"'{field}'" in str(e.value) and "\n" not in str(e.value)


def test_a_schema_5_contract_reads_as_one_denoiser_on_the_image():
    cond = conditional_contract()
    c = SamplingContract.from_dict(as_schema(json.loads(cond.to_json()), 5))
    assert c == cond and [s.name for s in c.stages] == ["denoiser"] and c.decoder is None
    d = as_schema(json.loads(cond.to_json()), 5)
    del d["outputs"]
    with pytest.raises(ContractError, match="'outputs': missing"):
        SamplingContract.from_dict(d)
