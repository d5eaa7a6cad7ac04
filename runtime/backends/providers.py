"""What a provider is (one ``--provider`` value of a backend, and the device its arrays live on), and whether this
machine shows a GPU."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Provider:
    """One way a backend runs a model: ``name`` is what ``--provider`` and ``runtime.load(provider=...)`` say,
    ``full_name`` what the backend reports (e.g. onnxruntime's ``CPUExecutionProvider``), ``device`` where the
    backend's arrays live ("cpu" or "cuda": how data moves). ``after`` names a provider of the same backend that must
    have started for this one to be tried (TensorRT needs CUDA); ``strict`` are the options under which export checks
    each call in strict fp32 arithmetic (CUDA: no TF32); ``takes``: the options of its own a command line may set
    (``--cudnn-algo-search``)."""

    name: str
    full_name: str
    device: str = "cpu"
    after: str | None = None
    strict: dict = field(default_factory=dict)
    takes: tuple[str, ...] = ()

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU: its device nodes on Linux, ``nvidia-smi`` on the PATH elsewhere.

    Cheap and torch-free; it decides only whether a GPU provider that did not start is worth mentioning.
    """
    if sys.platform.startswith("linux"):
        return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))  # dxg: WSL2
    return shutil.which("nvidia-smi") is not None
