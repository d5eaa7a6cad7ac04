"""fp32 ONNX → fp16 for GPU execution with onnxruntime's converter, keeping sensitive operations in fp32."""

from __future__ import annotations

import onnx

# GroupNorm (exported as InstanceNormalization between reshapes), attention's softmax and the sinusoidal
# timestep embedding stay fp32; inputs and outputs stay float32 so the interface does not change.
FP32_OPS = ["InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"]


def timestep_embedding_nodes(model: onnx.ModelProto, t_input: str = "t") -> list[str]:
    """Names of the nodes from input ``t`` up to and including the Sin/Cos of the sinusoidal embedding.

    They must stay fp32: t·freq reaches ~1000, where fp16's spacing is 0.5 and sin/cos would be wrong.
    """
    reached, names = {t_input}, []
    for node in model.graph.node:  # exported graphs are topologically sorted
        if any(i in reached for i in node.input):
            names.append(node.name)
            if node.op_type not in ("Sin", "Cos"):
                reached.update(node.output)
    return names


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model`` (metadata kept); ``FP32_OPS`` and the timestep embedding stay fp32.

    The converter (onnxruntime 1.31) inserts one fp16→fp32 Cast per blocked consumer of a shared value,
    all with the same name and output, which leaves an invalid graph ("two nodes with same node name").
    Those copies are identical, so all but the first are dropped and the graph is re-sorted with
    onnxruntime's own ``OnnxModel.topological_sort``. The result passes ``onnx.checker`` (full check).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    fp16 = convert_float_to_float16(copy, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + FP32_OPS,
                                    node_block_list=timestep_embedding_nodes(model))
    seen, unique = set(), []
    for node in fp16.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            unique.append(node)
    del fp16.graph.node[:]
    fp16.graph.node.extend(unique)
    wrapped = OnnxModel(fp16)
    wrapped.topological_sort()
    # Some intermediate value_info entries keep a stale element type; they are optional annotations, so
    # drop them all and let the checker's full shape inference re-derive (and check) every type.
    del wrapped.model.graph.value_info[:]
    onnx.checker.check_model(wrapped.model, full_check=True)
    return wrapped.model
