"""A model whose contract disagrees with its graph, or with itself, is refused at load time in one line, before
anything is written (issue: contract validation gaps)."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

import runtime
from runtime.errors import ModelError
from runtime.generate_cli import main
from runtime.metadata import CONTRACT_KEY
from tests.toy_onnx import make_toy_predictor


def with_contract(src, dst, mutate) -> str:
    """A copy of ``src`` whose contract JSON is changed by ``mutate(dict)``."""
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    data = json.loads(props[CONTRACT_KEY])
    mutate(data)
    props[CONTRACT_KEY] = json.dumps(data)
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(dst))
    return str(dst)


def shape(name, dims):
    def mutate(d):
        for spec in d["stages"][0]["inputs"] + d["stages"][0]["outputs"]:
            if spec["name"] == name or (name == "*" and spec["name"] in ("x", "eps")):
                spec["shape"] = dims
    return mutate


CASES = [
    (lambda d: d["schedule"]["params"].update(beta_start=-0.001), "schedule.params"),
    (lambda d: d["schedule"]["params"].update(beta_end=1.0), "schedule.params"),
    (lambda d: d["schedule"].update(timesteps=10**12), "schedule.timesteps"),
    (lambda d: (d.update(image_size=8), shape("*", ["batch", 1, 8, 8])(d)), "image_size, channels or dtype disagree"),
    (lambda d: (d.update(channels=3), shape("*", ["batch", 3, 16, 16])(d)), "image_size, channels or dtype disagree"),
    (lambda d: d["stages"][0]["inputs"][1].update(dtype="float32"), "image_size, channels or dtype disagree"),
    (lambda d: d["stages"][0]["outputs"][0].update(name="noise"), "contract names outputs"),
]


@pytest.mark.parametrize("mutate, message", CASES)
def test_bad_contract_is_refused_before_anything_is_written(uncond_onnx, tmp_path, mutate, message):
    bad = with_contract(uncond_onnx, tmp_path / "bad.onnx", mutate)
    with pytest.raises(ModelError, match=message):
        runtime.load(bad, "cpu")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [bad, "-n", "2", "--steps", "2", "--out", str(out), "--provider", "cpu"])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_graph_input_names_that_disagree_with_the_contract(uncond_onnx, tmp_path):
    model = onnx.load(str(uncond_onnx))
    for node in model.graph.node:  # the graph takes "a" where the contract says "t"
        node.input[:] = ["a" if i == "t" else i for i in node.input]
    next(i for i in model.graph.input if i.name == "t").name = "a"
    onnx.save_model(model, str(tmp_path / "renamed.onnx"))
    with pytest.raises(ModelError, match=r"contract names inputs \['x', 't'\] but the graph has \['a', 'x'\]"):
        runtime.load(tmp_path / "renamed.onnx", "cpu")


@pytest.mark.parametrize("flag, value, message", [
    ("--guidance", "nan", "guidance must be a finite number"),
    ("--guidance", "inf", "guidance must be a finite number"),
    ("--eta", "2", "the update is undefined"),
    ("--eta", "nan", "eta must be a number between 0 and 1"),
])
def test_non_finite_and_out_of_range_settings_are_refused(cond_onnx, tmp_path, flag, value, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(cond_onnx), "-n", "2", "--sampler", "ddim", "--steps", "3", flag, value,
                                  "--out", str(out), "--provider", "cpu"])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert not (out / "run.json").exists()


def test_the_toy_model_itself_loads(tmp_path):
    assert runtime.load(make_toy_predictor(tmp_path / "ok.onnx", image_size=16), "cpu").contract.image_size == 16
