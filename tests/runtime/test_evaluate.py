"""ddpm-eval: the distances against closed forms, and separating real images from noise (torch-free code)."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

from runtime.evaluate.cli import main
from runtime.evaluate.score import (
    FeatureExtractor,
    classifier_path,
    fd_infinity,
    frechet_distance,
    kernel_inception_distance,
    wilson_interval,
)
from runtime.generation.output import OutputDir, shard_indices


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.arange(8) * 0.5
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)  # same covariance
    # N(0, I) vs N(0, 4I) in 8-d: tr(I) + tr(4I) − 2 tr(2I) = 8
    b = rng.standard_normal((4000, 8)) * 2
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.05)


def test_fd_infinity_finds_the_true_distance_of_gaussians_within_its_error():
    """Gaussian features whose Fréchet distance to the reference distribution is known in closed form: FCD at n is
    biased upward by about c/n; FD∞ (Chong & Forsyth 2020) removes that bias, and its stated (bootstrap) error covers
    the truth as a standard error should: every seed within 3 errors, most within 1."""
    D, n = 48, 1000
    A = np.random.default_rng(7).standard_normal((D, D)) / np.sqrt(D)
    gen, ref = (np.full(D, 0.2), A @ A.T + 0.5 * np.eye(D)), (np.zeros(D), 0.8 * np.eye(D))
    truth = frechet_distance(gen, ref)  # moments in, closed form out
    z, fcd_bias, fd_inf_bias, errors = [], [], [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = rng.multivariate_normal(*gen, size=n)
        r = fd_infinity(x, ref, rng)
        assert len(r.points) == 8 and r.points[0][0] == n // 5 and r.points[-1][0] == n
        z.append((r.value - truth) / r.stderr)
        fcd_bias.append(frechet_distance(x, ref) - truth)
        fd_inf_bias.append(r.value - truth)
        errors.append(r.stderr)
    assert max(abs(v) for v in z) <= 3 and sum(abs(v) <= 1 for v in z) >= 3, z
    assert min(fcd_bias) > 0  # FCD at n overshoots on every seed: a bias, not noise
    assert abs(np.mean(fd_inf_bias)) < np.mean(fcd_bias) / 3 and abs(np.mean(fd_inf_bias)) < np.mean(errors) / 2


def test_wilson_interval():
    lo, hi = wilson_interval(90, 100)
    assert lo < 0.9 < hi and hi - lo == pytest.approx(0.1197, abs=1e-3)  # the textbook value for 90/100
    assert (wilson_interval(0, 50)[0] == pytest.approx(0.0, abs=1e-12)
            and wilson_interval(50, 50)[1] == pytest.approx(1.0))


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    assert abs(kernel_inception_distance(a, b, subsets=20, subset_size=300)) < 0.01
    assert kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=300) > 0.1


def test_shipped_classifier_is_the_one_trained_here():
    meta = ort.InferenceSession(str(classifier_path())).get_modelmeta().custom_metadata_map
    assert float(meta["test_accuracy"]) >= 0.90  # measured on the FashionMNIST test set when it was trained
    logits, feats = FeatureExtractor()(np.zeros((3, 32, 32, 1), np.uint8))
    assert logits.shape == (3, 10) and feats.shape == (3, 128)


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def garment_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blurry bright blobs of class-dependent shape on black: far closer to each other than to noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, y in enumerate(labels):
        h, w = 8 + 2 * (y % 5), 6 + 2 * (y // 5) * 4
        r, c = 14 - h // 2 + rng.integers(-2, 3), 14 - w // 2 + rng.integers(-2, 3)
        images[i, r:r + h, c:c + w] = rng.integers(150, 255)
    return images, labels


@pytest.fixture
def reference_root(tmp_path) -> Path:
    root = tmp_path / "ref"
    root.mkdir()
    for prefix, seed in (("train", 0), ("t10k", 1)):
        images, labels = garment_like(300, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 0x803, images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 0x801, labels)
    return root


def write_folder(folder: Path, images: np.ndarray, classes: list[int] | None = None) -> Path:
    folder.mkdir()
    lines = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
        lines.append(json.dumps({"index": i, "file": f"{i:06d}.png", "class": None if classes is None else classes[i]}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_separates_real_images_from_noise(reference_root, tmp_path):
    real, _ = garment_like(100, 7)
    real = np.pad(real, ((0, 0), (2, 2), (2, 2)))
    noise = np.random.default_rng(3).integers(0, 256, (100, 32, 32), dtype=np.uint8)
    results = {}
    for name, images in (("real", real), ("noise", noise)):
        folder = write_folder(tmp_path / name, images)
        r = CliRunner().invoke(main, [str(folder), "--data-root", str(reference_root), "--json"])
        assert r.exit_code == 0, r.output
        results[name] = json.loads(r.stdout)["rows"]
    real_row, floor, ceiling = results["real"]
    assert floor["name"].startswith("floor") and ceiling["name"].startswith("ceiling") and real_row["n"] == 100
    assert real_row["fcd"] < 0.5 * results["noise"][0]["fcd"]
    assert floor["fcd"] < ceiling["fcd"] and floor["kid"] < ceiling["kid"]
    assert sum(real_row["class_histogram"]) == 100


def test_every_row_carries_its_uncertainty(tmp_path):
    """With enough images for FD∞ (more than 5 × (128 + 2)): each row has FD∞ and its error, KID and its sd; the
    floor its FCD's sd over resampled real subsets; a conditional run its accuracy's interval; and a run of fewer
    than 5000 images says, on stderr in one line, that its numbers cannot tell settings apart."""
    root = tmp_path / "ref"
    root.mkdir()
    for prefix, seed, n in (("train", 0, 900), ("t10k", 1, 300)):
        images, labels = garment_like(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 0x803, images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 0x801, labels)
    images, labels = garment_like(700, 5)
    folder = write_folder(tmp_path / "run", np.pad(images, ((0, 0), (2, 2), (2, 2))), labels.tolist())
    r = CliRunner().invoke(main, [str(folder), "--data-root", str(root), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert r.stderr.startswith("warning: 700 images: below 5000") and r.stderr.count("\n") == 1
    assert result["warning"] and result["warning"] in r.stderr
    generated, floor, ceiling = result["rows"]
    for row in (generated, floor, ceiling):
        assert row["fd_inf"] is not None and row["fd_inf_stderr"] > 0 and row["kid_sd"] > 0, row
    assert floor["fcd_sd"] > 0 and generated["fcd_sd"] is None
    lo, hi = generated["conditional_accuracy_interval"]
    assert lo < generated["conditional_accuracy"] < hi
    assert generated["fd_inf"] < ceiling["fd_inf"] - 10 * ceiling["fd_inf_stderr"]
    table = CliRunner().invoke(main, [str(folder), "--data-root", str(root)]).stdout
    assert "FD∞ ± se" in table and f"{generated['fd_inf']:.3f} ± {generated['fd_inf_stderr']:.3f}" in table


def test_conditional_accuracy_reads_the_manifest(reference_root, tmp_path):
    images, _ = garment_like(40, 9)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    predicted = FeatureExtractor()(images[..., None])[0].argmax(1).tolist()
    agree = write_folder(tmp_path / "agree", images, predicted)
    disagree = write_folder(tmp_path / "disagree", images, [(p + 1) % 10 for p in predicted])
    accs = []
    for folder in (agree, disagree):
        r = CliRunner().invoke(main, [str(folder), "--data-root", str(reference_root), "--json"])
        assert r.exit_code == 0, r.output
        accs.append(json.loads(r.stdout)["rows"][0]["conditional_accuracy"])
    assert accs == [1.0, 0.0]
    table = CliRunner().invoke(main, [str(agree), "--data-root", str(reference_root)]).output
    assert "100.0 %" in table and "floor: real train vs test" in table and "ceiling: Gaussian noise" in table


@pytest.mark.parametrize("case, message", [("missing", "is not a folder"), ("empty", "holds no generated images"),
                                           ("no-data", "FashionMNIST test data not found"),
                                           ("rgb", "holds 16×16×3 (H×W×C) images; ddpm-eval scores images of its "
                                                   "reference's size only, FashionMNIST's 32×32×1")])
def test_bad_input(case, message, tmp_path, reference_root):
    folder, root = tmp_path / "gen", reference_root
    if case != "missing":
        folder.mkdir()
    if case == "no-data":
        write_folder(tmp_path / "g2", np.zeros((12, 32, 32), np.uint8))
        folder, root = tmp_path / "g2", tmp_path / "nowhere"
    if case == "rgb":  # a latent model's images, say: another size, in colour
        write_folder(tmp_path / "g3", np.zeros((12, 16, 16, 3), np.uint8))
        folder = tmp_path / "g3"
    r = CliRunner().invoke(main, [str(folder), "--data-root", str(root)])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def write_run(folder: Path, n: int, shards_done: list[int], num_shards: int = 2, formats=("png",)) -> Path:
    """A ddpm-generate folder written by ``runtime.generation.output`` as a run does: shards ``shards_done`` of
    ``num_shards`` finished (their images and manifest-I-of-N.jsonl); finalized (manifest.jsonl, samples.npz) once all
    are."""
    images, labels = garment_like(n, 11)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]
    out = OutputDir(folder, {"n": n, "seed": 0}, formats=formats, overwrite=False)
    for shard in shards_done:
        idx = shard_indices(n, shard, num_shards)
        out.write_images(idx, images[idx.start:idx.stop], [{"index": i, "class": int(labels[i])} for i in idx],
                         folder / f"manifest-{shard}-of-{num_shards}.jsonl")
    out.finalize(1, grid=False, grid_columns=8)
    return folder


def assert_one_line_error(r, *messages: str) -> None:
    """Refused through click (no uncaught exception), on one line that holds every message."""
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    assert all(m in r.output for m in messages), r.output


@pytest.mark.parametrize("formats", [("png",), ("npz",)])
def test_unfinished_run_is_refused_unless_allow_incomplete(formats, reference_root, tmp_path):
    folder = write_run(tmp_path / "run", 48, shards_done=[0], formats=formats)
    assert not (folder / "manifest.jsonl").exists()

    def ddpm_eval(*args: str):
        return CliRunner().invoke(main, [str(folder), "--data-root", str(reference_root), *args])

    assert_one_line_error(ddpm_eval(), "unfinished run: 24 of 48 images", "24 missing", "--allow-incomplete")
    r = ddpm_eval("--allow-incomplete", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["n"] == result["rows"][0]["n"] == 24 and result["incomplete"] == {"expected_n": 48, "missing": 24}
    assert result["rows"][0]["conditional_accuracy"] is not None  # the shard manifest's classes
    r = ddpm_eval("--allow-incomplete")
    assert r.exit_code == 0 and r.stdout.startswith("INCOMPLETE RUN: 24 of 48 images (24 missing)"), r.output
    assert r.stderr.startswith("warning: 24 images: below 5000") and r.stderr.count("\n") == 1, r.stderr

    write_run(folder, 48, shards_done=[1], formats=formats)  # the other shard finishes: the run is finalized
    assert (folder / ("samples.npz" if "npz" in formats else "manifest.jsonl")).is_file()
    r = ddpm_eval("--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["n"] == 48 and result["incomplete"] is None
    assert "INCOMPLETE" not in ddpm_eval().output


def test_unfinished_run_counts_the_images_ddpm_generate_counts_as_done(tmp_path):
    folder = write_run(tmp_path / "run", 48, shards_done=[0])
    manifest = folder / "manifest-0-of-2.jsonl"
    # its last line cut by a crash (image 23 is made again), then a line that is no record, not even UTF-8
    manifest.write_bytes(manifest.read_bytes()[:-10] + b"\n\xff{\"index\": 40}\n")
    (folder / "000005.png").unlink()  # recorded, but its file is gone: made again too
    r = CliRunner().invoke(main, [str(folder), "--data-root", str(tmp_path / "nowhere")])
    assert_one_line_error(r, "22 of 48 images", "26 missing")


def corrupt(folder: Path, case: str) -> None:
    """Damage a finished 12-image folder of ``write_folder`` as ``case`` says."""
    png = folder / "000003.png"
    if case == "mixed-sizes":
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "000005.png")
    elif case == "corrupt-png":
        png.write_bytes(b"this is not a PNG file")
    elif case == "cut-png":  # noise, so that the PNG has a long image-data chunk to cut
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(png)
        png.write_bytes(png.read_bytes()[:600])
    elif case == "cut-manifest":
        (folder / "manifest.jsonl").write_text((folder / "manifest.jsonl").read_text()[:-12])
    elif case == "missing-file":
        (folder / "000004.png").unlink()
    elif case == "bad-class":
        records = [{**json.loads(line), "class": 7} for line in (folder / "manifest.jsonl").read_text().splitlines()]
        records[2]["class"] = "Sneaker"
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    elif case in ("garbage-npz", "cut-npz", "short-npz"):
        buf = io.BytesIO()
        np.savez(buf, arr_0=np.zeros((10 if case == "short-npz" else 12, 32, 32, 1), np.uint8))
        data = {"garbage-npz": b"garbage " * 20, "cut-npz": buf.getvalue()[:300], "short-npz": buf.getvalue()}[case]
        (folder / "samples.npz").write_bytes(data)
    elif case == "bad-run-json":
        (folder / "run.json").write_text('{"n": 1')
    elif case == "more-than-n":
        (folder / "run.json").write_text(json.dumps({"n": 10}))


@pytest.mark.parametrize("case, messages", [
    ("mixed-sizes", ("000005.png is 28×28×1", "11 of the 12 images are 32×32×1")),
    ("corrupt-png", ("000003.png is not an image",)),
    ("cut-png", ("000003.png cannot be read",)),
    ("cut-manifest", ("manifest.jsonl:12: not valid JSON",)),
    ("missing-file", ("manifest.jsonl:5:", "000004.png does not exist")),
    ("bad-class", ("manifest.jsonl:3: class 'Sneaker' is not a class index",)),
    ("garbage-npz", ("samples.npz is not an .npz archive",)),
    ("cut-npz", ("samples.npz is not a readable .npz archive",)),
    ("short-npz", ("samples.npz holds 10 images but", "manifest.jsonl lists 12")),
    ("bad-run-json", ("cannot read", "run.json")),
    ("more-than-n", ("holds 12 images but", "run.json says n = 10")),
])
def test_bad_files(case, messages, tmp_path, reference_root):
    folder = write_folder(tmp_path / "gen", np.zeros((12, 32, 32), np.uint8))
    corrupt(folder, case)
    r = CliRunner().invoke(main, [str(folder), "--data-root", str(reference_root)])
    assert_one_line_error(r, *messages)
