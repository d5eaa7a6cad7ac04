"""The ONNX format, whichever engine runs it (onnxruntime, OpenVINO): how a file is recognised, its contract (in
``metadata_props``) and the check that its graph takes and gives what the contract says."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.errors import ContractError, ModelError
from runtime.metadata import CONTRACT_KEY, STAGE_KEY, SamplingContract, Stage

ZIP_MAGIC = b"PK\x03\x04"


def is_onnx(path: Path) -> bool:
    """An ONNX file is a protobuf: anything that is not a zip archive (TorchScript, .pt2) is taken for one, and the
    engine that loads it says what is wrong with a file that is not."""
    with open(path, "rb") as f:
        return f.read(4) != ZIP_MAGIC


def contract_of(meta: dict[str, str], path) -> SamplingContract:
    """The contract in an ONNX file's metadata (``CONTRACT_KEY``), as the engine read it."""
    if STAGE_KEY in meta and CONTRACT_KEY not in meta:
        raise ModelError(f"{path} is the {meta[STAGE_KEY]} stage of a latent model, not a model: load the model file "
                         "it sits beside")
    if CONTRACT_KEY not in meta:
        raise ModelError(f"{path} carries no sampling contract ('{CONTRACT_KEY}' metadata); export it with ddpm-export")
    try:
        return SamplingContract.from_json(meta[CONTRACT_KEY])
    except ContractError as e:
        raise ModelError(f"{path}: {e}") from None


Port = tuple[str, str, Sequence[int | None]]  # (name, contract dtype: float32 | float16 | int64, dims: None if free)


def check_graph(stage: Stage, inputs: Sequence[Port], outputs: Sequence[Port], path) -> None:
    """Everything the contract claims about a stage's graph inputs and outputs (names, dtypes, fixed dimensions),
    given as the engine reads them."""
    for kind, specs, ports in (("inputs", stage.inputs, inputs), ("outputs", stage.outputs, outputs)):
        graph = {name: (dtype, dims) for name, dtype, dims in ports}
        if sorted(graph) != sorted(s.name for s in specs):
            raise ModelError(f"{path}: its contract names {kind} {[s.name for s in specs]} but the graph has "
                             f"{sorted(graph)}")
        for spec in specs:
            dtype, dims = graph[spec.name]
            fixed = [(want, got) for want, got in zip(spec.shape, dims)
                     if isinstance(want, int) and isinstance(got, int)]
            if dtype != spec.dtype or len(spec.shape) != len(dims) or any(w != g for w, g in fixed):
                raise ModelError(f"{path}: its contract says {spec.name} is {spec.dtype} {spec.shape} but the graph "
                                 f"takes {dtype} {list(dims)} (image_size, channels or dtype disagree)")


def feed(x: np.ndarray, t: np.ndarray, y: np.ndarray | None, names: Sequence[str], path) -> dict[str, np.ndarray]:
    """The graph's inputs for one call: x float32, t and y int64, contiguous; ``ValueError`` unless they are the
    graph's inputs ``names`` (y given exactly where the model is conditional)."""
    inputs = {"x": np.ascontiguousarray(x, dtype=np.float32), "t": np.ascontiguousarray(t, dtype=np.int64)}
    if y is not None:
        inputs["y"] = np.ascontiguousarray(y, dtype=np.int64)
    if set(inputs) != set(names):
        raise ValueError(f"{path} takes inputs {list(names)}, got {sorted(inputs)}")
    return inputs
