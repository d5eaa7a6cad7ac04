"""The torch-free toy noise predictor (tests/toy_onnx.py): valid ONNX, the exported model's interface, and a
forward pass that depends on x, t and y row by row."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from runtime.metadata import CONTRACT_KEY, SamplingContract
from runtime.tolerances import TOLERANCES
from tests.toy_onnx import make_toy_predictor

SAME = TOLERANCES["fp32-same-math"]


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(params=[(1, 0), (3, 4)], ids=["uncond-gray", "cond-rgb"])
def toy(request, tmp_path):
    channels, num_classes = request.param
    names = [f"c{i}" for i in range(num_classes)]
    path = make_toy_predictor(tmp_path / "toy.onnx", channels=channels, image_size=8, num_classes=num_classes,
                              timesteps=50, seed=3, class_names=names)
    return path, channels, num_classes


def _feed(rng, batch, channels, num_classes, timesteps=50):
    feed = {"x": rng.standard_normal((batch, channels, 8, 8)).astype(np.float32),
            "t": rng.integers(0, timesteps, batch).astype(np.int64)}
    if num_classes:
        feed["y"] = rng.integers(0, num_classes + 1, batch).astype(np.int64)
    return feed


def test_checker_and_contract(toy):
    path, channels, num_classes = toy
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10 and model.opset_import[0].version == 18
    meta = {p.key: p.value for p in model.metadata_props}
    c = SamplingContract.from_json(meta[CONTRACT_KEY])
    assert (c.channels, c.image_size, c.num_classes, c.schedule.timesteps) == (channels, 8, num_classes, 50)
    assert c.provenance.dataset == "toy"


def test_interface(toy):
    path, channels, num_classes = toy
    s = _session(path)
    expected = [("x", "tensor(float)", ["batch", channels, 8, 8]), ("t", "tensor(int64)", ["batch"])]
    if num_classes:
        expected.append(("y", "tensor(int64)", ["batch"]))
    assert [(i.name, i.type, i.shape) for i in s.get_inputs()] == expected
    assert [(o.name, o.type, o.shape) for o in s.get_outputs()] == [("eps", "tensor(float)", ["batch", channels, 8, 8])]


@pytest.mark.parametrize("batch", [1, 5])
def test_output_shape_dtype_and_scale(toy, batch):
    path, channels, num_classes = toy
    (eps,) = _session(path).run(None, _feed(np.random.default_rng(0), batch, channels, num_classes))
    assert eps.shape == (batch, channels, 8, 8) and eps.dtype == np.float32
    assert np.isfinite(eps).all() and 0.05 < np.abs(eps).mean() < 1.0


def test_output_depends_on_x_t_and_y(toy):
    path, channels, num_classes = toy
    s = _session(path)
    feed = _feed(np.random.default_rng(1), 4, channels, num_classes)
    (base,) = s.run(None, feed)
    changes = {"x": feed["x"] + 0.5, "t": (feed["t"] + 7) % 50}
    if num_classes:
        changes["y"] = (feed["y"] + 1) % (num_classes + 1)
    for name, value in changes.items():
        (other,) = s.run(None, {**feed, name: value})
        assert np.abs(other - base).mean() > 0.05, f"eps barely depends on {name}"


def test_batch_rows_are_independent(toy):
    path, channels, num_classes = toy
    s = _session(path)
    feed = _feed(np.random.default_rng(2), 5, channels, num_classes)
    (batched,) = s.run(None, feed)
    rows = np.concatenate([s.run(None, {k: v[i:i + 1] for k, v in feed.items()})[0] for i in range(5)])
    np.testing.assert_allclose(batched, rows, rtol=SAME.rtol, atol=SAME.atol)


def test_same_seed_same_model_and_different_seed_different_weights(tmp_path):
    a = onnx.load(str(make_toy_predictor(tmp_path / "a.onnx", seed=0)))
    b = onnx.load(str(make_toy_predictor(tmp_path / "b.onnx", seed=0)))
    c = onnx.load(str(make_toy_predictor(tmp_path / "c.onnx", seed=1)))
    assert a.SerializeToString() == b.SerializeToString()
    assert a.graph.initializer[0].raw_data != c.graph.initializer[0].raw_data
