"""Golden output: the bundled FashionMNIST model must keep drawing the same 8 images for fixed settings.

``tests/data/golden_ddim10.npz`` holds ``images`` ((8, 32, 32, 1) uint8) and ``settings`` (JSON: the SHA-256 of the
model's graph — its metadata, such as recommended run settings, may change without changing the images —, the load
settings and every ``Pipeline.generate`` argument). The settings in the file are the source of
truth: the test reads them and passes each one explicitly, so no runtime default enters silently.

What this pins, end to end on the CPU (unfused numpy sampling loop):

* the noise schedule read from the model's contract (linear, T = 1000) and its float64 tables;
* respacing 1000 → 10 steps (which timesteps are visited, and the respaced ᾱ's);
* the DDIM update with η = 0 (x0 prediction, direction coefficient; no clipping, ``clip_denoised=False``);
* classifier-free guidance at w = 1.5 with the null class 10, and labels cycling by image index (``classes=None``);
* the per-image noise streams: image k's x_T depends only on (seed, k);
* the float → uint8 conversion (round((x + 1)·127.5), clipped, NHWC).

Images are compared in uint8 levels: at most ``TOLERANCES["fp32"].max_levels`` apart (onnxruntime's CPU kernels
differ slightly between instruction sets, e.g. AVX2 vs AVX-512), and at least 99 % of the pixels must be exactly
equal, so a small systematic change still fails. A different seed must be far off, which shows the test can fail.

To regenerate the file deliberately (only when a change of the images is intended, e.g. a new bundled model or a
deliberate change of the sampler), run from the repository root and review the diff it prints::

    .venv/bin/python tests/runtime/test_golden.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx

import runtime
from runtime.tolerances import TOLERANCES

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_ddim10.npz"
MODEL_NAME = "fashion-mnist.onnx"

# Used only to (re)write the golden file; the test reads the settings back from the file.
WRITE_SETTINGS = {
    "model": MODEL_NAME,
    "load": {"provider": "cpu", "threads": 1},
    "n": 8,
    "generate": {"seed": 1234, "sampler": "ddim", "steps": 10, "eta": 0.0, "guidance": 1.5, "batch_size": 8,
                 "classes": None, "clip_denoised": False, "variance": None, "start_index": 0},
}
GENERATE_KEYS = set(WRITE_SETTINGS["generate"])


def _model_path(name: str) -> Path:
    return Path(runtime.__file__).resolve().parent / "assets" / name


def _graph_sha256(path: Path) -> str:
    return hashlib.sha256(onnx.load(str(path)).graph.SerializeToString(deterministic=True)).hexdigest()


def _generate(settings: dict, **override) -> np.ndarray:
    load = settings["load"]
    model = runtime.load(_model_path(settings["model"]), load["provider"], threads=load["threads"])
    g = {**settings["generate"], **override}
    return model.generate(settings["n"], seed=g["seed"], sampler=g["sampler"], steps=g["steps"], eta=g["eta"],
                          guidance=g["guidance"], batch_size=g["batch_size"], classes=g["classes"],
                          clip_denoised=g["clip_denoised"], variance=g["variance"], start_index=g["start_index"],
                          model_defaults=False)  # settings added later (the guidance interval) take no recommendation


def _read_golden() -> tuple[np.ndarray, dict]:
    with np.load(GOLDEN) as f:
        return f["images"], json.loads(str(f["settings"]))


def test_bundled_model_reproduces_the_golden_images():
    golden, settings = _read_golden()
    assert set(settings["generate"]) == GENERATE_KEYS, "the golden file must pin every generate() setting"
    path = _model_path(settings["model"])
    assert _graph_sha256(path) == settings["graph_sha256"], (
        f"{path} is not the model the golden images were drawn from; if the change is intended, regenerate "
        "them: python tests/runtime/test_golden.py")

    images = _generate(settings)
    assert images.shape == golden.shape and images.dtype == golden.dtype == np.uint8

    diff = np.abs(images.astype(np.int16) - golden.astype(np.int16))
    max_levels = TOLERANCES["fp32"].max_levels
    assert diff.max() <= max_levels, (f"max |diff| {diff.max()} levels > {max_levels} "
                                      f"({np.count_nonzero(diff)} pixels differ)")
    exact = float(np.mean(diff == 0))
    assert exact >= 0.99, f"only {exact:.2%} of the pixels are exactly equal to the golden images"

    # The check is sharp: another seed draws other images, far beyond the tolerance.
    other = _generate(settings, seed=settings["generate"]["seed"] + 1)
    assert np.abs(other.astype(np.int16) - golden.astype(np.int16)).mean() > 10


def _write_golden() -> None:
    settings = {**WRITE_SETTINGS, "graph_sha256": _graph_sha256(_model_path(MODEL_NAME))}
    images = _generate(settings)
    if GOLDEN.exists():
        old, _ = _read_golden()
        if old.shape == images.shape:
            d = np.abs(old.astype(np.int16) - images.astype(np.int16))
            print(f"previous golden: max |diff| {d.max()} levels, {np.mean(d == 0):.2%} of pixels equal")
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(GOLDEN, images=images, settings=np.array(json.dumps(settings, sort_keys=True)))
    print(f"wrote {GOLDEN}: images {images.shape} {images.dtype}, settings {json.dumps(settings, sort_keys=True)}")


if __name__ == "__main__":
    if "torch" in sys.modules:
        raise SystemExit("the golden images must be drawn without torch")
    _write_golden()
