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

from runtime.errors import reason

# torch.save's legacy (non-zip, before PyTorch 1.6) format pickles torch.serialization.MAGIC_NUMBER first
LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

def load_data(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, without torch's warnings (the caller explains failures)."""
    with warnings.catch_warnings():
        # e.g. "Detected pickle protocol 4 in the checkpoint ..." (two lines) before a plain pickle's error
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
        return torch.load(path, map_location="cpu", weights_only=True)


def explain_load_error(path: Path, e: Exception) -> str:
    """One line for a ``load_data`` failure: pickled code refused, a damaged archive, a legacy-format file the
    weights-only loader cannot read, or not a checkpoint at all."""
    text = str(e)
    with open(path, "rb") as f:
        head = f.read(64)
    is_zip = head[:4] == b"PK\x03\x04"  # torch.save's format is a zip archive
    legacy = head[:1] == b"\x80" and LEGACY_MAGIC in head
    found = re.search(r"(?:GLOBAL|global)\s+([\w.]+)", text)
    # A refused global is code; other refusals count only inside a torch.save archive (a bare pickle.dump file
    # fails on an opcode the weights-only unpickler lacks, which says nothing about code).
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in text.lower() and (found or is_zip):
        what = f" ({found.group(1)})" if found else ""
        return (f"refusing to load {path}: it contains pickled code or objects{what}, and a checkpoint "
                "must hold only tensors and plain data")
    if is_zip or isinstance(e, zipfile.BadZipFile):
        return f"{path} is truncated or corrupt (a damaged torch.save archive)"
    if legacy:
        unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        why = ("it is truncated or corrupt" if isinstance(e, EOFError) or "EOF" in text else
               f"PyTorch's weights-only loader cannot read it: {unpickler.group(1) if unpickler else reason(e)}")
        return (f"{path} is a torch.save checkpoint in the legacy (non-zip, pickle protocol {head[1]}) format, and "
                f"{why}; it is refused because reading it otherwise would unpickle it, which can run code. If you "
                "trust the file, re-save it: torch.save(torch.load(OLD, weights_only=False), NEW)")
    if head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5:  # a pickle's PROTO opcode, without torch.save's magic
        return (f"{path} is a plain Python pickle (pickle.dump), not a PyTorch checkpoint (a torch.save archive); "
                "it is not loaded, because unpickling it would run whatever code it holds")
    return f"{path} is not a PyTorch checkpoint (expected a torch.save archive)"
