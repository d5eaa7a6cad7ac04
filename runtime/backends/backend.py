"""What a backend is: the ``Backend`` protocol a loaded model follows, and the ``BackendKind`` descriptor through which
each backend states its own facts (format and recognition, loading, providers and devices, precisions, export's
checks). ``runtime.backends.registry`` lists the kinds; nothing else names a backend, provider or device.

A backend is a thin adapter around an exported noise predictor: ``contract``, ``provider`` (what runs it),
``precision``, ``device``, ``path``, ``predict_eps`` on host arrays and ``device_engine`` (the batch engine with its
arrays on the backend's device). Samplers and batching never look past this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from runtime.backends.precision import Precision
from runtime.backends.providers import Provider
from runtime.errors import ModelError
from runtime.metadata import SamplingContract

Format = Literal["onnx", "torchscript", "pt2"]


class Backend(Protocol):
    path: Path
    contract: SamplingContract
    provider: str  # e.g. "CPUExecutionProvider", "openvino:CPU", "torchscript:cuda", "pt2:cuda:bf16"
    precision: Precision  # what the network computes in
    device: str  # where its arrays live: "cpu" or "cuda"
    prefers_device_loop: bool  # whether runs use device_engine unless told otherwise (GPUs)

    def predict_eps(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """x: (B, C, H, W) float32, t: (B,) int64, y: (B,) int64 | None -> ε (B, C, H, W) float32."""

    def decode(self, z: np.ndarray) -> np.ndarray:
        """A latent model's decoder on host arrays: z (B, C, h, w) float32, already scaled (``latent /
        scaling_factor + shift``) -> images (B, channels, H, W) float32 in [-1, 1]."""

    def device_engine(self):
        """A batch engine (``runtime.sampling.engine.Engine``) whose arrays live on the backend's device."""


def predicted(out, contract: SamplingContract):
    """The prediction channels of the denoiser's output (numpy or torch): all of them unless the contract says
    fewer (DiT's learned variance follows its ε)."""
    p = contract.prediction_channels
    return out if p is None else out[:, :p]


def host_engine(backend: Backend):
    """The batch engine on host arrays around ``backend.predict_eps``, finishing through the model's decoder where it
    has one (``runtime.sampling.finish.finisher``)."""
    from runtime.sampling.engine import Engine
    from runtime.sampling.finish import finisher

    c = backend.contract
    return Engine(backend.predict_eps, null_class=c.null_class,
                  finish=finisher(c, backend.decode if c.decoder is not None else None))


@dataclass(frozen=True)
class LoadOptions:
    """How to set a backend up, beyond its provider and precision. ``threads``: the engine's intra-op threads;
    ``cpu_arena``: onnxruntime's CPU memory arena; ``provider_options``: options of the chosen provider (onnxruntime's
    GPU provider options; OpenVINO compile properties); ``session_options``: an ``onnxruntime.SessionOptions`` that
    replaces onnxruntime's session settings; ``log``: where a backend says what it chose."""

    threads: int | None = None
    cpu_arena: bool = True
    provider_options: dict | None = None
    session_options: Any = None
    log: Callable[[str], None] = lambda msg: None


@dataclass(frozen=True)
class BackendKind:
    """One backend's facts.

    ``format``/``suffix``: the model files it runs; ``recognise(path)``: whether a file is of that format (cheap, never
    unpickling). ``providers``: the ``--provider`` values that pick it; ``auto``: those ``--provider auto`` tries, in
    order (the first that starts wins; empty: auto never picks this backend). ``precisions``: what ``--dtype`` may ask
    of it. ``writes``: the precisions ``ddpm-export`` writes this format in (empty where another backend's kind
    writes the format). ``verify``: the providers export checks a new file on. ``host``: the provider that loads it on
    this machine's CPU, to check a run before it starts elsewhere (a Ray driver).
    ``load(path, provider, dtype, options)`` returns the backend (``dtype`` None: the backend's own choice).
    """

    name: str
    format: Format
    suffix: str
    recognise: Callable[[Path], bool]
    providers: tuple[Provider, ...]
    auto: tuple[str, ...]
    precisions: tuple[Precision, ...]
    writes: tuple[Precision, ...]
    verify: tuple[str, ...]
    host: str
    load: Callable[[Path, str, Precision | None, LoadOptions], Backend]

    def provider(self, name: str) -> Provider:
        """The provider of this backend called ``name`` (short or full name)."""
        for p in self.providers:
            if name in (p.name, p.full_name):
                return p
        raise ModelError(f"{self.name} has no provider {name!r} (it has {', '.join(p.name for p in self.providers)})")
