"""U-Net → ONNX with a dynamic batch, the sampling contract in ``metadata_props``, and ``onnx.checker`` passing.

The exporter is chosen explicitly: ``torch.onnx.export(dynamo=True)`` first, the TorchScript-based exporter
(``dynamo=False``) if that fails; the one used is recorded in the contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import warnings

import onnx
import torch

from ddpm_export.errors import OnnxExportError
from runtime.errors import reason
from runtime.metadata import CONTRACT_KEY, SamplingContract
from training.eval_mode import eval_mode

DEFAULT_OPSET = 18  # at least runtime.backends.step_graph.MIN_OPSET
EXPORT_BATCH = 2  # example batch for export: > 1 so the batch dimension is not specialised to 1


def example_inputs(contract: SamplingContract, batch: int = EXPORT_BATCH) -> tuple[torch.Tensor, ...]:
    """(x float32 [B,C,H,W], t int64 [B][, y int64 [B]]) matching the contract's input specs."""
    g = torch.Generator().manual_seed(0)
    s, c = contract.image_size, contract.channels
    x = torch.randn(batch, c, s, s, generator=g)
    t = torch.randint(0, contract.schedule.timesteps, (batch,), generator=g)
    if contract.conditional:
        return x, t, torch.randint(0, contract.labels, (batch,), generator=g)
    return x, t


def export_onnx(net: torch.nn.Module, contract: SamplingContract, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX model of ``net`` (inputs x, t[, y]; output eps; dynamic batch) with ``contract`` embedded.

    ``net`` is exported in eval mode; its training mode is restored afterwards. Exporter chatter goes to stderr.
    """
    args = example_inputs(contract)
    names = [spec.name for spec in contract.inputs]
    errors = []
    with eval_mode(net):
        for exporter, fn in (("torch.onnx.export(dynamo=True)", _dynamo),
                             ("torch.onnx.export(dynamo=False)", _torchscript)):
            try:
                with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = fn(net, args, names, opset)
                break
            except Exception as e:  # noqa: BLE001 - any exporter failure means: try the next one
                errors.append(f"{exporter}: {reason(e)}")
        else:
            raise OnnxExportError("ONNX export failed with both exporters (" + "; ".join(errors) + ")")
    contract = dataclasses.replace(
        contract,
        provenance=dataclasses.replace(contract.provenance, exporter=exporter, exporter_version=torch.__version__),
    )
    embed_contract(model, contract)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"the exported model fails onnx.checker: {reason(e)}") from None
    return model


def embed_contract(model: onnx.ModelProto, contract: SamplingContract) -> None:
    """Write the contract into ``metadata_props`` and stamp the producer."""
    import ddpm_export

    props = {p.key: p.value for p in model.metadata_props}
    props[CONTRACT_KEY] = contract.to_json()
    onnx.helper.set_model_props(model, props)
    model.producer_name = "ddpm-toolkit"
    model.producer_version = ddpm_export.__version__


def _dynamo(net, args, names, opset) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        net, args, dynamo=True, opset_version=opset, input_names=names, output_names=["eps"],
        dynamic_shapes={name: {0: batch} for name in ("x", "t", "y")[: len(args)]}, verbose=False,
    )
    return program.model_proto


def _torchscript(net, args, names, opset) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        net, args, buffer, dynamo=False, opset_version=opset, input_names=names, output_names=["eps"],
        dynamic_axes={name: {0: "batch"} for name in [*names, "eps"]},
    )
    return onnx.load_from_string(buffer.getvalue())


def input_output_summary(model: onnx.ModelProto) -> dict[str, list]:
    """Names, element types and shapes (dimension names for dynamic dims) of the graph's inputs and outputs."""

    def describe(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                        "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
