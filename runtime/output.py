"""The output folder of ``ddpm-generate``: resumable, shard-safe, never a half-written file.

Layout of DIR:
- ``run.json``: the settings every image depends on (model sha256, n, seed, sampler, steps, ...); created
  once (atomically, first writer wins); a later run with other settings is refused unless ``--overwrite``.
- ``000000.png`` …: one file per image index (in ``.parts/`` when only ``samples.npz`` is asked for).
- ``manifest-I-of-N.jsonl``: one line per finished image of shard I, appended only after its image was
  renamed into place; each shard appends only to its own file, so concurrent shards never share one.
- when every image exists: ``manifest.jsonl`` (all lines, by index), ``samples.npz`` (uint8 N×H×W×C under
  ``arr_0``) and ``grid.png``, as asked.
Every file is written under a temporary name and renamed. An image counts as done when its manifest line
exists and its file is there; anything else is made again (identically) on the next run.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from runtime import files
from runtime.errors import OutputError

RUN_FILE = "run.json"
PARTS_DIR = ".parts"


def shard_indices(n: int, shard: int, num_shards: int) -> range:
    """Shard ``shard`` of ``num_shards``: a contiguous block of ``range(n)``; the blocks partition it."""
    return range(shard * n // num_shards, (shard + 1) * n // num_shards)


def _io_error(verb: str, path: Path, e: OSError) -> OutputError:
    """``verb`` is "write" or "create"."""
    if e.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}; free space and rerun the same command to resume")
    return OutputError(f"cannot {verb} {path}: {e.strerror or e}")


def atomic_write(path: Path, data: bytes) -> None:
    """``files.atomic_write`` with OS errors as one-line ``OutputError``s."""
    try:
        files.atomic_write(path, data)
    except OSError as e:
        raise _io_error("write", path, e) from None


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of one (H, W, C) uint8 image (C = 1 is written as grayscale)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: Path, channels: int) -> np.ndarray:
    arr = np.asarray(Image.open(path))
    return arr[:, :, None] if channels == 1 and arr.ndim == 2 else arr


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
        if not os.access(self.root, os.W_OK):
            raise OutputError(f"cannot write to {self.root}: permission denied")
        run_file = self.root / RUN_FILE
        if overwrite and run_file.exists():
            self._clear()
        mine = json.dumps(self.settings, indent=2, sort_keys=True) + "\n"
        try:
            files.create_once(run_file, mine.encode())  # concurrent shards agree on one run.json
        except OSError as e:
            raise _io_error("write", run_file, e) from None
        theirs = json.loads(run_file.read_text())
        if theirs != self.settings:
            diff = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
            raise OutputError(f"{self.root} holds a run with other settings ({', '.join(diff)} differ); "
                              "use another folder or --overwrite")

    def _clear(self) -> None:
        """Remove what an earlier run wrote (only the files this tool makes)."""
        for d in (self.root, self.root / PARTS_DIR):
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p.is_file() and (p.name in (RUN_FILE, "manifest.jsonl", "samples.npz", "grid.png")
                                    or (p.name.startswith("manifest-") and p.suffix == ".jsonl")
                                    or (p.suffix == ".png" and p.stem.isdigit())):
                    p.unlink()

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{index:0{self.width}d}.png"

    def manifest_records(self) -> dict[int, dict]:
        """Every recorded image whose file exists, by index (later lines win)."""
        records = {}
        for path in sorted(self.root.glob("manifest-*-of-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: that image is made again
                if (self.root / r.get("file", "")).is_file():
                    records[int(r["index"])] = r
        return records

    def write_images(self, indices: Iterable[int], images: np.ndarray, records: list[dict], manifest: Path) -> None:
        """Write each image (atomically), then append its manifest lines (one write, flushed to disk)."""
        for index, image, record in zip(indices, images, records):
            path = self.image_path(index)
            atomic_write(path, png_bytes(image))
            record["file"] = str(path.relative_to(self.root))
        try:
            with open(manifest, "a") as f:
                f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _io_error("write", manifest, e) from None

    def finalize(self, channels: int, grid: bool, grid_columns: int) -> list[Path]:
        """When all ``n`` images exist, write manifest.jsonl, samples.npz and grid.png as asked; returns them."""
        records = self.manifest_records()
        if len(records) < self.n or any(i not in records for i in range(self.n)):
            return []
        written = [self.root / "manifest.jsonl"]
        atomic_write(written[0], "".join(json.dumps(records[i], sort_keys=True) + "\n" for i in range(self.n)).encode())
        images = None
        if "npz" in self.formats or grid:
            images = np.stack([read_png(self.root / records[i]["file"], channels) for i in range(self.n)])
        if "npz" in self.formats:
            import io

            buf = io.BytesIO()
            np.savez(buf, arr_0=images)
            written.append(self.root / "samples.npz")
            atomic_write(written[-1], buf.getvalue())
        if grid:
            written.append(self.root / "grid.png")
            atomic_write(written[-1], png_bytes(make_grid(images[:100], grid_columns)))
        return written


def make_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 → one (rows·(H+pad)+pad, columns·(W+pad)+pad, C) image, row-major."""
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return grid
