"""The output folder of ``ddpm-generate``: resumable, shard-safe, never a half-written file.

Layout of DIR:
- ``run.json``: the settings every image depends on (model sha256, n, seed, sampler, steps, ...); created
  once (atomically, first writer wins); a later run with other settings is refused unless ``--overwrite``.
- ``000000.png`` …: one file per image index (in ``.parts/`` when only ``samples.npz`` is asked for).
- ``manifest-I-of-N.jsonl``: one line per finished image of shard I, appended only after its image was
  renamed into place; each shard appends only to its own file, so concurrent shards never share one. An
  append starts on a new line when the last one was cut (a full disk or kill -9 during an append), so a cut
  line costs only its own images, which are made again; it never swallows the next line.
- when every image exists: ``manifest.jsonl`` (all lines, by index), ``samples.npz`` (uint8 N×H×W×C under
  ``arr_0``) and ``grid.png``, as asked.
Every file is written under a temporary name and renamed; a rerun removes the temporaries that killed
writers on this machine left behind (never those of a live writer). An image counts as done when its
manifest line exists and its file is there; anything else is made again (identically) on the next run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from runtime import files
from runtime.errors import OutputError
from runtime.images import make_grid, png_bytes, read_png

RUN_FILE = "run.json"
PARTS_DIR = ".parts"
FINAL_FILES = ("manifest.jsonl", "samples.npz", "grid.png")
SHARD_MANIFEST = re.compile(r"manifest-[0-9]+-of-[0-9]+\.jsonl")
# What one folder takes: finishing a run holds every manifest line in memory (~0.4 kB per image) and the
# folder holds a file per image; larger sets are several runs (other seeds).
MAX_IMAGES = 10_000_000
GRID_IMAGES = 100  # grid.png shows the first 100 images


def shard_indices(n: int, shard: int, num_shards: int) -> range:
    """Shard ``shard`` of ``num_shards``: a contiguous block of ``range(n)``; the blocks partition it."""
    return range(shard * n // num_shards, (shard + 1) * n // num_shards)


def is_run_file(name: str) -> bool:
    """Whether ``name`` is a file that ``ddpm-generate`` writes into an output folder."""
    return (name in (RUN_FILE, *FINAL_FILES) or SHARD_MANIFEST.fullmatch(name) is not None
            or (name.endswith(".png") and name[:-4].isdigit()))


_REASONS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def _io_error(verb: str, path: Path, e: OSError) -> OutputError:
    """``verb`` is "write", "write to", "create" or "read"."""
    if e.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}; free space and rerun the same command to resume")
    if e.errno == errno.EROFS:
        return OutputError(f"cannot {verb} {path}: read-only file system; use a folder on a writable disk")
    return OutputError(f"cannot {verb} {path}: {_REASONS.get(e.errno) or e.strerror or e}")


def atomic_write(path: Path, data: bytes) -> None:
    """``files.atomic_write`` with OS errors as one-line ``OutputError``s."""
    try:
        files.atomic_write(path, data)
    except OSError as e:
        raise _io_error("write", path, e) from None


@contextmanager
def _atomic_stream(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write that becomes ``path`` when the block ends without an error (``files.atomic_path``);
    OS errors as one-line ``OutputError``s."""
    try:
        with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
            yield f
    except OSError as e:
        raise _io_error("write", path, e) from None


DERIVED = ("timesteps",)  # run.json keys that the other settings determine, recorded since they exist


class OutputDir:
    """One run's output folder. ``settings`` are what the images depend on; ``n`` the whole run's size."""

    def __init__(self, root: str | os.PathLike, settings: dict, *, formats: tuple[str, ...], overwrite: bool) -> None:
        self.root = Path(root)
        self.settings = settings
        self.n = int(settings["n"])
        self.width = max(6, len(str(self.n - 1)))
        self.image_dir = self.root if "png" in formats else self.root / PARTS_DIR
        self.formats = formats
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"cannot use {self.root} as the output folder: it is a file")
        try:
            self.image_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _io_error("create", self.root, e) from None
        run_file = self.root / RUN_FILE
        try:  # a real write: os.access cannot tell a read-only mount from a missing permission
            files.check_writable(run_file)
        except OSError as e:
            raise _io_error("write to", self.root, e) from None
        if overwrite and run_file.exists():
            self._clear()
        mine = json.dumps(self.settings, indent=2, sort_keys=True) + "\n"
        try:
            files.create_once(run_file, mine.encode())  # concurrent shards agree on one run.json
        except OSError as e:
            raise _io_error("write", run_file, e) from None
        theirs = json.loads(run_file.read_text())
        # a folder of an earlier version does not record what its other settings determine (the timesteps)
        theirs |= {k: self.settings[k] for k in DERIVED if k not in theirs and k in self.settings}
        if theirs != self.settings:
            diff = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
            diff = [k for k in diff if k not in DERIVED] or diff  # name the settings given, not what they determine
            raise OutputError(f"{self.root} holds a run with other settings ({', '.join(diff)} differ); "
                              "use another folder or --overwrite")
        self._sweep()

    def _folders(self) -> list[Path]:
        return [d for d in (self.root, self.root / PARTS_DIR) if d.is_dir()]

    def _clear(self) -> None:
        """Remove what an earlier run wrote (only the files this tool makes)."""
        for d in self._folders():
            for p in d.iterdir():
                if p.is_file() and is_run_file(p.name):
                    p.unlink()

    def _sweep(self) -> None:
        """Remove the temporary files of this run's files that killed writers left (``files.abandoned_temporaries``:
        never one of a live writer, such as a shard writing into this folder now)."""
        for d in self._folders():
            for p in files.abandoned_temporaries(d, is_run_file):
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass  # a leftover costs only space; the run does not depend on it

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{index:0{self.width}d}.png"

    def recorded(self) -> dict[int, str]:
        """The manifest line (JSON) of every recorded image whose file exists, by index (later lines win).

        Lines that are no record (cut by a crash or a full disk) are skipped: those images are made again."""
        lines = {}
        for path in sorted(self.root.glob("manifest-*-of-*.jsonl")):
            try:
                text = path.read_text(errors="replace")
            except OSError as e:
                raise _io_error("read", path, e) from None
            for line in text.splitlines():
                try:
                    r = json.loads(line)
                    index, file = r["index"], r["file"]
                except (ValueError, TypeError, KeyError):
                    continue
                if (isinstance(index, int) and 0 <= index < self.n and isinstance(file, str)
                        and (self.root / file).is_file()):
                    lines[index] = line
        return lines

    def write_images(self, indices: Iterable[int], images: np.ndarray, records: list[dict], manifest: Path) -> None:
        """Write each image (atomically), then append its manifest lines (``files.append_lines``: one write, flushed
        to disk, on a new line)."""
        for index, image, record in zip(indices, images, records):
            path = self.image_path(index)
            atomic_write(path, png_bytes(image))
            record["file"] = str(path.relative_to(self.root))
        try:
            files.append_lines(manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
        except OSError as e:
            raise _io_error("write", manifest, e) from None

    def _image(self, line: str, channels: int) -> tuple[Path, np.ndarray]:
        path = self.root / json.loads(line)["file"]
        try:
            return path, read_png(path, channels)
        except (OSError, ValueError, SyntaxError) as e:
            raise OutputError(f"cannot read {path} ({e}); delete it and rerun the same command to make it "
                              "again") from None

    def finalize(self, channels: int, grid: bool, grid_columns: int,
                 records: dict[int, str] | None = None) -> list[Path]:
        """When all ``n`` images are recorded, write manifest.jsonl, samples.npz and grid.png as asked; returns them,
        or [] while images are missing. ``records``: ``recorded()``, if the caller has it.

        Memory: the manifest lines and the grid's images; samples.npz is written image by image."""
        records = self.recorded() if records is None else records
        if len(records) < self.n:  # records holds indices 0 … n−1 only
            return []
        written = [self.root / "manifest.jsonl"]
        with _atomic_stream(written[0]) as f:
            for i in range(self.n):
                f.write(records[i].encode() + b"\n")
        shown = []
        if "npz" in self.formats:
            written.append(self.root / "samples.npz")
            shown = self._write_npz(written[-1], records, channels)
        if grid:
            shown = shown or [self._image(records[i], channels)[1] for i in range(min(self.n, GRID_IMAGES))]
            written.append(self.root / "grid.png")
            atomic_write(written[-1], png_bytes(make_grid(np.stack(shown), grid_columns)))
        return written

    def _write_npz(self, path: Path, records: dict[int, str], channels: int) -> list[np.ndarray]:
        """samples.npz as ``np.savez(path, arr_0=images)`` writes it, one image at a time; returns the first 100."""
        first_path, first = self._image(records[0], channels)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.n, *first.shape)}
        shown = []
        with _atomic_stream(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z, \
                z.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for i in range(self.n):
                p, image = (first_path, first) if i == 0 else self._image(records[i], channels)
                if image.shape != first.shape or image.dtype != np.uint8:
                    raise OutputError(f"{p} is {image.dtype} {image.shape} but {first_path} is uint8 {first.shape}; "
                                      "delete the odd one and rerun the same command to make it again")
                member.write(np.ascontiguousarray(image).tobytes())
                if i < GRID_IMAGES:
                    shown.append(image)
        return shown
