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

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.files import sha256_file
from runtime.metadata import CONTRACT_KEY, STAGE_KEY, Provenance, SamplingContract, ScheduleSpec, latent_stages


def make_toy_predictor(path, *, channels: int = 1, image_size: int = 8, num_classes: int = 0, timesteps: int = 100,
                       seed: int = 0, class_names: list[str] | None = None, prediction: str = "epsilon",
                       out_channels: int | None = None, stages: list | None = None) -> Path:
    """Build, check and save a toy noise predictor at ``path``; returns ``Path(path)``. ``prediction`` is what the
    contract says the output is (ε, v or x̂₀): the graph is the same, the samplers read it differently.
    ``out_channels``: more output channels than input ones (a learned variance after ε); ``stages``: the contract's
    (``make_toy_latent``'s)."""
    rng = np.random.default_rng(seed)
    C, S = channels, image_size
    Co = out_channels or C
    conditional = num_classes > 0

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(array, name)

    # Conv output std ≈ 0.6 for unit-variance x; embeddings add offsets of the same order.
    initializers = [
        init("W", (rng.standard_normal((Co, C, 3, 3)) * 0.6 / np.sqrt(9 * C)).astype(np.float32)),
        init("b", (rng.standard_normal(Co) * 0.1).astype(np.float32)),
        init("emb_t", (rng.standard_normal((timesteps, Co)) * 0.5).astype(np.float32)),
        init("shape_c11", np.array([-1, Co, 1, 1], dtype=np.int64)),
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
        initializers.append(init("emb_y", (rng.standard_normal((num_classes + 1, Co)) * 0.5).astype(np.float32)))
        nodes += [
            helper.make_node("Gather", ["emb_y", "y"], ["y_vec"], axis=0),
            helper.make_node("Reshape", ["y_vec", "shape_c11"], ["y_map"]),
            helper.make_node("Add", ["h_t", "y_map"], ["h_ty"]),
        ]
        h = "h_ty"
        inputs.append(helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"]))
    nodes.append(helper.make_node("Tanh", [h], ["eps"]))
    outputs = [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", Co, S, S])]

    graph = helper.make_graph(nodes, "toy_noise_predictor", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tests.toy_onnx")
    model.ir_version = 10
    image = stages[1].outputs[0].shape[1:3] if stages else (C, S)
    contract = SamplingContract(
        image_size=image[1], channels=image[0],
        schedule=ScheduleSpec("linear", timesteps, {"beta_start": 1e-4, "beta_end": 0.02}),
        num_classes=num_classes, class_names=list(class_names or []), provenance=Provenance(dataset="toy"),
        prediction=prediction, stages=stages or [],
    )
    helper.set_model_props(model, {CONTRACT_KEY: contract.to_json()})
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return Path(path)


def make_toy_latent(path, *, latent_channels: int = 2, latent_size: int = 4, channels: int = 3, num_classes: int = 0,
                    timesteps: int = 100, seed: int = 0, learned_variance: bool = True, scaling_factor: float = 0.5,
                    shift: float = 0.25) -> Path:
    """A toy latent model: ``make_toy_predictor`` on (latent_channels, latent_size²) latents (with as many variance
    channels again after ε where ``learned_variance``) at ``path``, and its decoder beside it at
    ``<stem>.decoder.onnx``, bound by its sha256: ``image = Tanh(Conv3x3(Resize×2(z)))``, (channels, 2·latent_size²).
    Returns ``Path(path)``."""
    path = Path(path)
    rng = np.random.default_rng(seed + 1)
    C, s = latent_channels, latent_size
    decoder = path.with_name(path.stem + ".decoder.onnx")
    nodes = [
        helper.make_node("Resize", ["z", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Conv", ["up", "Wd", "bd"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["conv"], ["image"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array((rng.standard_normal((channels, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32), "Wd"),
        numpy_helper.from_array((rng.standard_normal(channels) * 0.1).astype(np.float32), "bd"),
    ]
    graph = helper.make_graph(nodes, "toy_decoder",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", C, s, s])],
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                             ["batch", channels, 2 * s, 2 * s])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tests.toy_onnx")
    model.ir_version = 10
    helper.set_model_props(model, {STAGE_KEY: "decoder"})
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(decoder))
    stages = latent_stages(C, s, channels=channels, image_size=2 * s, num_classes=num_classes,
                           out_channels=2 * C if learned_variance else C, scaling_factor=scaling_factor, shift=shift)
    stages[1] = dataclasses.replace(stages[1], file=decoder.name, sha256=sha256_file(decoder))
    return make_toy_predictor(path, channels=C, image_size=s, num_classes=num_classes, timesteps=timesteps,
                              seed=seed, out_channels=stages[0].outputs[0].shape[1], stages=stages)
