"""What a backend is (``Backend``), and the one place that loads a model file into one and probes providers.

A backend is a thin adapter around an exported noise predictor: ``contract``, ``provider`` (what runs it),
``path``, ``predict_eps`` on host arrays and ``device_engine`` (the batch engine with its arrays on the backend's
device: ``runtime.backends.fused`` for onnxruntime, ``runtime.backends.torch_loop`` for torch). Samplers and batching
never look past this protocol. onnxruntime (``runtime.backends.onnx_model``) is the base backend; TorchScript
(``runtime.backends.torchscript_model``) and ``.pt2`` (``runtime.backends.pt2_model``) need torch and are imported only
for such a file.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from runtime.backends.providers import AUTO_ORDER, CHOICES, GPU_PROVIDERS, PROVIDER_NAMES, gpu_visible
from runtime.errors import ModelError
from runtime.metadata import SamplingContract


class Backend(Protocol):
    path: Path
    contract: SamplingContract
    provider: str  # e.g. "CPUExecutionProvider", "torchscript:cuda", "pt2:cuda:bf16"
    prefers_device_loop: bool  # whether runs use device_engine unless told otherwise (GPUs)

    def predict_eps(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """x: (B, C, H, W) float32, t: (B,) int64, y: (B,) int64 | None -> ε (B, C, H, W) float32."""

    def device_engine(self):
        """A batch engine (``runtime.sampling.engine.Engine``) whose arrays live on the backend's device."""


Format = Literal["onnx", "torchscript", "pt2"]


def model_format(path: Path) -> Format:
    """What a model file is, read from its layout without unpickling anything.

    ONNX files are protobuf; TorchScript (torch.jit.save) and .pt2 packages are zip archives: a .pt2 has an
    ``archive_format`` entry, a TorchScript archive ``*/constants.pkl`` and ``*/code/``. A torch.save file (a
    checkpoint: ``*/data.pkl`` and no code, or a bare pickle) or any other zip raises ``ModelError``.
    """
    from runtime.backends.pt2_model import is_pt2

    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocols 2-5
        raise ModelError(f"{path} is not an ONNX, TorchScript or .pt2 model (it is a Python pickle, such as a "
                         "checkpoint; export checkpoints with ddpm-export)")
    if head != b"PK\x03\x04":
        return "onnx"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        raise ModelError(f"{path} is truncated or corrupt (a damaged zip archive; "
                         "TorchScript and .pt2 models are zip archives)") from None
    if is_pt2(path):
        return "pt2"
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        raise ModelError(f"{path} is not a TorchScript or .pt2 model (it looks like a torch.save checkpoint; "
                         "export it with ddpm-export)")
    raise ModelError(f"{path} is not a TorchScript or .pt2 model (a zip archive without TorchScript code)")


def start_onnx(path: str | os.PathLike, providers: tuple[str, ...], **session) -> Iterator[tuple[str, object]]:
    """Try each provider in turn: yields (short name, ``OnnxModel`` or the ``ModelError`` that stopped it)."""
    from runtime.backends.onnx_model import OnnxModel

    for name in providers:
        try:
            yield name, OnnxModel(path, name, **session)
        except ModelError as e:
            yield name, e


@dataclass(frozen=True)
class BackendKind:
    """One kind of model file: how it is recognised (``model_format``), what it is written as, how it loads and
    where it runs. ``load(path, provider, onnx_session)`` returns the backend."""

    format: Format
    suffix: str
    recognised_by: str
    devices: str
    load: Callable[[Path, str, dict], Backend]


def _load_onnx(path: Path, provider: str, session: dict) -> Backend:
    failures = []
    session = dict(session)  # the caller's settings stay as given
    log = session.pop("log", lambda msg: None)
    provider_options = session.pop("provider_options", None)
    for name in AUTO_ORDER if provider == "auto" else (provider,):
        options = provider_options if name == provider or (provider == "auto" and name == "cuda") else None
        ((_, model),) = start_onnx(path, (name,), provider_options=options, quiet=name in GPU_PROVIDERS, **session)
        if isinstance(model, ModelError):
            if name == "cpu" or provider != "auto":
                if name in GPU_PROVIDERS and not gpu_visible():  # the quiet probe dropped onnxruntime's reason
                    raise ModelError(f"{model}; no NVIDIA GPU is visible here") from None
                raise model
            failures.append(PROVIDER_NAMES[name])  # auto: any failure off the CPU means "try the next one"
            continue
        if failures and gpu_visible():  # without a GPU, that they did not start is no news
            log(f"provider auto: {', '.join(failures)} did not start here; using {model.provider}")
        return model
    raise AssertionError("unreachable: the CPU provider always starts")


def _load_torchscript(path: Path, provider: str, session: dict) -> Backend:
    from runtime.backends.torchscript_model import TorchScriptModel

    return TorchScriptModel(path, _torch_device(provider))


def _load_pt2(path: Path, provider: str, session: dict) -> Backend:
    from runtime.backends.pt2_model import Pt2Model

    if provider == "tensorrt":
        raise ModelError("provider tensorrt runs .onnx models only; use cuda or cpu for torch models")
    return Pt2Model(path, None if provider == "auto" else provider)  # a package runs where it was compiled for


BACKENDS: dict[str, BackendKind] = {k.format: k for k in (
    BackendKind("onnx", ".onnx", "protobuf (anything that is not a zip or a pickle)",
                "onnxruntime: tensorrt, cuda or cpu (auto: the first that starts)", _load_onnx),
    BackendKind("torchscript", ".pt", "a zip with */constants.pkl and */code/ (torch.jit.save)",
                "torch: cuda where asked for or available, else cpu", _load_torchscript),
    BackendKind("pt2", ".pt2", "a zip with an archive_format entry (torch.export's package)",
                "torch: the device it was compiled for", _load_pt2),
)}


def load_backend(path: str | os.PathLike, provider: str = "auto", *, threads: int | None = None,
                 cpu_arena: bool = True, provider_options: dict | None = None, session_options=None,
                 log: Callable[[str], None] = lambda msg: None) -> Backend:
    """The backend for a model file, by its kind (``BACKENDS[model_format(path)]``).

    ONNX: ``auto`` takes the first of tensorrt, cuda, cpu that starts and, where a GPU is visible
    (``runtime.backends.providers.gpu_visible``), logs the ones that did not. GPU providers are probed quietly
    (onnxruntime logs a failure in several lines); one asked for by name that does not start is one ``ModelError``. The
    session settings (``threads``, ``cpu_arena``, ``provider_options``, ``session_options``) apply to ONNX models.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a model file (export a model folder with ddpm-export first)")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if provider not in CHOICES:
        raise ModelError(f"unknown provider {provider!r} (expected {', '.join(CHOICES)})")
    session = dict(threads=threads, cpu_arena=cpu_arena, provider_options=provider_options,
                   session_options=session_options, log=log)
    return BACKENDS[model_format(path)].load(path, provider, session)


def _torch_device(provider: str) -> str:
    """The torch device for ``--provider``: cuda where asked for (or auto and available), else cpu."""
    from runtime.backends.torch_backend import require_torch

    if provider not in ("auto", "cuda"):
        if provider == "tensorrt":
            raise ModelError("provider tensorrt runs .onnx models only; use cuda or cpu for torch models")
        return "cpu"
    if require_torch().cuda.is_available():
        return "cuda"
    if provider == "cuda":
        raise ModelError("provider cuda: torch sees no CUDA device")
    return "cpu"
