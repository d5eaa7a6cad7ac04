"""Tiny ONNX noise predictors with the exported U-Net's interface, built from numpy and ``onnx`` alone (no torch).

The model is one 3×3 convolution plus learned per-timestep (and per-class) offsets::

    h   = Conv(x, W[C, C, 3, 3], b[C], pads=1) + Reshape(Gather(emb_t[T, C], t), [-1, C, 1, 1])
          (+ Reshape(Gather(emb_y[K + 1, C], y), [-1, C, 1, 1]) for class-conditional models)
    eps = Tanh(h)

Inputs: ``x`` float32 [batch, C, H, W], ``t`` int64 [batch] in 0 … T−1 and, when ``num_classes`` K > 0, ``y``
int64 [batch] in 0 … K (K is the null class). Output: ``eps`` float32 [batch, C, H, W], values O(0.1–1) that
depend on x, t and y. The sampling contract (linear schedule, T = ``timesteps``) rides in the metadata like an
exported model's. Each row of the batch is computed independently of the others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.metadata import CONTRACT_KEY, Provenance, SamplingContract, ScheduleSpec


def make_toy_predictor(path, *, channels: int = 1, image_size: int = 8, num_classes: int = 0, timesteps: int = 100,
                       seed: int = 0, class_names: list[str] | None = None, prediction: str = "epsilon") -> Path:
    """Build, check and save a toy noise predictor at ``path``; returns ``Path(path)``. ``prediction`` is what the
    contract says the output is (ε, v or x̂₀): the graph is the same, the samplers read it differently."""
    rng = np.random.default_rng(seed)
    C, S = channels, image_size
    conditional = num_classes > 0

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(array, name)

    # Conv output std ≈ 0.6 for unit-variance x; embeddings add offsets of the same order.
    initializers = [
        init("W", (rng.standard_normal((C, C, 3, 3)) * 0.6 / np.sqrt(9 * C)).astype(np.float32)),
        init("b", (rng.standard_normal(C) * 0.1).astype(np.float32)),
        init("emb_t", (rng.standard_normal((timesteps, C)) * 0.5).astype(np.float32)),
        init("shape_c11", np.array([-1, C, 1, 1], dtype=np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Gather", ["emb_t", "t"], ["t_vec"], axis=0),
        helper.make_node("Reshape", ["t_vec", "shape_c11"], ["t_map"]),
        helper.make_node("Add", ["conv", "t_map"], ["h_t"]),
    ]
    h = "h_t"
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, S, S]),
        helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
    ]
    if conditional:
        initializers.append(init("emb_y", (rng.standard_normal((num_classes + 1, C)) * 0.5).astype(np.float32)))
        nodes += [
            helper.make_node("Gather", ["emb_y", "y"], ["y_vec"], axis=0),
            helper.make_node("Reshape", ["y_vec", "shape_c11"], ["y_map"]),
            helper.make_node("Add", ["h_t", "y_map"], ["h_ty"]),
        ]
        h = "h_ty"
        inputs.append(helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"]))
    nodes.append(helper.make_node("Tanh", [h], ["eps"]))
    outputs = [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", C, S, S])]

    graph = helper.make_graph(nodes, "toy_noise_predictor", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tests.toy_onnx")
    model.ir_version = 10
    contract = SamplingContract(
        image_size=S, channels=C,
        schedule=ScheduleSpec("linear", timesteps, {"beta_start": 1e-4, "beta_end": 0.02}),
        num_classes=num_classes, class_names=list(class_names or []), provenance=Provenance(dataset="toy"),
        prediction=prediction,
    )
    helper.set_model_props(model, {CONTRACT_KEY: contract.to_json()})
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return Path(path)
