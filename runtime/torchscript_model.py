"""The TorchScript backend (a ``ddpm-export`` .pt file): numpy in, numpy out; torch is imported only when one is loaded."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from runtime.errors import ContractError, ModelError
from runtime.metadata import CONTRACT_FILE, SamplingContract


def _torch():
    try:
        import torch
    except ImportError:
        raise ModelError("TorchScript models need torch: pip install 'ddpm-toolkit[train]' "
                         "(or use the .onnx export, which needs only onnxruntime)") from None
    return torch


class TorchScriptModel:
    """``predict_eps(x, t, y=None) -> ε`` through ``torch.jit.load`` on ``device``; ``contract`` as for ONNX."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        torch = _torch()
        self.path, self.device = Path(path), device
        if not self.path.is_file():
            raise ModelError(f"model file {path} does not exist")
        extra = {CONTRACT_FILE: ""}
        try:
            with warnings.catch_warnings():  # the requested format; its deprecation notice is noise here
                warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
                self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra).eval()
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot load {path} as TorchScript: {str(e).splitlines()[0]}") from None
        if not extra[CONTRACT_FILE]:
            raise ModelError(f"{path} carries no sampling contract ({CONTRACT_FILE}); export it with ddpm-export")
        try:
            self.contract = SamplingContract.from_json(extra[CONTRACT_FILE])
        except ContractError as e:
            raise ModelError(f"{path}: {e}") from None
        self.provider = f"torchscript:{device}"
        self.prefers_device_loop = device != "cpu"

    def net(self, x, t, y=None):
        """The module on torch tensors of its device."""
        return self.module(x, t) if y is None else self.module(x, t, y)

    def predict_eps(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """x: (B, C, H, W) float32, t: (B,) int64[, y: (B,) int64] -> ε (B, C, H, W) float32."""
        return call_torch(self.module, self.device, x, t, y)

    def device_loop(self, plan, y: np.ndarray | None):
        """The sampler loop on this module's device (``runtime.torch_loop``)."""
        from runtime.torch_loop import device_loop

        return device_loop(self.net, self.device, plan, y, self.contract.null_class)


def call_torch(module, device: str, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """``module(x, t[, y])`` for a torch module (eager or TorchScript) with numpy in and out, no grad."""
    torch = _torch()
    args = [torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.ascontiguousarray(t, np.int64))]
    if y is not None:
        args.append(torch.from_numpy(np.ascontiguousarray(y, np.int64)))
    with torch.inference_mode():
        return module(*[a.to(device) for a in args]).float().cpu().numpy()
