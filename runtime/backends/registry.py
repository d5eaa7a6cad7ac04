"""The backends, one line each, and what reads them: recognising a model file, ``--provider``'s choices, loading."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from runtime.backends import onnx_model, openvino_model, pt2_model, torchscript_model
from runtime.backends.backend import Backend, BackendKind, Format, LoadOptions
from runtime.backends.onnx_file import ZIP_MAGIC
from runtime.backends.precision import Precision
from runtime.errors import ModelError

# A file is of the one format whose ``recognise`` says so; the first kind of a format is the one --provider auto loads
# it with.
BACKENDS: tuple[BackendKind, ...] = (
    onnx_model.KIND,
    openvino_model.KIND,
    torchscript_model.KIND,
    pt2_model.KIND,
)
FORMATS: dict[Format, BackendKind] = {}  # the kind that writes each format: its suffix, the precisions it is written in
for _kind in BACKENDS:
    FORMATS.setdefault(_kind.format, _kind)
CHOICES = ("auto", *dict.fromkeys(p.name for k in BACKENDS for p in k.providers))  # --provider, runtime.load


def model_format(path: Path) -> Format:
    """What a model file is, read from its layout by each kind's ``recognise`` without unpickling anything. A
    torch.save file (a checkpoint: ``*/data.pkl`` and no code, or a bare pickle) or any other zip raises
    ``ModelError``."""
    with open(path, "rb") as f:
        head = f.read(4)
    names: list[str] = []
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocols 2-5
        raise ModelError(f"{path} is not an ONNX, TorchScript or .pt2 model (it is a Python pickle, such as a "
                         "checkpoint; export checkpoints with ddpm-export)")
    if head == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            raise ModelError(f"{path} is truncated or corrupt (a damaged zip archive; "
                             "TorchScript and .pt2 models are zip archives)") from None
    for kind in BACKENDS:
        if kind.recognise(path):
            return kind.format
    if any(n.endswith("/data.pkl") for n in names):
        raise ModelError(f"{path} is not a TorchScript or .pt2 model (it looks like a torch.save checkpoint; "
                         "export it with ddpm-export)")
    raise ModelError(f"{path} is not a TorchScript or .pt2 model (a zip archive without TorchScript code)")


def kind_for(fmt: Format, provider: str) -> BackendKind:
    """The backend that runs a ``fmt`` file on ``provider`` (auto: the format's first kind)."""
    kinds = [k for k in BACKENDS if k.format == fmt]
    if provider == "auto":
        return kinds[0]
    runs = [k for k in BACKENDS if provider in {p.name for p in k.providers}]
    for kind in runs:
        if kind.format == fmt:
            return kind
    runs = list(dict.fromkeys(k.suffix for k in runs))
    if not runs:
        raise ModelError(f"unknown provider {provider!r} (expected {', '.join(CHOICES)})")
    choices = ", ".join(dict.fromkeys(p.name for k in kinds for p in k.providers))
    raise ModelError(f"provider {provider} runs {' and '.join(runs)} models only; this {FORMATS[fmt].suffix} model "
                     f"runs on {choices} or auto")


def load_backend(path: str | os.PathLike, provider: str = "auto", *, dtype: Precision | None = None,
                 options: LoadOptions = LoadOptions()) -> Backend:
    """The backend for a model file: its format (``model_format``), the kind that runs it on ``provider``
    (``kind_for``), loaded with ``dtype`` (None: the backend's choice) and ``options``."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a model file (export a model folder with ddpm-export first)")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    kind = kind_for(model_format(path), provider)
    check_precision(kind, dtype)
    backend = kind.load(path, provider, dtype, options)
    if dtype not in (None, backend.precision):  # a backend that runs what its file was exported in
        raise ModelError(f"--dtype {dtype}: {path} computes in {backend.precision} on {kind.name} (export it with "
                         f"ddpm-export --format {kind.format} --dtype {dtype} for that precision)")
    return backend


def check_precision(kind: BackendKind, dtype: Precision | None) -> None:
    """A one-line ``ModelError`` where ``kind`` cannot compute in ``dtype``, naming what can."""
    if dtype is None or dtype in kind.precisions:
        return
    who = [f"--provider {k.providers[0].name}" if k.format == kind.format else f"a {k.suffix} model exported in {dtype}"
           for k in BACKENDS if dtype in k.precisions]
    raise ModelError(f"--dtype {dtype}: {kind.name} runs {' or '.join(kind.precisions)} ({kind.format} models; "
                     f"{dtype} needs {' or '.join(dict.fromkeys(who)) or 'another backend'})")


def takes_option(provider: str, option: str) -> bool:
    """Whether ``provider`` (or, for auto, a provider auto may pick) takes the provider option ``option``."""
    return any(option in p.takes for k in BACKENDS for p in k.providers
               if p.name == provider or (provider == "auto" and p.name in k.auto))
