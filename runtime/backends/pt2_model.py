"""The ``.pt2`` backend (AOTInductor package from ``ddpm-export --format pt2``); torch is imported only when one is
loaded."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import zipfile
from pathlib import Path

from runtime.backends.backend import Backend, BackendKind, LoadOptions
from runtime.backends.precision import Precision
from runtime.backends.torch_backend import TorchBackend, require_torch, torch_providers
from runtime.errors import ContractError, ModelError, reason
from runtime.metadata import CONTRACT_FILE, SamplingContract

TARGET_FILE = "ddpm_pt2.json"  # extra file: {"device": "cpu"|"cuda", "precision": "fp32"|"bf16"|"fp16", ...}
DECODER = "decoder"  # a latent model's decoder: the package's second AOTInductor model (the denoiser is "model")


def is_pt2(path: str | os.PathLike) -> bool:
    """A PT2 archive is a zip with an ``archive_format`` entry (TorchScript archives have none)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "archive_format" or n.endswith("/archive_format") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class Pt2Model(TorchBackend):
    """``predict_eps(x, t, y=None) -> ε`` through an AOTInductor-compiled package on the device it was built for."""

    def __init__(self, path: str | os.PathLike, device: str | None = None) -> None:
        torch = require_torch()
        from torch.export.pt2_archive._package import load_pt2

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file {path} does not exist")
        contract_json, target = _extra_files(self.path)
        try:
            self.contract = SamplingContract.from_json(contract_json)
        except ContractError as e:
            raise ModelError(f"{path}: {e}") from None
        self.device, self.precision = target.get("device"), target.get("precision")
        if self.device not in ("cpu", "cuda"):
            raise ModelError(f"{path}: unknown compile target {target!r} in {TARGET_FILE}")
        if device not in (None, self.device):
            raise ModelError(f"{path} was compiled for {self.device}; it cannot run on {device}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"{path} was compiled for cuda; torch sees no CUDA device here")
        quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on every CPU load
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            runners = load_pt2(io.BytesIO(self.path.read_bytes())).aoti_runners  # any file name
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot load {path} as a .pt2 package: {reason(e)}") from None
        finally:
            quiet.setLevel(level)
        self.runner = runners["model"]
        if self.contract.decoder is not None:
            if DECODER not in runners:
                raise ModelError(f"{path}: its contract has a decoder stage, but the package holds no "
                                 f"'{DECODER}' model")
            self.decoder = functools.partial(self._chunked, runners[DECODER])
        self.provider = f"pt2:{self.device}:{self.precision}"
        self.max_batch, self.torch = int(target.get("max_batch", 65536)), torch

    def net(self, x, t, y=None):
        """The compiled network on torch tensors of its device."""
        return self._chunked(self.runner, x, t) if y is None else self._chunked(self.runner, x, t, y)

    def _chunked(self, runner, *args):
        """``runner(*args)``; a batch above the package's range (``max_batch`` in its target: a network whose code
        branches on the batch size compiles for a bounded range) runs in even chunks."""
        b = args[0].shape[0]
        if b <= self.max_batch:
            return runner(*args)
        size = -(-b // -(-b // self.max_batch))  # the fewest chunks, as even as they come
        return self.torch.cat([runner(*(a[i:i + size] for a in args)) for i in range(0, b, size)])


def _extra_files(path: Path) -> tuple[str, dict]:
    """The contract JSON and the compile target of a package, read without loading its compiled code."""
    try:
        with zipfile.ZipFile(path) as z:
            found = {n.rsplit("/", 1)[-1]: n for n in z.namelist() if "/extra/" in f"/{n}"}
            if CONTRACT_FILE not in found or TARGET_FILE not in found:
                raise ModelError(f"{path} carries no sampling contract ({CONTRACT_FILE}); export it with ddpm-export")
            return z.read(found[CONTRACT_FILE]).decode(), json.loads(z.read(found[TARGET_FILE]))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"cannot load {path} as a .pt2 package: {reason(e)}") from None


def _load(path: Path, provider: str, dtype: Precision | None, o: LoadOptions) -> Backend:
    return Pt2Model(path, None if provider == "auto" else provider)  # a package runs where it was compiled for


KIND = BackendKind(
    name="pt2", format="pt2", suffix=".pt2", recognise=is_pt2, providers=torch_providers("pt2"),
    auto=("cuda", "cpu"), precisions=("fp32", "bf16", "fp16"), writes=("fp32", "bf16", "fp16"), verify=("auto",),
    host="auto", load=_load)
