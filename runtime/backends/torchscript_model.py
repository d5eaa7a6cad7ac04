"""The TorchScript backend (a ``ddpm-export`` .pt file): numpy in, numpy out; torch is imported only when one is
loaded."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from runtime.backends.torch_backend import TorchBackend, require_torch
from runtime.errors import ContractError, ModelError, reason
from runtime.metadata import CONTRACT_FILE, SamplingContract


class TorchScriptModel(TorchBackend):
    """``predict_eps(x, t, y=None) -> ε`` through ``torch.jit.load`` on ``device``; ``contract`` as for ONNX."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        torch = require_torch()
        self.path, self.device = Path(path), device
        if not self.path.is_file():
            raise ModelError(f"model file {path} does not exist")
        extra = {CONTRACT_FILE: ""}
        try:
            with warnings.catch_warnings():  # the requested format; its deprecation notice is noise here
                warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
                self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra).eval()
        except Exception as e:  # noqa: BLE001
            raise ModelError(_load_failure(path, e)) from None
        if not extra[CONTRACT_FILE]:
            raise ModelError(f"{path} carries no sampling contract ({CONTRACT_FILE}); export it with ddpm-export")
        try:
            self.contract = SamplingContract.from_json(extra[CONTRACT_FILE])
        except ContractError as e:
            raise ModelError(f"{path}: {e}") from None
        self.provider = f"torchscript:{device}"

    def net(self, x, t, y=None):
        """The module on torch tensors of its device."""
        return self.module(x, t) if y is None else self.module(x, t, y)


def _load_failure(path, e: Exception) -> str:
    """One line for a TorchScript archive that ``torch.jit.load`` refused. Its unpickler resolves only TorchScript's
    own types: a Python global there (``posix.system``) means the archive holds pickled code, which it refuses."""
    found = re.search(r"Unknown type name '([\w.]+)'", str(e))
    if found and "." in found.group(1) and not found.group(1).startswith("__torch__."):
        return (f"refusing to load {path}: it looks like a TorchScript archive but holds pickled Python code "
                f"({found.group(1)}), which is never run")
    return f"cannot load {path} as TorchScript: {reason(e)}"
