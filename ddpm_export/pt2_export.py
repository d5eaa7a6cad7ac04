"""U-Net → ``.pt2``: ``torch.export`` with a dynamic batch, compiled ahead of time by AOTInductor, packaged with the
contract (extra file ``ddpm_contract.json``) and the compile target (``ddpm_pt2.json``: device and precision).

Inductor's kernels are what makes ``torch.compile`` fast; compiling once here saves every later run that time.
Reduced precision (bf16/fp16) runs the U-Net under ``torch.autocast``; inputs and output stay float32, so the
interface is that of every other export. The compiled code is specific to the device type it was built for
(and, on the CPU, to the instruction set of the machine that built it).
"""

from __future__ import annotations

import inspect
import io
import json
import re
import warnings
from pathlib import Path
from typing import Literal

import torch

from ddpm_export.errors import ExportError
from ddpm_export.onnx_export import example_inputs
from runtime.backends.precision import Precision
from runtime.backends.pt2_model import DECODER, TARGET_FILE
from runtime.errors import reason
from runtime.metadata import CONTRACT_FILE, SamplingContract
from training.eval_mode import eval_mode

EXPORTER = "torch._inductor.aot_compile (AOTInductor)"
Device = Literal["cpu", "cuda"]
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the autocast dtype of each reduced precision
MAX_BATCH = 65536


class Autocast(torch.nn.Module):
    """``net`` under ``torch.autocast(device, dtype)``; float32 in, float32 out."""

    def __init__(self, net: torch.nn.Module, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.device, self.dtype = net, device, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(self.device, dtype=self.dtype):
            eps = self.net(x, t) if y is None else self.net(x, t, y)
        return eps.float()


def _export(module, args, names, max_batch: int):
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return torch.export.export(module, args, dynamic_shapes={n: {0: batch} for n in names})


def export_pt2(net: torch.nn.Module, contract: SamplingContract, path: str | Path, *, device: Device = "cpu",
               precision: Precision = "fp32", decoder: torch.nn.Module | None = None) -> None:
    """Compile ``net`` (x, t[, y] → its output, batch 1 … 65536, or the largest range its code allows: the runtime
    runs larger batches in chunks) for ``device`` at ``precision`` and write the package; a latent model's
    ``decoder`` (z → image) is compiled into the same package as its second model (``DECODER``), in fp32 whatever
    ``precision`` is (autoencoder decoders overflow in reduced precision: diffusers upcasts them too), with the
    same batch range.

    The modules are compiled in eval mode and left in their modes, on their devices. Raises ``ExportError`` (one
    line).
    """
    from torch.export.pt2_archive._package import package_pt2

    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: torch sees no CUDA device here")
    args = tuple(a.to(device) for a in example_inputs(contract))
    module = net if precision == "fp32" else Autocast(net, device, TORCH_DTYPES[precision])
    files, max_batch = _compile(net, module, args, device, MAX_BATCH)
    if decoder is not None:
        z = (torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1)).to(device),)
        decoder_files, max_batch = _compile(decoder, decoder, z, device, max_batch)
        files = {"model": files, DECODER: decoder_files}
    target = {"device": device, "precision": precision, "max_batch": max_batch, "torch_version": torch.__version__}
    buffer = io.BytesIO()  # package_pt2 wants a buffer or a name ending in .pt2; ``path`` may be a temporary name
    package_pt2(buffer, aoti_files=files,
                extra_files={CONTRACT_FILE: contract.to_json(), TARGET_FILE: json.dumps(target, sort_keys=True)})
    Path(path).write_bytes(buffer.getvalue())


def _compile(net: torch.nn.Module, module: torch.nn.Module, args: tuple, device: str, max_batch: int):
    """(AOTInductor's files for ``module`` (``net``, or ``net`` wrapped) on ``args``, batch dynamic up to
    ``max_batch`` or the largest range its code allows; that range)."""
    names = list(inspect.signature(module.forward).parameters)[:len(args)]
    original = next(net.parameters()).device
    net.to(device)
    try:
        with eval_mode(module), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program = _export(module, args, names, max_batch)
            except torch._dynamo.exc.UserError as e:  # the code branches on the batch size (diffusers' Upsample2D
                found = re.search(r"Dim\('batch', max=(\d+)\)", str(e))  # at 64): compile for the range it allows
                if found is None:
                    raise
                max_batch = int(found.group(1))
                program = _export(module, args, names, max_batch)
            files = torch._inductor.aot_compile(program.module(), args, options={"aot_inductor.package": True})
    except Exception as e:  # noqa: BLE001 - export or compile failure, reported in one line
        raise ExportError(f"pt2 export failed: {type(e).__name__}: {reason(e)}") from None
    finally:
        net.to(original)
    return files, max_batch
