"""Offline quality of generated images with a shipped FashionMNIST classifier (ONNX): FCD, KID, class histogram,
conditional accuracy — each beside the floor (real train vs real test) and the ceiling (Gaussian noise) at the same
sample count. Torch-free: numpy + onnxruntime.

FCD is the Fréchet distance between Gaussians fitted to the classifier's 128-d penultimate features (as FID does
with Inception features); KID the unbiased squared MMD with the cubic polynomial kernel (Bińkowski et al. 2018),
averaged over subsets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from runtime.errors import EvalError
from runtime.evaluate.generated import load_generated
from runtime.evaluate.idx import FASHION_MNIST_CLASSES, find_split, pad_to_32, read_split

CLASSIFIER = "fashion_mnist_classifier.onnx"
REFERENCES = ("fashion-mnist",)


def classifier_path() -> Path:
    return Path(str(resources.files("runtime") / "assets" / CLASSIFIER))


class FeatureExtractor:
    """The shipped classifier: images (N, 32, 32, 1) uint8 → (logits (N, 10), features (N, 128)) float32."""

    def __init__(self, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(classifier_path()), so, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        if images.ndim != 4 or images.shape[1:] != (32, 32, 1):
            raise EvalError(f"the FashionMNIST classifier takes 32×32 grayscale images, got shape {images.shape[1:]}")
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        logits, feats = zip(*(self.session.run(["logits", "features"], {"x": x[i:i + batch]})
                              for i in range(0, len(x), batch)))
        return np.concatenate(logits), np.concatenate(feats).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½ for feature sets a, b: (N, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 500,
                              seed: int = 0) -> float:
    """Unbiased MMD² with k(x, y) = (x·y / D + 1)³, the mean over random subsets of both sets."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        values.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(values))


@dataclass
class Scores:
    name: str
    n: int
    fcd: float
    kid: float
    class_histogram: list[int]
    conditional_accuracy: float | None = None


def load_reference(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Real FashionMNIST, padded to 32×32 like the training data: (N, 32, 32, 1) uint8 and labels."""
    found = find_split([root, root / "FashionMNIST" / "raw"], train)
    if found is None:
        raise EvalError(f"FashionMNIST {'train' if train else 'test'} data not found in {root}; "
                        "apt-get install -y dataset-fashion-mnist, or pass --data-root")
    images, labels = read_split(*found, num_classes=10)
    return pad_to_32(images)[..., None], labels.astype(np.int64)


def evaluate(folder: Path, data_root: Path, *, seed: int = 0, threads: int | None = None,
             allow_incomplete: bool = False) -> dict:
    """Scores of the generated images and of the two reference points, all at the generated sample count.

    An unfinished run (fewer images than run.json's n) is refused unless ``allow_incomplete``; then the result's
    ``incomplete`` says how many are missing (it is None for a finished run or a folder without run.json)."""
    generated = load_generated(folder)
    images, classes, missing = generated.images, generated.classes, generated.missing
    n = len(images)
    if missing and not allow_incomplete:
        raise EvalError(f"{folder} holds an unfinished run: {n} of {generated.expected} images (run.json's n), "
                        f"{missing} missing; rerun its ddpm-generate command to finish it, or pass --allow-incomplete "
                        f"to score the {n} there are")
    if n < 10:
        raise EvalError(f"{folder} holds {n} images; the scores need at least 10")
    extract = FeatureExtractor(threads)
    test_images, _ = load_reference(data_root, train=False)
    train_images, _ = load_reference(data_root, train=True)
    _, test_feats = extract(test_images)
    rng = np.random.default_rng(seed)
    real = train_images[rng.choice(len(train_images), min(n, len(train_images)), replace=False)]
    noise = np.clip(rng.normal(127.5, 127.5, size=(n, 32, 32, 1)).round(), 0, 255).astype(np.uint8)

    def score(name: str, imgs: np.ndarray, requested: np.ndarray | None = None) -> Scores:
        logits, feats = extract(imgs)
        predicted = logits.argmax(1)
        return Scores(name, len(imgs), frechet_distance(feats, test_feats), kernel_inception_distance(feats, test_feats),
                      np.bincount(predicted, minlength=10).tolist(),
                      None if requested is None else float((predicted == requested).mean()))

    rows = [score("generated", images, classes), score("floor: real train vs test", real),
            score("ceiling: Gaussian noise", noise)]
    return {"folder": str(folder), "n": n,
            "incomplete": {"expected_n": generated.expected, "missing": missing} if missing else None,
            "reference": "fashion-mnist test set (10000 images)",
            "classes": FASHION_MNIST_CLASSES, "rows": [asdict(r) for r in rows]}


def table(result: dict) -> str:
    lines = [f"{'':28s} {'n':>6s} {'FCD':>10s} {'KID':>10s} {'cond. acc.':>10s}"]
    if result.get("incomplete"):
        missing, expected = result["incomplete"]["missing"], result["incomplete"]["expected_n"]
        lines.insert(0, f"INCOMPLETE RUN: {result['n']} of {expected} images ({missing} missing); "
                        "these are not the scores of the finished run")
    for r in result["rows"]:
        acc = "" if r["conditional_accuracy"] is None else f"{100 * r['conditional_accuracy']:.1f} %"
        lines.append(f"{r['name']:28s} {r['n']:6d} {r['fcd']:10.3f} {r['kid']:10.4f} {acc:>10s}")
    hist = result["rows"][0]["class_histogram"]
    lines.append("predicted classes of the generated images: "
                 + ", ".join(f"{c} {k}" for c, k in zip(result["classes"], hist)))
    return "\n".join(lines)
