"""The TorchScript backend (a ``ddpm-export`` .pt file): numpy in, numpy out; torch is imported only when one is
loaded."""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path

from runtime.backends.backend import Backend, BackendKind, LoadOptions
from runtime.backends.precision import Precision
from runtime.backends.pt2_model import is_pt2
from runtime.backends.torch_backend import TorchBackend, require_torch, torch_device, torch_providers
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
        if self.contract.decoder is not None:
            raise ModelError(f"{path}: a latent model (a decoder stage) in TorchScript, which ddpm-export never "
                             "writes; export it as ONNX or .pt2")
        self.provider, self.precision = f"torchscript:{device}", "fp32"

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


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (torch.jit.save) is a zip with ``*/constants.pkl`` and ``*/code/`` and, unlike a .pt2
    package, no ``archive_format`` entry."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names) and not is_pt2(path)


def _load(path: Path, provider: str, dtype: Precision | None, o: LoadOptions) -> Backend:
    return TorchScriptModel(path, torch_device(provider))


KIND = BackendKind(
    name="torchscript", format="torchscript", suffix=".pt", recognise=is_torchscript,
    providers=torch_providers("torchscript"), auto=("cuda", "cpu"), precisions=("fp32",), writes=("fp32",),
    verify=("cpu",), host="cpu", load=_load)
