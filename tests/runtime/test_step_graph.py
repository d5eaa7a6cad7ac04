"""The one-step ONNX graph equals the predictor plus the step formula computed in numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.backends.fused import StepSession
from runtime.backends.step_graph import build_step_graph
from runtime.metadata import CONTRACT_KEY, SamplingContract
from runtime.sampling.table import COLUMNS
from runtime.tolerances import TOLERANCES

CPU = ["CPUExecutionProvider"]
SAME = TOLERANCES["fp32-same-math"]
NUM_CLASSES = 3
SHAPE = (1, 8, 8)  # C, H, W
NO_CLIP = 3.4028234663852886e38
H = 2  # the graphs of these tests read two earlier d's
COEFS = [  # runtime.sampling.table.COLUMNS, then h1, h2: [x, eps, noise, d, d_from_x, d_from_eps, d_clip, h1, h2]
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
    [0.9, -0.3, 0.2, 0.0, 1.5, -2.0, 1.0, 0.0, 0.0],  # d_coef = 0: the clip term is unused
    [0.1, 0.4, 0.5, 0.7, 3.0, -2.5, 1.0, 0.0, 0.0],  # large d_from_*: d is clipped in many pixels
    [0.0, 0.0, 1.0, 1.0, -4.0, 4.0, 1.0, 0.0, 0.0],
    [0.8, 0.0, 0.0, 1.3, 2.0, -1.5, NO_CLIP, -0.4, 0.0],  # a 2M row: unclipped d and the one before
    [0.7, 0.0, 0.0, 1.6, 2.0, -1.5, NO_CLIP, -0.9, 0.3],  # a 3M row: two earlier d's
]


def tiny_predictor(num_classes: int = 0) -> onnx.ModelProto:
    """eps = tanh(a·x + b) + 0.001·t [+ 0.1·table[y]], dynamic batch "batch", opset 18, with a contract.

    Its internal values are named "coef", "z" and "w" on purpose: the step graph must rename them.
    """
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal(SHAPE).astype(np.float32), "coef"),  # a
        numpy_helper.from_array(rng.standard_normal(SHAPE).astype(np.float32), "b"),
        numpy_helper.from_array(np.float32(0.001), "t_scale"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "coef"], ["ax"]),
        helper.make_node("Add", ["ax", "b"], ["z"]),
        helper.make_node("Tanh", ["z"], ["w"]),
        helper.make_node("Cast", ["t"], ["t_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["t_f", "t_scale"], ["t_s"]),
        helper.make_node("Unsqueeze", ["t_s", "axes"], ["t_4d"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *SHAPE]),
              helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"])]
    if num_classes:
        inputs.append(helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"]))
        table = np.linspace(-1, 2, num_classes + 1).astype(np.float32)
        inits += [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.float32(0.1), "y_scale")]
        nodes += [
            helper.make_node("Gather", ["table", "y"], ["emb"]),
            helper.make_node("Mul", ["emb", "y_scale"], ["emb_s"]),
            helper.make_node("Unsqueeze", ["emb_s", "axes"], ["emb_4d"]),
            helper.make_node("Add", ["t_4d", "emb_4d"], ["cond"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["t_4d"], ["cond"]))
    nodes.append(helper.make_node("Add", ["w", "cond"], ["eps"]))
    graph = helper.make_graph(nodes, "tiny", inputs,
                              [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", *SHAPE])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    contract = SamplingContract(image_size=SHAPE[1], channels=SHAPE[0], num_classes=num_classes)
    helper.set_model_props(model, {CONTRACT_KEY: contract.to_json()})
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def uncond() -> onnx.ModelProto:
    return tiny_predictor()


@pytest.fixture(scope="module")
def cond() -> onnx.ModelProto:
    return tiny_predictor(NUM_CLASSES)


def inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_t": (2 * rng.standard_normal((batch, *SHAPE))).astype(np.float32),
        "t": rng.integers(0, 1000, batch).astype(np.int64),
        "z": rng.standard_normal((batch, *SHAPE)).astype(np.float32),
        "y": rng.integers(0, NUM_CLASSES, batch).astype(np.int64),
        "history": [rng.uniform(-1, 1, (batch, *SHAPE)).astype(np.float32) for _ in range(H)],
    }


def reference(model: onnx.ModelProto, x_t, t, z, history, coef, y=None, w=None, clip: bool = True):
    """The predictor in its own session, then the step formula in float32 numpy: (x_next, d)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=CPU)
    if w is None:
        feed = {"x": x_t, "t": t} | ({"y": y} if y is not None else {})
        eps = sess.run(None, feed)[0]
    else:
        null = np.full_like(y, NUM_CLASSES)
        eps2 = sess.run(None, {"x": np.concatenate([x_t, x_t]), "t": np.concatenate([t, t]),
                               "y": np.concatenate([y, null])})[0]
        eps_c, eps_u = eps2[: len(x_t)], eps2[len(x_t):]
        eps = eps_u + np.float32(w) * (eps_c - eps_u)
    a, b, c, d, p, q, bound, *r = np.asarray(coef, np.float32)
    x0 = p * x_t + q * eps
    x0 = np.clip(x0, -bound, bound) if clip else x0
    return a * x_t + b * eps + d * x0 + sum(rj * h for rj, h in zip(r, history)) + c * z, x0


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("conditional", [False, True])
def test_step_matches_reference(uncond, cond, batch, conditional):
    model = cond if conditional else uncond
    before = model.SerializeToString()
    session = StepSession(build_step_graph(model, history=H), CPU)
    assert model.SerializeToString() == before  # the input model is not mutated
    inp = inputs(batch)
    y = inp["y"] if conditional else None
    for coef in COEFS:
        coef = np.asarray(coef, np.float32)
        got, got_x0 = session.run(inp["x_t"], inp["t"], inp["z"], inp["history"], coef, y=y)
        want, want_x0 = reference(model, inp["x_t"], inp["t"], inp["z"], inp["history"], coef, y=y)
        assert got.shape == got_x0.shape == (batch, *SHAPE) and got.dtype == got_x0.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=SAME.atol, rtol=SAME.rtol)
        np.testing.assert_allclose(got_x0, want_x0, atol=SAME.atol, rtol=SAME.rtol)
        if coef[3] != 0 and coef[6] == 1:  # clipping matters for these coefficients
            unclipped, _ = reference(model, inp["x_t"], inp["t"], inp["z"], inp["history"], coef, y=y, clip=False)
            assert np.abs(got - unclipped).max() > 0.1
        for j in range(H):
            if coef[len(COLUMNS) + j] != 0:  # the earlier d's matter
                zeroed = [np.zeros_like(h) if k == j else h for k, h in enumerate(inp["history"])]
                other, _ = session.run(inp["x_t"], inp["t"], inp["z"], zeroed, coef, y=y)
                assert np.abs(got - other).max() > 0.1


@pytest.mark.parametrize("batch", [1, 5])
def test_guided_step_matches_reference(cond, batch):
    session = StepSession(build_step_graph(cond, null_class=NUM_CLASSES, history=H), CPU)
    assert session.guided and session.conditional
    inp = inputs(batch, seed=2)
    for coef in COEFS:
        got, _ = session.run(inp["x_t"], inp["t"], inp["z"], inp["history"], coef, y=inp["y"], w=3.0)
        want, _ = reference(cond, inp["x_t"], inp["t"], inp["z"], inp["history"], coef, y=inp["y"], w=3.0)
        np.testing.assert_allclose(got, want, atol=SAME.atol, rtol=SAME.rtol)
    # w = 1 is the plain conditional prediction
    plain = StepSession(build_step_graph(cond, history=H), CPU)
    args = (inp["x_t"], inp["t"], inp["z"], inp["history"], COEFS[2])
    np.testing.assert_allclose(session.run(*args, y=inp["y"], w=1.0)[0], plain.run(*args, y=inp["y"])[0],
                               atol=SAME.atol, rtol=SAME.rtol)


def test_guided_needs_labels(uncond):
    with pytest.raises(ValueError, match="class-conditional"):
        build_step_graph(uncond, null_class=0)


def test_run_checks_inputs(cond):
    session = StepSession(build_step_graph(cond, history=H), CPU)
    inp = inputs(2)
    x0 = inp["history"]
    with pytest.raises(TypeError, match="x_t"):
        session.run(inp["x_t"].astype(np.float64), inp["t"], inp["z"], x0, COEFS[1], y=inp["y"])
    with pytest.raises(TypeError, match="'t'"):
        session.run(inp["x_t"], inp["t"].astype(np.int32), inp["z"], x0, COEFS[1], y=inp["y"])
    with pytest.raises(TypeError, match="'h2'"):
        session.run(inp["x_t"], inp["t"], inp["z"], [x0[0], x0[1].astype(np.float64)], COEFS[1], y=inp["y"])
    with pytest.raises(ValueError, match="takes 9 coefficients, got 7"):
        session.run(inp["x_t"], inp["t"], inp["z"], x0, COEFS[1][:7], y=inp["y"])
    with pytest.raises(ValueError, match=r"takes inputs \['x_t', 't', 'y', 'z', 'h1', 'h2', 'coef'\]"):
        session.run(inp["x_t"], inp["t"], inp["z"], x0, COEFS[1])  # no labels
    with pytest.raises(ValueError, match="takes inputs"):
        session.run(inp["x_t"], inp["t"], inp["z"], x0, COEFS[1], y=inp["y"], w=2.0)  # not a guided graph


@pytest.mark.parametrize("guided", [False, True])
def test_iobinding_matches_run_and_chains(cond, guided):
    step = build_step_graph(cond, null_class=NUM_CLASSES if guided else None, history=H)
    session = StepSession(step.SerializeToString(), CPU)
    inp = inputs(5, seed=3)
    w = 2.5 if guided else None
    coefs = [np.asarray(c, np.float32) for c in COEFS[1:]]
    zs = [np.random.default_rng(10 + i).standard_normal(inp["x_t"].shape).astype(np.float32) for i in range(3)]

    x_host, x_dev = inp["x_t"], ort.OrtValue.ortvalue_from_numpy(inp["x_t"])
    h_host = [np.zeros_like(x_host)] * H
    h_dev = [ort.OrtValue.ortvalue_from_numpy(h) for h in h_host]
    for i, (coef, z) in enumerate(zip(coefs, zs)):  # the history shifts as the engine shifts it
        x_host, d_host = session.run(x_host, inp["t"] - i, z, h_host, coef, y=inp["y"], w=w)
        z_arg = ort.OrtValue.ortvalue_from_numpy(z) if i % 2 else z  # z as numpy or OrtValue
        x_dev, d_dev = session.run_iobinding(x_dev, inp["t"] - i, z_arg, h_dev, coef, y=inp["y"], w=w)
        assert isinstance(x_dev, ort.OrtValue) and x_dev.device_name().lower() == "cpu"
        np.testing.assert_array_equal(x_dev.numpy(), x_host)  # the same session on the same device
        np.testing.assert_array_equal(d_dev.numpy(), d_host)
        h_host, h_dev = [d_host, *h_host[:-1]], [d_dev, *h_dev[:-1]]
    with pytest.raises(TypeError, match="x_t"):
        session.run_iobinding(ort.OrtValue.ortvalue_from_numpy(inp["x_t"].astype(np.float64)), inp["t"], zs[0],
                              h_dev, coefs[0], y=inp["y"], w=w)


@pytest.mark.parametrize("kind", ["uncond", "cond", "guided"])
def test_step_model_structure(uncond, cond, kind):
    model = uncond if kind == "uncond" else cond
    step = build_step_graph(model, null_class=NUM_CLASSES if kind == "guided" else None, history=H)
    onnx.checker.check_model(step, full_check=True)
    props = {p.key: p.value for p in step.metadata_props}
    assert props[CONTRACT_KEY] == SamplingContract.from_json(props[CONTRACT_KEY]).to_json()
    assert props[CONTRACT_KEY] == {p.key: p.value for p in model.metadata_props}[CONTRACT_KEY]
    want = {"uncond": ["x_t", "t", "z", "h1", "h2", "coef"], "cond": ["x_t", "t", "y", "z", "h1", "h2", "coef"],
            "guided": ["x_t", "t", "y", "z", "h1", "h2", "coef", "w"]}[kind]
    assert [i.name for i in step.graph.input] == want
    assert [o.name for o in step.graph.output] == ["x_next", "d"]
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in [*step.graph.input, *step.graph.output]}
    assert dims["x_t"] == dims["z"] == dims["h1"] == dims["h2"] == dims["x_next"] == dims["d"] == ["batch", *SHAPE]
    assert dims["t"] == ["batch"] and dims["coef"] == [len(COLUMNS) + H]
    if kind == "guided":  # internal values have batch 2B: they must not claim the input's "batch" size
        assert {vi.name for vi in step.graph.value_info} >= {"step_model_x", "step_model_eps"}
        assert all(d.dim_param != "batch" for vi in step.graph.value_info for d in vi.type.tensor_type.shape.dim)
    new = [n for n in step.graph.node if n.name not in {m.name for m in model.graph.node}]
    assert new and all(n.name.startswith("step_") for n in new)
    session = StepSession(step, CPU)
    assert [i.name for i in session.session.get_inputs()] == want
    assert [o.name for o in session.session.get_outputs()] == ["x_next", "d"]


def test_a_graph_without_history_takes_none_and_returns_x_only(cond):
    """DDPM and DDIM (H = 0): no h inputs, no d output; the step as the reference computes it."""
    step = build_step_graph(cond)
    assert [i.name for i in step.graph.input] == ["x_t", "t", "y", "z", "coef"]
    assert [o.name for o in step.graph.output] == ["x_next"]
    session = StepSession(step, CPU)
    inp = inputs(3, seed=4)
    for coef in COEFS[:4]:
        got, d = session.run(inp["x_t"], inp["t"], inp["z"], [], coef[:len(COLUMNS)], y=inp["y"])
        want, _ = reference(cond, inp["x_t"], inp["t"], inp["z"], [], coef[:len(COLUMNS)], y=inp["y"])
        assert d is None
        np.testing.assert_allclose(got, want, atol=SAME.atol, rtol=SAME.rtol)
