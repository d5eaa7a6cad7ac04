"""U-Net → TorchScript by tracing (tracer warnings are errors), with the contract in the file's extra files."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ddpm_export.errors import TorchScriptExportError
from ddpm_export.onnx_export import example_inputs
from runtime.metadata import CONTRACT_FILE, SamplingContract
from training.eval_mode import eval_mode

EXPORTER = "torch.jit.trace"


def export_torchscript(net: torch.nn.Module, contract: SamplingContract) -> torch.jit.ScriptModule:
    """A traced module with forward(x, t[, y]) -> eps, batch size free; ``net``'s mode is restored after."""
    args = example_inputs(contract)
    with eval_mode(net), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        try:
            return torch.jit.trace(net, args, strict=True, check_trace=True)
        except Exception as e:  # noqa: BLE001 - a tracer warning or a trace failure
            raise TorchScriptExportError(f"tracing failed: {str(e).splitlines()[0]}") from None


def save_torchscript(module: torch.jit.ScriptModule, contract: SamplingContract, path: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is the requested format; its deprecation notice is noise here
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        torch.jit.save(module, str(path), _extra_files={CONTRACT_FILE: contract.to_json()})

