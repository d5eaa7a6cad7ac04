"""What a backend is (``Backend``), and the one place that loads a model file into one and probes providers.

A backend is a thin adapter around an exported noise predictor: ``contract``, ``provider`` (what runs it),
``path``, ``predict_eps`` on host arrays and, where it can, ``fused_step`` (a device-resident step, see
``runtime.fused``). Samplers and batching never look past this protocol. onnxruntime (``runtime.onnx_model``) is
the base backend; TorchScript (``runtime.torchscript_model``) needs torch and is imported only for such a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.errors import ModelError
from runtime.metadata import SamplingContract
from runtime.providers import AUTO_ORDER, CHOICES, PROVIDER_NAMES


class Backend(Protocol):
    path: Path
    contract: SamplingContract
    provider: str  # e.g. "CPUExecutionProvider", "torchscript:cuda"
    prefers_fused: bool  # whether runs use fused_step unless told otherwise

    def predict_eps(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """x: (B, C, H, W) float32, t: (B,) int64, y: (B,) int64 | None -> ε (B, C, H, W) float32."""

    def fused_step(self, plan, y: np.ndarray | None):
        """A ``runtime.fused.FusedStep`` for this plan and batch, or None where the backend has none."""


def is_torchscript(path: Path) -> bool:
    """TorchScript files are zip archives (torch.jit.save); ONNX files are protobuf."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def start_onnx(path: str | os.PathLike, providers: tuple[str, ...], **session) -> Iterator[tuple[str, object]]:
    """Try each provider in turn: yields (short name, ``OnnxModel`` or the ``ModelError`` that stopped it)."""
    from runtime.onnx_model import OnnxModel

    for name in providers:
        try:
            yield name, OnnxModel(path, name, **session)
        except ModelError as e:
            yield name, e


def load_backend(path: str | os.PathLike, provider: str = "auto", *, threads: int | None = None,
                 cpu_arena: bool = True, provider_options: dict | None = None, session_options=None,
                 log: Callable[[str], None] = lambda msg: None) -> Backend:
    """The backend for a model file: TorchScript for a .pt archive, else onnxruntime on ``provider``.

    ``auto`` takes the first of tensorrt, cuda, cpu that starts and logs the ones that did not.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if provider not in CHOICES:
        raise ModelError(f"unknown provider {provider!r} (expected {', '.join(CHOICES)})")
    if is_torchscript(path):
        from runtime.torchscript_model import TorchScriptModel

        device = "cpu"
        if provider in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                device = "cuda"
            elif provider == "cuda":
                raise ModelError("provider cuda: torch sees no CUDA device")
        return TorchScriptModel(path, device)
    failures = []
    for name in AUTO_ORDER if provider == "auto" else (provider,):
        options = provider_options if name == provider or (provider == "auto" and name == "cuda") else None
        ((_, model),) = start_onnx(path, (name,), threads=threads, cpu_arena=cpu_arena, provider_options=options,
                                   session_options=session_options, quiet=provider == "auto")
        if isinstance(model, ModelError):
            if name == "cpu" or provider != "auto":
                raise model
            failures.append(PROVIDER_NAMES[name])  # auto: any failure off the CPU means "try the next one"
            continue
        if failures:
            log(f"provider auto: {', '.join(failures)} did not start here; using {model.provider}")
        return model
    raise AssertionError("unreachable: the CPU provider always starts")
