"""Reading a ``ddpm-generate`` folder for scoring: its images and requested classes, and how many of ``run.json``'s
``n`` are missing; every unreadable file is a one-line ``EvalError`` that names it."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.errors import EvalError, reason
from runtime.generation.output import RUN_FILE
from runtime.images import read_png


@dataclass
class Generated:
    """What a folder holds: ``images`` (N, H, W, C) uint8, by index; ``classes`` (N,) int64, the requested class of
    each image when every manifest record has one; ``expected`` run.json's ``n`` (None without run.json)."""
    images: np.ndarray
    classes: np.ndarray | None
    expected: int | None

    @property
    def missing(self) -> int:
        return 0 if self.expected is None else self.expected - len(self.images)


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _run_n(folder: Path) -> int | None:
    """run.json's image count, or None for a folder that ddpm-generate did not make."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot read {path}: {reason(e)}") from None
    n = settings.get("n") if isinstance(settings, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise EvalError(f"{path} has no image count n (a positive integer)")
    return n


def _records(path: Path, *, shard: bool) -> list[tuple[int, dict]]:
    """(line number, record) of a manifest. A shard's manifest (``shard``) is read as ddpm-generate reads it: a line
    that is no record (cut by a crash or a full disk) is skipped, and that image is made again; in manifest.jsonl,
    written whole once the run is finished, such a line is refused."""
    try:
        text = path.read_text(errors="replace" if shard else "strict")
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot read {path}: {reason(e)}") from None
    records = []
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            if shard:
                continue
            raise EvalError(f"{path}:{k}: not valid JSON ({e.msg}: column {e.colno}): the file is cut or "
                            "corrupt") from None
        index = r.get("index") if isinstance(r, dict) else None
        if shard and (not isinstance(index, int) or isinstance(index, bool) or not isinstance(r.get("file"), str)):
            continue
        if not isinstance(r, dict) or not isinstance(r.get("file"), str):
            raise EvalError(f"{path}:{k}: the record names no image file")
        c = r.get("class")
        if c is not None and (not isinstance(c, int) or isinstance(c, bool)):
            raise EvalError(f"{path}:{k}: class {c!r} is not a class index")
        records.append((k, r))
    return records


def _read_image(path: Path) -> np.ndarray:
    """One image file as (H, W, C) uint8, or a one-line ``EvalError`` that names it."""
    try:
        image = read_png(path, 1)
    except UnidentifiedImageError:
        raise EvalError(f"{path} is not an image (corrupt, or not a PNG)") from None
    except FileNotFoundError:
        raise EvalError(f"{path} does not exist") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise EvalError(f"{path} cannot be read (corrupt or cut short: {reason(e)})") from None
    if image.dtype != np.uint8 or image.ndim != 3:
        raise EvalError(f"{path} is not an 8-bit grayscale or colour image ({image.dtype}, shape {image.shape})")
    return image


def _stack(paths: list[Path]) -> np.ndarray:
    """The images of ``paths`` as one (N, H, W, C) uint8 array; a file whose size differs from most is named."""
    images = [_read_image(p) for p in paths]
    shapes = Counter(im.shape for im in images)
    common, count = shapes.most_common(1)[0]
    for p, im in zip(paths, images):
        if im.shape != common:
            raise EvalError(f"{p} is {_shape(im.shape)} (H×W×C) but {count} of the {len(paths)} images are "
                            f"{_shape(common)}")
    return np.stack(images)


def _read_npz(path: Path) -> np.ndarray:
    """``arr_0`` of a samples.npz: (N, H, W, C) uint8."""
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # what np.load takes for a zip archive
                raise EvalError(f"{path} is not an .npz archive (corrupt, or another kind of file)")
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise EvalError(f"{path} holds no arr_0 (where ddpm-generate puts the images)")
            images = data["arr_0"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise EvalError(f"{path} is not a readable .npz archive (corrupt or cut short: {reason(e)})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EvalError(f"{path}: arr_0 is {images.dtype} of shape {images.shape}; expected (N, H, W, C) uint8")
    return images


def load_generated(folder: Path) -> Generated:
    """The images of a ddpm-generate folder, the requested classes (from the manifest) if any, and run.json's n.

    A finished run is read from samples.npz (else manifest.jsonl and its PNGs); an unfinished one (run.json, no
    manifest.jsonl) from what its shards' manifests record and whose files exist — the images ddpm-generate counts
    as done; a folder of NNNNNN.png without manifests, image by image."""
    if not folder.is_dir():
        raise EvalError(f"{folder} is not a folder")
    expected = _run_n(folder)
    manifest, npz = folder / "manifest.jsonl", folder / "samples.npz"
    records = _records(manifest, shard=False) if manifest.is_file() else None
    if npz.is_file():
        images = _read_npz(npz)
        if records and len(records) != len(images):
            raise EvalError(f"{npz} holds {len(images)} images but {manifest} lists {len(records)}")
        source = npz
    elif records:
        for k, r in records:
            if not (folder / r["file"]).is_file():
                raise EvalError(f"{manifest}:{k}: {folder / r['file']} does not exist")
        images = _stack([folder / r["file"] for _, r in records])
        source = manifest
    elif expected is not None and (shards := sorted(folder.glob("manifest-*-of-*.jsonl"))):
        done: dict[int, tuple[int, dict]] = {}
        for path in shards:
            for k, r in _records(path, shard=True):
                if 0 <= (i := r["index"]) < expected and (folder / r["file"]).is_file():
                    done[i] = (k, r)  # later lines win, as in ddpm-generate
        records = [done[i] for i in sorted(done)]
        images = _stack([folder / r["file"] for _, r in records]) if records else np.zeros((0, 0, 0, 0), np.uint8)
        source = folder
    else:
        files = sorted(p for p in folder.glob("*.png") if p.stem.isdigit())
        if not files and expected is None:
            raise EvalError(f"{folder} holds no generated images (no samples.npz, manifest.jsonl or NNNNNN.png)")
        images = _stack(files) if files else np.zeros((0, 0, 0, 0), np.uint8)
        source = folder
    if expected is not None and len(images) > expected:
        raise EvalError(f"{source} holds {len(images)} images but {folder / RUN_FILE} says n = {expected}")
    classes = None
    if records and all(r.get("class") is not None for _, r in records):
        classes = np.array([r["class"] for _, r in records], dtype=np.int64)
    return Generated(images, classes, expected)
