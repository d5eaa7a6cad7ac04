"""U-Net → TorchScript by tracing (tracer warnings are errors), with the contract in the file's extra files."""

from __future__ import annotations

import linecache
import warnings
from pathlib import Path

import torch

from ddpm_export.errors import TorchScriptExportError
from ddpm_export.onnx_export import example_inputs
from runtime.errors import reason
from runtime.metadata import CONTRACT_FILE, SamplingContract
from training.eval_mode import eval_mode

EXPORTER = "torch.jit.trace"


def export_torchscript(net: torch.nn.Module, contract: SamplingContract, *,
                       strict: bool = True) -> tuple[torch.jit.ScriptModule, list[str]]:
    """A traced module with forward(x, t[, y]) -> the network's output, batch size free (``net``'s mode is restored),
    and the tracer warnings that remain ("file:line: message").

    A tracer warning means the trace may not generalise. One from a check that can only raise (an ``assert``, or an
    ``if`` whose body is a ``raise``: GroupNorm's batch-size check, diffusers' shape asserts) does not enter the
    computation and is dropped. The others fail the export when ``strict``; otherwise they are returned, for a
    caller that verifies the trace on other inputs (batch sizes, timesteps) before trusting it.
    """
    args = example_inputs(contract)
    with eval_mode(net), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        try:
            module = torch.jit.trace(net, args, strict=True, check_trace=True)
        except Exception as e:  # noqa: BLE001 - a trace failure
            raise TorchScriptExportError(f"tracing failed: {reason(e)}") from None
    risky = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and not _only_raises(w)]
    for w in caught:
        if not issubclass(w.category, torch.jit.TracerWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [f"{w.filename}:{w.lineno}: {reason(w.message)}" for w in risky]
    if notes and strict:
        raise TorchScriptExportError(f"tracing failed: {notes[0]} (a tracer warning, and no verification to check "
                                     "that the trace generalises)")
    return module, notes


def _only_raises(w: warnings.WarningMessage) -> bool:
    """Whether the warned-about line is an ``assert`` or an ``if`` whose next line raises."""
    line = linecache.getline(w.filename, w.lineno).strip()
    following = linecache.getline(w.filename, w.lineno + 1).strip()
    return line.startswith("assert ") or (line.startswith("if ") and following.startswith("raise"))


def save_torchscript(module: torch.jit.ScriptModule, contract: SamplingContract, path: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is the requested format; its deprecation notice is noise here
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        torch.jit.save(module, str(path), _extra_files={CONTRACT_FILE: contract.to_json()})

