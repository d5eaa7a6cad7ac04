"""Tests for training.dataset.Diffset on tiny data written into tmp_path (no network)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.dataset import DatasetError, Diffset

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def write_idx(path: Path, magic: int, array: np.ndarray, *, compress: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file: big-endian magic, dims, then the bytes."""
    data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    data += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_images(n: int, seed: int) -> np.ndarray:
    """``uint8 [n, 28, 28]`` with a few known pixels: (i,0,0)=255, (i,1,1)=0, (i,2,2)=77."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 1, 1], images[:, 2, 2] = 255, 0, 77
    return images


def write_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray,
                *, compress: bool = True) -> None:
    write_idx(folder / f"{prefix}-images-idx3-ubyte", 0x00000803, images, compress=compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", 0x00000801, labels, compress=compress)


@pytest.fixture
def debian_root(tmp_path: Path) -> Path:
    """A flat folder laid out like Debian's /usr/share/datasets/fashion-mnist (.gz)."""
    write_split(tmp_path, "train", make_images(5, 0), np.array([0, 3, 9, 1, 9], np.uint8))
    write_split(tmp_path, "t10k", make_images(3, 1), np.array([7, 2, 5], np.uint8))
    return tmp_path


def save_image(path: Path, size: tuple[int, int], color, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


# --- MNIST / Fashion-MNIST -------------------------------------------------------------

def test_fashion_flat_gz_layout(debian_root: Path) -> None:
    ds = Diffset(True, "FashionMNIST", root=debian_root)
    assert len(ds) == 5
    assert ds.name == "fashion-mnist"
    assert ds.classes == FASHION_CLASSES and ds.num_classes == 10
    assert (ds.size, ds.depth) == (32, 1)
    images = make_images(5, 0)
    for i, expected_label in enumerate([0, 3, 9, 1, 9]):
        x, label = ds[i]
        assert isinstance(label, int) and label == expected_label
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        # 2-pixel background border on every side.
        for border in (x[:, :2, :], x[:, -2:, :], x[:, :, :2], x[:, :, -2:]):
            assert torch.all(border == -1)
        inner = x[0, 2:30, 2:30]
        assert inner[0, 0] == 1.0 and inner[1, 1] == -1.0
        assert abs(inner[2, 2].item() - (77 / 127.5 - 1)) < 1e-6
        expected = torch.from_numpy(images[i].astype(np.float32)) / 127.5 - 1
        torch.testing.assert_close(inner, expected, atol=1e-6, rtol=0)


def test_train_flag_selects_t10k_files(debian_root: Path) -> None:
    test = Diffset(False, "fashion-mnist", root=debian_root)
    assert len(test) == 3
    assert [test[i][1] for i in range(3)] == [7, 2, 5]
    torch.testing.assert_close(
        test[1][0][0, 2:30, 2:30],
        torch.from_numpy(make_images(3, 1)[1].astype(np.float32)) / 127.5 - 1, atol=1e-6, rtol=0)


def test_mnist_torchvision_raw_layout_uncompressed(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_split(raw, "train", make_images(4, 2), np.array([1, 2, 3, 4], np.uint8), compress=False)
    write_split(raw, "t10k", make_images(2, 3), np.array([0, 8], np.uint8), compress=False)
    ds = Diffset(True, "MNIST", root=tmp_path)
    assert (len(ds), ds.name, ds.classes) == (4, "mnist", [str(i) for i in range(10)])
    assert [ds[i][1] for i in range(4)] == [1, 2, 3, 4]
    assert ds[0][0].shape == (1, 32, 32)
    assert len(Diffset(False, "mnist", root=tmp_path)) == 2


def test_flat_folder_wins_over_torchvision_layout(debian_root: Path) -> None:
    write_split(debian_root / "FashionMNIST" / "raw", "train", make_images(2, 9),
                np.array([4, 4], np.uint8))
    assert len(Diffset(True, "fashion_mnist", root=debian_root)) == 5


def test_idx_image_size_64(debian_root: Path) -> None:
    ds = Diffset(True, "Fashion-MNIST", root=debian_root, image_size=64)
    x, _ = ds[0]
    assert ds.size == 64 and x.shape == (1, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.all(x[:, 0, :] == -1)  # the padded border stays background


@pytest.mark.parametrize("name", ["FashionMNIST", "fashion-mnist", "FASHION_MNIST", "fashionmnist"])
def test_fashion_names_case_insensitive(debian_root: Path, name: str) -> None:
    assert Diffset(True, name, root=debian_root).name == "fashion-mnist"


@pytest.mark.parametrize("name", ["MNIST", "mnist", "Mnist"])
def test_mnist_names_case_insensitive(debian_root: Path, name: str) -> None:
    assert Diffset(True, name, root=debian_root).name == "mnist"


def test_idx_works_with_dataloader(debian_root: Path) -> None:
    ds = Diffset(True, "fashionmnist", root=debian_root)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 1, 32, 32) and y.tolist() == [0, 3, 9, 1]


# --- folder ----------------------------------------------------------------------------

@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    save_image(root / "zebra" / "a.png", (40, 30), (255, 255, 255))
    save_image(root / "zebra" / "nested" / "b.PNG", (20, 50), (0, 0, 0))
    save_image(root / "apple" / "c.jpg", (33, 17), (255, 0, 0))
    save_image(root / "apple" / "d.png", (16, 16), 128, mode="L")
    (root / "apple" / "notes.txt").write_text("not an image, ignored")
    (root / "empty").mkdir()
    return root


def test_folder_with_classes(class_folder: Path) -> None:
    ds = Diffset(True, "Folder", root=class_folder)
    assert ds.name == "folder"
    assert ds.classes == ["apple", "zebra"] and ds.num_classes == 2
    assert len(ds) == 4
    assert [ds[i][1] for i in range(4)] == [0, 0, 1, 1]
    for i in range(4):
        x, _ = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(ds[2][0], torch.ones(3, 32, 32))  # white zebra/a.png
    assert torch.allclose(ds[3][0], -torch.ones(3, 32, 32))  # black zebra/nested/b.PNG
    red = ds[0][0]  # apple/c.jpg (JPEG: approximately red)
    assert red[0].mean() > 0.9 and red[1].mean() < -0.9


def test_folder_channels_and_size(class_folder: Path) -> None:
    gray = Diffset(True, "folder", root=class_folder, channels=1)
    assert gray.depth == 1 and gray[1][0].shape == (1, 32, 32)
    assert abs(gray[1][0].mean().item() - (128 / 127.5 - 1)) < 1e-6  # gray d.png
    big = Diffset(True, "folder", root=class_folder, image_size=64)
    assert big.size == 64 and big[0][0].shape == (3, 64, 64)
    assert big[0][0].min() >= -1 and big[0][0].max() <= 1


def test_flat_folder_is_unconditional(tmp_path: Path) -> None:
    save_image(tmp_path / "x.png", (10, 12), (10, 20, 30))
    save_image(tmp_path / "sub" / "y.jpeg", (64, 48), (200, 100, 0))
    ds = Diffset(True, "folder", root=tmp_path)
    assert ds.classes == [] and ds.num_classes == 0 and len(ds) == 2
    assert [ds[i][1] for i in range(2)] == [0, 0]
    assert ds[1][0].shape == (3, 32, 32)


# --- CelebA ----------------------------------------------------------------------------

@pytest.fixture
def celeba_root(tmp_path: Path) -> Path:
    images = tmp_path / "celeba" / "img_align_celeba"
    partitions = [0, 0, 0, 1, 2, 2]
    lines = []
    for i, part in enumerate(partitions, start=1):
        save_image(images / f"{i:06d}.jpg", (178, 218), (i * 40, 100, 50))
        lines.append(f"{i:06d}.jpg {part}")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_celeba_splits_and_shapes(celeba_root: Path) -> None:
    train = Diffset(True, "CelebA", root=celeba_root)
    test = Diffset(False, "celeba", root=celeba_root)
    assert (len(train), len(test)) == (3, 2)
    assert train.classes == [] and train.num_classes == 0 and train.name == "celeba"
    x, label = train[0]
    assert label == 0 and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert Diffset(True, "celeba", root=celeba_root, image_size=64)[0][0].shape == (3, 64, 64)
    assert Diffset(True, "celeba", root=celeba_root, channels=1)[0][0].shape == (1, 32, 32)


def test_celeba_without_partition_uses_all(celeba_root: Path) -> None:
    (celeba_root / "celeba" / "list_eval_partition.txt").unlink()
    assert len(Diffset(True, "celeba", root=celeba_root)) == 6
    assert len(Diffset(False, "celeba", root=celeba_root)) == 6


# --- errors ----------------------------------------------------------------------------

def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="accepted names: .*mnist.*celeba.*folder"):
        Diffset(True, "cifar10", root=tmp_path)


def test_missing_idx_names_places(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        Diffset(True, "FashionMNIST", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert "download=True" in message and "\n" not in message


def test_missing_celeba(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="img_align_celeba"):
        Diffset(True, "celeba", root=tmp_path)


def test_unreadable_image_in_folder(class_folder: Path) -> None:
    (class_folder / "apple" / "bad.png").write_text("this is not a png")
    with pytest.raises(DatasetError, match="bad.png"):
        Diffset(True, "folder", root=class_folder)


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no .*images"):
        Diffset(True, "folder", root=tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        Diffset(True, "folder", root=tmp_path / "nope")


@pytest.mark.parametrize("name", ["folder", "celeba", "mnist"])
def test_bad_channels(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError, match="channels"):
        Diffset(True, name, root=tmp_path, channels=2)


def test_mnist_rejects_rgb(debian_root: Path) -> None:
    with pytest.raises(DatasetError, match="grayscale"):
        Diffset(True, "mnist", root=debian_root, channels=3)


def test_too_small_image_size(debian_root: Path) -> None:
    with pytest.raises(DatasetError, match="image_size"):
        Diffset(True, "mnist", root=debian_root, image_size=4)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_split(tmp_path, "train", make_images(3, 0), np.array([1, 2], np.uint8))
    with pytest.raises(DatasetError, match="3 images but .*2 labels"):
        Diffset(True, "mnist", root=tmp_path)


def test_idx_bad_magic(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", 0x00000803, make_images(2, 0))
    write_idx(tmp_path / "train-labels-idx1-ubyte", 0x00000803, np.zeros((2, 1, 1), np.uint8))
    with pytest.raises(DatasetError, match="magic.*train-labels-idx1-ubyte.gz"):
        Diffset(True, "mnist", root=tmp_path)


def test_idx_truncated_data(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte", 0x00000803, make_images(2, 0),
                     compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    write_idx(tmp_path / "train-labels-idx1-ubyte", 0x00000801, np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        Diffset(True, "mnist", root=tmp_path)
