"""The one table of onnxruntime execution providers: short names, full names, and the order ``auto`` tries."""

from __future__ import annotations

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
