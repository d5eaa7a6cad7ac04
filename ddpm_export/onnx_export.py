"""U-Net → ONNX with a dynamic batch, the sampling contract in ``metadata_props``, and ``onnx.checker`` passing.

The exporter is chosen explicitly: ``torch.onnx.export(dynamo=True)`` first, the TorchScript-based exporter
(``dynamo=False``) if that fails; the one used is recorded in the contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import sys
import warnings

import onnx
import torch

from ddpm_export.errors import OnnxExportError
from runtime.errors import reason
from runtime.metadata import CONTRACT_KEY, STAGE_KEY, SamplingContract
from training.eval_mode import eval_mode

DEFAULT_OPSET = 18  # at least runtime.backends.step_graph.MIN_OPSET
EXPORT_BATCH = 2  # example batch for export: > 1 so the batch dimension is not specialised to 1
ONNX_MAX_BYTES = 2**31 - 1  # protobuf's limit on one message: an ONNX file without external data


def example_inputs(contract: SamplingContract, batch: int = EXPORT_BATCH) -> tuple[torch.Tensor, ...]:
    """(x float32 [B,C,H,W], t int64 [B][, y int64 [B]]) matching the denoiser's input specs (x: the latent)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *contract.latent_shape, generator=g)
    t = torch.randint(0, contract.schedule.timesteps, (batch,), generator=g)
    if contract.conditional:
        return x, t, torch.randint(0, contract.labels, (batch,), generator=g)
    return x, t


def export_onnx(net: torch.nn.Module, contract: SamplingContract, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX model of ``net`` (inputs x, t[, y]; output eps; dynamic batch) with ``contract`` embedded.

    ``net`` is exported in eval mode; its training mode is restored afterwards. Exporter chatter goes to stderr.
    """
    model, exporter = _export(net, example_inputs(contract), [spec.name for spec in contract.inputs], "eps", opset)
    contract = dataclasses.replace(
        contract,
        provenance=dataclasses.replace(contract.provenance, exporter=exporter, exporter_version=torch.__version__),
    )
    embed_contract(model, contract)
    _check(model, "model")
    return model


def export_decoder_onnx(decoder: torch.nn.Module, contract: SamplingContract, *,
                        opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX model of a latent model's ``decoder`` (input z, the scaled latent; output image; dynamic batch),
    marked as a decoder stage (``STAGE_KEY``): its model file carries the contract."""
    import ddpm_export

    z = torch.randn(EXPORT_BATCH, *contract.latent_shape, generator=torch.Generator().manual_seed(1))
    model, exporter = _export(decoder, (z,), ["z"], "image", opset)
    onnx.helper.set_model_props(model, {STAGE_KEY: "decoder", "exporter": exporter})
    model.producer_name, model.producer_version = "ddpm-toolkit", ddpm_export.__version__
    _check(model, "decoder")
    return model


def _export(net, args: tuple, names: list[str], output: str, opset: int) -> tuple[onnx.ModelProto, str]:
    """(the ONNX model of ``net`` on ``args`` with inputs ``names`` and one ``output``, batch dynamic; the exporter
    that made it), ``net`` exported in eval mode and restored."""
    errors = []
    with eval_mode(net):
        for exporter, fn in (("torch.onnx.export(dynamo=True)", _dynamo),
                             ("torch.onnx.export(dynamo=False)", _torchscript)):
            try:
                with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return fn(net, args, names, output, opset), exporter
            except Exception as e:  # noqa: BLE001 - any exporter failure means: try the next one
                errors.append(f"{exporter}: {reason(e)}")
    raise OnnxExportError("ONNX export failed with both exporters (" + "; ".join(errors) + ")")


def _check(model: onnx.ModelProto, what: str) -> None:
    size = model.ByteSize()
    if size > ONNX_MAX_BYTES:
        raise OnnxExportError(f"the exported {what} is {size / 2**30:.1f} GiB, over ONNX's 2 GiB limit for one file "
                              "(a protobuf); export it with --format pt2")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"the exported {what} fails onnx.checker: {reason(e)}") from None


def embed_contract(model: onnx.ModelProto, contract: SamplingContract) -> None:
    """Write the contract into ``metadata_props`` and stamp the producer."""
    import ddpm_export

    props = {p.key: p.value for p in model.metadata_props}
    props[CONTRACT_KEY] = contract.to_json()
    onnx.helper.set_model_props(model, props)
    model.producer_name = "ddpm-toolkit"
    model.producer_version = ddpm_export.__version__


def _dynamo(net, args, names, output, opset) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=65536)
    parameters = list(inspect.signature(net.forward).parameters)[:len(args)]  # dynamic_shapes: by forward's names
    program = torch.onnx.export(
        net, args, dynamo=True, opset_version=opset, input_names=names, output_names=[output],
        dynamic_shapes={name: {0: batch} for name in parameters}, verbose=False,
    )
    return program.model_proto


def _torchscript(net, args, names, output, opset) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        net, args, buffer, dynamo=False, opset_version=opset, input_names=names, output_names=[output],
        dynamic_axes={name: {0: "batch"} for name in [*names, output]},
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
