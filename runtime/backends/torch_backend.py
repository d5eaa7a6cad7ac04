"""What the torch backends (TorchScript, .pt2) share: importing torch on demand, numpy in and out, the device engine.

A subclass sets ``contract``, ``device``, ``net(x, t, y=None)`` (torch tensors on ``device``) and, for a latent model,
``decoder(z)``.
"""

from __future__ import annotations

import numpy as np

from runtime.backends.backend import predicted
from runtime.backends.providers import Provider
from runtime.errors import ModelError


def torch_providers(prefix: str) -> tuple[Provider, ...]:
    """A torch backend's providers: ``cpu`` and ``cuda`` (reported as ``PREFIX:cpu`` …)."""
    return Provider("cpu", f"{prefix}:cpu"), Provider("cuda", f"{prefix}:cuda", device="cuda")


def torch_device(provider: str) -> str:
    """The torch device for ``--provider``: cuda where asked for (or auto and available), else cpu."""
    if provider == "cpu":
        return "cpu"
    if require_torch().cuda.is_available():
        return "cuda"
    if provider != "auto":
        raise ModelError(f"provider {provider}: torch sees no CUDA device")
    return "cpu"


def require_torch():
    """``torch``, or a one-line ``ModelError`` saying how to get it."""
    try:
        import torch
    except ImportError:
        raise ModelError("TorchScript and .pt2 models need torch: pip install 'ddpm-toolkit[train]' "
                         "(or use the .onnx export, which needs only onnxruntime)") from None
    return torch


def call_torch(module, device: str, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """``module(x, t[, y])`` for a torch module (eager, TorchScript or compiled) with numpy in and out, no grad."""
    torch = require_torch()
    args = [torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.ascontiguousarray(t, np.int64))]
    if y is not None:
        args.append(torch.from_numpy(np.ascontiguousarray(y, np.int64)))
    with torch.inference_mode():
        return module(*[a.to(device) for a in args]).float().cpu().numpy()


class TorchBackend:
    """``predict_eps`` on host arrays and ``device_engine`` on the device, around the subclass's ``net``."""

    device: str
    decoder = None  # a latent model's decoder(z) on torch tensors of ``device``

    def net(self, x, t, y=None):
        raise NotImplementedError

    def prediction(self, x, t, y=None):
        """The network's prediction channels (``runtime.backends.backend.predicted``)."""
        return predicted(self.net(x, t, y), self.contract)

    @property
    def prefers_device_loop(self) -> bool:
        """On a GPU the loop stays on the device by default."""
        return self.device != "cpu"

    def predict_eps(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """x: (B, C, H, W) float32, t: (B,) int64[, y: (B,) int64] -> ε (B, C, H, W) float32."""
        return call_torch(self.prediction, self.device, x, t, y)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """The decoder stage on host arrays (``Backend.decode``)."""
        torch = require_torch()
        with torch.inference_mode():
            z = torch.from_numpy(np.ascontiguousarray(z, np.float32)).to(self.device)
            return self.decoder(z).float().cpu().numpy()

    def device_engine(self):
        """The batch engine on this backend's device (``runtime.backends.torch_loop``)."""
        from runtime.backends.torch_loop import device_engine

        return device_engine(self.prediction, self.device, self.contract, self.decoder)
