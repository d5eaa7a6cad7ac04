"""Reading a checkpoint as data, never code: what ``ddpm-train --resume`` and ``ddpm-export`` share.

``torch.load(..., weights_only=True)`` only rebuilds tensors and plain containers; a file that carries a
pickled callable (a code payload) is refused before anything in it runs. ``explain_load_error`` turns what
torch raised into one line that says what the file is; it never passes on torch's advice to retry with
``weights_only=False``.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch


def load_data(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, without torch's warnings (the caller explains failures)."""
    with warnings.catch_warnings():
        # e.g. "Detected pickle protocol 4 in the checkpoint ..." (two lines) before a plain pickle's error
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
        return torch.load(path, map_location="cpu", weights_only=True)


def explain_load_error(path: Path, e: Exception) -> str:
    """One line for a ``load_data`` failure: pickled code refused, a damaged archive, or not a checkpoint at all."""
    text = str(e)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format is a zip archive
    found = re.search(r"(?:GLOBAL|global)\s+([\w.]+)", text)
    # A refused global is code; other refusals count only inside a torch.save archive (a bare pickle.dump file
    # fails on an opcode the weights-only unpickler lacks, which says nothing about code).
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in text.lower() and (found or is_zip):
        what = f" ({found.group(1)})" if found else ""
        return (f"refusing to load {path}: it contains pickled code or objects{what}, and a checkpoint "
                "must hold only tensors and plain data")
    if is_zip or isinstance(e, zipfile.BadZipFile):
        return f"{path} is truncated or corrupt (a damaged torch.save archive)"
    return f"{path} is not a PyTorch checkpoint (expected a torch.save archive)"
