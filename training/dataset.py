"""Training images for the DDPM: MNIST, Fashion-MNIST, CelebA or any image folder.

`Diffset` yields ``(image, label)`` pairs where ``image`` is a ``float32`` tensor of
shape ``[C, H, W]`` (``H == W == image_size``) with values in ``[-1, 1]`` (pixel
``p`` in ``0..255`` becomes ``p / 127.5 - 1``) and ``label`` is a python ``int``.

All file discovery, parsing and validation happens in the constructor, so that bad
or missing data fails early with a one-line `DatasetError`; ``__getitem__`` only
converts (and, for image files, decodes) one item. Nothing touches the network
unless ``download=True``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from runtime.evaluate.idx import FASHION_MNIST_CLASSES, IdxError, find_split, read_split
from training.errors import DatasetError

__all__ = ["Diffset", "DatasetError"]

_ALIASES = {
    "mnist": "mnist",
    "fashionmnist": "fashion-mnist",
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "celeba": "celeba",
    "folder": "folder",
}
# Directory / display names torchvision uses for the IDX datasets.
_IDX_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": FASHION_MNIST_CLASSES,
}
_IDX_HINT = {
    "mnist": "",
    "fashion-mnist": "install Debian's dataset-fashion-mnist "
                     "(files in /usr/share/datasets/fashion-mnist), ",
}
_IMAGE_EXTS = {".png", ".jpg", ".jpeg"}
_CELEBA_FILE = re.compile(r"^\d{6}\.(jpg|png)$", re.IGNORECASE)


class Diffset(Dataset[tuple[torch.Tensor, int]]):
    """A dataset of square images normalised to ``[-1, 1]`` for diffusion training.

    Args:
        train: training split if True, test split otherwise. MNIST/Fashion-MNIST use
            the ``train-*`` vs ``t10k-*`` files; CelebA uses partition 0 vs 2 of
            ``list_eval_partition.txt`` (all images for both when that file is absent);
            ignored for ``"folder"``.
        d_name: ``"mnist"``, ``"fashionmnist"`` (also ``"fashion-mnist"``,
            ``"fashion_mnist"``), ``"celeba"`` or ``"folder"``; case-insensitive.
        root: where the data lives. MNIST/Fashion-MNIST: a flat folder of raw IDX files
            (``train-images-idx3-ubyte[.gz]`` ...; Debian's layout), else torchvision's
            ``root/MNIST/raw`` or ``root/FashionMNIST/raw``. CelebA:
            ``root/celeba/img_align_celeba``, ``root/img_align_celeba`` or ``root``
            itself. Folder: any tree of .png/.jpg/.jpeg files (hidden files skipped).
        image_size: side ``H == W`` of the returned images (at least 8).
        download: if the data is not found, fetch it with torchvision (network) into
            torchvision's layout under ``root``, then read it from there.
        channels: ``C``; ``None`` means the dataset's natural count (1 for the MNISTs,
            3 otherwise). 1 gives grayscale, 3 RGB; the MNISTs accept only 1.

    Attributes:
        classes: class names (``[]`` for unconditional data, whose labels are all 0).
        num_classes: ``len(classes)``.
        size: ``image_size``; ``depth``: ``C``; ``name``: canonical dataset name
            (``"mnist"``, ``"fashion-mnist"``, ``"celeba"`` or ``"folder"``).

    MNIST-style digits are kept in memory as ``uint8`` ``[N, 28, 28]``; each item is
    padded by 2 background pixels per side to 32x32 and, if ``image_size != 32``,
    resized (bilinear, antialiased). Image files are center-cropped to a square and
    resized (bicubic, antialiased) when read.
    """

    def __init__(
        self,
        train: bool = True,
        d_name: str = "MNIST",
        root: str | os.PathLike[str] = "data",
        image_size: int = 32,
        download: bool = False,
        channels: int | None = None,
    ) -> None:
        name = _ALIASES.get(str(d_name).lower())
        if name is None:
            raise DatasetError(f"unknown dataset {d_name!r}; accepted names: {', '.join(_ALIASES)}")
        if channels not in (None, 1, 3):
            raise DatasetError(f"channels must be None, 1 or 3, got {channels!r}")
        if not isinstance(image_size, int) or image_size < 8:
            raise DatasetError(f"image_size must be an int >= 8, got {image_size!r}")
        if name in _IDX_NAMES and channels not in (None, 1):
            raise DatasetError(f"{_IDX_NAMES[name]} is grayscale: channels must be 1, got {channels}")

        self.name, self.size, self.train = name, image_size, train
        self.root = Path(root)
        self._pixels: np.ndarray | None = None  # uint8 [N, h, w] for the MNISTs
        self._files: list[Path] = []  # image files otherwise
        if name in _IDX_NAMES:
            self.depth = 1
            self._pixels, self._labels = _load_idx(name, self.root, train, download)
            self.classes = list(_IDX_CLASSES[name])
        else:
            self.depth = channels or 3
            if name == "celeba":
                self._files = _find_celeba(self.root, train, download)
                self._labels, self.classes = [0] * len(self._files), []
            else:
                self._files, self._labels, self.classes = _find_folder(self.root)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(image, label)``: ``float32 [depth, size, size]`` in ``[-1, 1]``, ``int``."""
        label = int(self._labels[index])
        if self._pixels is None:
            return _load_image(self._files[index], "L" if self.depth == 1 else "RGB", self.size), label
        x = torch.from_numpy(self._pixels[index].astype(np.float32)) / 127.5 - 1
        x = F.pad(x[None, None], (2, 2, 2, 2), value=-1.0)  # background 0 -> -1
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x[0], label

    def __repr__(self) -> str:
        return (f"Diffset(name={self.name!r}, root={str(self.root)!r}, len={len(self)}, "
                f"size={self.size}, depth={self.depth}, classes={self.num_classes})")


# --- MNIST / Fashion-MNIST (IDX files) -------------------------------------------------

def _load_idx(name: str, root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Find and read the image/label IDX pair: ``uint8 [N, 28, 28]`` and ``uint8 [N]``."""
    tv_name, prefix = _IDX_NAMES[name], "train" if train else "t10k"
    places = [root, root / tv_name / "raw"]
    found = find_split(places, train)
    if found is None and download:
        import torchvision.datasets as tvd

        getattr(tvd, tv_name)(str(root), train=train, download=True)
        found = find_split(places, train)
    if found is None:
        split = "train" if train else "test"
        raise DatasetError(
            f"{tv_name} {split} data not found (looked in {places[0]} and {places[1]}); "
            f"put {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] in one "
            f"of them, {_IDX_HINT[name]}or pass download=True (ddpm-train --download) on a networked machine")
    try:
        return read_split(*found, num_classes=len(_IDX_CLASSES[name]))
    except IdxError as e:
        raise DatasetError(str(e)) from None


# --- image files (CelebA, folder) ------------------------------------------------------

def _load_image(path: Path, mode: str, size: int) -> torch.Tensor:
    """Decode, convert to ``mode``, center-crop and resize: ``float32 [C, size, size]``."""
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from None
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != size:
        im = im.resize((size, size), Image.Resampling.BICUBIC)  # PIL antialiases when shrinking
    arr = np.array(im, dtype=np.uint8).reshape(size, size, -1)  # writable copy
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 127.5 - 1


def _find_celeba(root: Path, train: bool, download: bool) -> list[Path]:
    """List the CelebA image files of the requested split, sorted."""
    places = [root / "celeba" / "img_align_celeba", root / "img_align_celeba", root]

    def find() -> Path | None:
        for folder in places[:2]:
            if folder.is_dir():
                return folder
        if root.is_dir() and any(_CELEBA_FILE.match(e.name) for e in os.scandir(root)):
            return root
        return None

    folder = find()
    if folder is None and download:
        import torchvision.datasets as tvd

        tvd.CelebA(str(root), split="train" if train else "test", download=True)
        folder = find()
    if folder is None:
        raise DatasetError(
            f"CelebA images not found (looked in {', '.join(map(str, places))}); "
            "unpack img_align_celeba.zip (and list_eval_partition.txt) into "
            f"{places[0].parent} or pass download=True (ddpm-train --download) on a networked machine")
    present = sorted(e.name for e in os.scandir(folder)
                     if e.is_file() and Path(e.name).suffix.lower() in {".jpg", ".png"})
    partition = next((p for p in (folder.parent / "list_eval_partition.txt",
                                  root / "list_eval_partition.txt") if p.is_file()), None)
    if partition is not None:
        want, names = "0" if train else "2", set(present)
        try:
            rows = [line.split() for line in partition.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise DatasetError(f"cannot read {partition}: {e}") from None
        present = sorted(r[0] for r in rows if len(r) == 2 and r[1] == want and r[0] in names)
    if not present:
        raise DatasetError(f"no CelebA images for the {'train' if train else 'test'} split in {folder}"
                           + (f" (split from {partition})" if partition else ""))
    return [folder / n for n in present]


def _find_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """List images under ``root`` (sorted), checking each header; return files, labels, classes.

    Classes are the immediate subdirectories when every image lies inside one of them.
    """
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a directory")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in _IMAGE_EXTS]
    if not files:
        raise DatasetError(f"no .png/.jpg/.jpeg images found under {root}")
    files.sort()
    for path in files:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from None
    if any(p.parent == root for p in files):
        return files, [0] * len(files), []
    tops = [p.relative_to(root).parts[0] for p in files]
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return files, [index[t] for t in tops], classes
