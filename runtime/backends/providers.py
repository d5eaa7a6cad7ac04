"""The one table of onnxruntime execution providers: short names, full names, and the order ``auto`` tries."""

from __future__ import annotations

import os
import shutil
import sys

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
CHOICES = ("auto", *PROVIDER_NAMES)  # what --provider and runtime.load(provider=...) accept
AUTO_ORDER = ("tensorrt", "cuda", "cpu")  # auto: the first that starts wins
GPU_PROVIDERS = ("cuda", "tensorrt")


def full_name(provider: str) -> str:
    """``cpu`` → ``CPUExecutionProvider``; a full onnxruntime name is returned as it is."""
    return PROVIDER_NAMES.get(provider, provider)


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU: its device nodes on Linux, ``nvidia-smi`` on the PATH elsewhere.

    Cheap and torch-free; it decides only whether a GPU provider that did not start is worth mentioning.
    """
    if sys.platform.startswith("linux"):
        return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))  # dxg: WSL2
    return shutil.which("nvidia-smi") is not None
