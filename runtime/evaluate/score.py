"""Offline quality of generated images with a shipped FashionMNIST classifier (ONNX): FCD, FD∞, KID, class
histogram, conditional accuracy, each with its uncertainty — beside the floor (real train vs real test, resampled)
and the ceiling (Gaussian noise) at the same sample count. Torch-free: numpy + onnxruntime.

FCD is the Fréchet distance between Gaussians fitted to the classifier's 128-d penultimate features (as FID does
with Inception features). It is biased upward by about c/N for N images, so FCDs of different N cannot be compared
and even equal N leave a bias of the order of the differences between settings; FD∞ (Chong & Forsyth 2020,
"Effectively unbiased FID") fits FCD linearly against 1/N over random subsets and reports the intercept, with the
fit's standard error. KID is the unbiased squared MMD with the cubic polynomial kernel (Bińkowski et al. 2018): the
mean and standard deviation over random subsets.
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
REFERENCE_SHAPE = (32, 32, 1)  # (H, W, C) of the reference images, FashionMNIST padded as training pads it


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
        if images.ndim != 4 or images.shape[1:] != REFERENCE_SHAPE:
            raise EvalError(f"the FashionMNIST classifier takes 32×32 grayscale images, got shape {images.shape[1:]}")
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        logits, feats = zip(*(self.session.run(["logits", "features"], {"x": x[i:i + batch]})
                              for i in range(0, len(x), batch)))
        return np.concatenate(logits), np.concatenate(feats).astype(np.float64)


Moments = tuple  # (μ (D,), Σ (D, D)) of a feature set


def moments(features: np.ndarray) -> Moments:
    """The mean and covariance of a feature set (N, D)."""
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(a: np.ndarray | Moments, b: np.ndarray | Moments) -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½ for feature sets (N, D), or their ``moments``."""
    (mu_a, cov_a), (mu_b, cov_b) = (x if isinstance(x, tuple) else moments(x) for x in (a, b))
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


@dataclass(frozen=True)
class FdInf:
    """FD∞: the intercept of FCD(N) = a + b/N fitted by least squares over ``points`` (N, FCD); ``stderr`` its
    standard error over bootstrap resamples of the whole set (which the fit's own residual error, ``fit_stderr``,
    leaves out: every subset shares the set's deviation from its distribution)."""

    value: float
    stderr: float
    fit_stderr: float
    points: list[tuple[int, float]]


FD_INF_POINTS = 8  # subset sizes of the fit, evenly spaced in 1/N
FD_INF_SMALLEST = 5  # from n / 5 (Chong & Forsyth: 5 000 … 50 000) up to n
FD_INF_BOOTSTRAP = 20  # resamples of the whole set for FD∞'s standard error


def _fd_fit(features: np.ndarray, reference: Moments, rng: np.random.Generator) -> tuple[float, float, list]:
    """(intercept, its residual standard error, the points) of one fit."""
    n = len(features)
    smallest = max(n // FD_INF_SMALLEST, features.shape[1] + 2)  # a covariance needs more images than dimensions
    sizes = np.unique(np.round(1.0 / np.linspace(1.0 / smallest, 1.0 / n, FD_INF_POINTS)).astype(int))
    points = [(int(N), frechet_distance(features if N == n else features[rng.choice(n, N, replace=False)], reference))
              for N in sizes]
    x = np.array([1.0 / N for N, _ in points])
    y = np.array([v for _, v in points])
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    covariance = (residual @ residual / max(len(x) - 2, 1)) * np.linalg.inv(design.T @ design)
    return float(coef[0]), float(np.sqrt(covariance[0, 0])), points


def fd_infinity(features: np.ndarray, reference: Moments, rng: np.random.Generator,
                bootstrap: int = FD_INF_BOOTSTRAP) -> FdInf:
    """FD∞ of a feature set against the reference's moments (Chong & Forsyth 2020, §3.2): FCD of a random subset of
    N of the features for ``FD_INF_POINTS`` sizes N from n / ``FD_INF_SMALLEST`` to n (all of them at n), evenly
    spaced in 1/N, fitted linearly against 1/N; the intercept is the FCD of infinitely many images. Its standard
    error is the sd of the same fit on ``bootstrap`` resamples (with replacement) of the n features."""
    n = len(features)
    if n <= FD_INF_SMALLEST * (features.shape[1] + 2):
        raise EvalError(f"FD∞ needs more than {FD_INF_SMALLEST * (features.shape[1] + 2)} images, got {n}")
    value, fit_stderr, points = _fd_fit(features, reference, rng)
    again = [_fd_fit(features[rng.integers(0, n, n)], reference, rng)[0] for _ in range(bootstrap)]
    return FdInf(value, float(np.std(again, ddof=1)), fit_stderr, points)


def kid_subsets(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 500,
                seed: int = 0) -> np.ndarray:
    """Unbiased MMD² with k(x, y) = (x·y / D + 1)³ on each of ``subsets`` random subsets of both sets."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        values.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return np.array(values)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 500,
                              seed: int = 0) -> float:
    """KID: the mean of ``kid_subsets``."""
    return float(kid_subsets(a, b, subsets, subset_size, seed).mean())


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


@dataclass
class Scores:
    """One row: FCD at n (the floor: the mean over its resamples, ``fcd_sd`` their sd), FD∞ and its standard error,
    KID and its sd over subsets, the predicted classes and, for conditional runs, how often they agree with the
    requested class with its 95 % Wilson interval."""

    name: str
    n: int
    fcd: float
    fd_inf: float
    fd_inf_stderr: float
    kid: float
    kid_sd: float
    class_histogram: list[int]
    conditional_accuracy: float | None = None
    conditional_accuracy_interval: list[float] | None = None
    fcd_sd: float | None = None


RESAMPLES = 8  # real subsets of the floor
DECISIVE_N = 5000  # fewer images than this: FCD's spread is as large as the differences between settings


def load_reference(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Real FashionMNIST, padded to 32×32 like the training data: (N, 32, 32, 1) uint8 and labels."""
    found = find_split([root, root / "FashionMNIST" / "raw"], train)
    if found is None:
        raise EvalError(f"FashionMNIST {'train' if train else 'test'} data not found in {root}; "
                        "apt-get install -y dataset-fashion-mnist, or pass --data-root")
    images, labels = read_split(*found, num_classes=10)
    return pad_to_32(images)[..., None], labels.astype(np.int64)


def evaluate(folder: Path, data_root: Path, *, seed: int = 0, threads: int | None = None,
             allow_incomplete: bool = False, resamples: int = RESAMPLES) -> dict:
    """Scores of the generated images and of the two reference points, all at the generated sample count.

    The floor is the real training set against the test set: FCD as the mean ± sd over ``resamples`` random subsets
    of n training images, FD∞ and KID on the first of them. An unfinished run (fewer images than run.json's n) is
    refused unless ``allow_incomplete``; then the result's ``incomplete`` says how many are missing (it is None for a
    finished run or a folder without run.json). ``warning``: a line for a run too small to tell settings apart."""
    generated = load_generated(folder)
    images, classes, missing = generated.images, generated.classes, generated.missing
    n = len(images)
    if missing and not allow_incomplete:
        raise EvalError(f"{folder} holds an unfinished run: {n} of {generated.expected} images (run.json's n), "
                        f"{missing} missing; rerun its ddpm-generate command to finish it, or pass --allow-incomplete "
                        f"to score the {n} there are")
    if images.shape[1:] != REFERENCE_SHAPE:
        raise EvalError(f"{folder} holds {'×'.join(map(str, images.shape[1:]))} (H×W×C) images; ddpm-eval scores "
                        f"images of its reference's size only, FashionMNIST's 32×32×1: it ships no reference set or "
                        "feature network for other images (docs/evaluate.md)")
    if n < 10:
        raise EvalError(f"{folder} holds {n} images; the scores need at least 10")
    extract = FeatureExtractor(threads)
    test_images, _ = load_reference(data_root, train=False)
    train_images, _ = load_reference(data_root, train=True)
    _, test_feats = extract(test_images)
    reference = moments(test_feats)
    rng = np.random.default_rng(seed)
    picks = [rng.choice(len(train_images), min(n, len(train_images)), replace=False) for _ in range(resamples)]
    used = np.unique(np.concatenate(picks))
    train_logits, train_feats = extract(train_images[used])
    where = {int(k): j for j, k in enumerate(used)}
    rows_of = [[where[int(k)] for k in pick] for pick in picks]
    real = [train_feats[r] for r in rows_of]
    noise = np.clip(rng.normal(127.5, 127.5, size=(n, 32, 32, 1)).round(), 0, 255).astype(np.uint8)

    def score(name: str, feats: np.ndarray, logits: np.ndarray, requested: np.ndarray | None = None,
              resampled: list[np.ndarray] | None = None) -> Scores:
        fd_inf = fd_infinity(feats, reference, rng) if len(feats) > FD_INF_SMALLEST * (feats.shape[1] + 2) else None
        kids = kid_subsets(feats, test_feats, seed=seed)
        fcds = [frechet_distance(f, reference) for f in (resampled or [feats])]
        predicted = logits.argmax(1)
        row = Scores(name, len(feats), float(np.mean(fcds)), np.nan if fd_inf is None else fd_inf.value,
                     np.nan if fd_inf is None else fd_inf.stderr, float(kids.mean()), float(kids.std(ddof=1)),
                     np.bincount(predicted, minlength=10).tolist())
        if requested is not None:
            agree = int((predicted == requested).sum())
            row.conditional_accuracy = agree / len(requested)
            row.conditional_accuracy_interval = list(wilson_interval(agree, len(requested)))
        if resampled is not None:
            row.fcd_sd = float(np.std(fcds, ddof=1)) if len(fcds) > 1 else None
        return row

    logits, feats = extract(images)
    noise_logits, noise_feats = extract(noise)
    rows = [score("generated", feats, logits, classes),
            score(f"floor: real train vs test ({resamples}×)", real[0], train_logits[rows_of[0]], resampled=real),
            score("ceiling: Gaussian noise", noise_feats, noise_logits)]
    warning = None
    if n < DECISIVE_N:
        warning = (f"{n} images: below {DECISIVE_N}, FCD moves with the sample as much as settings move it "
                   f"(the floor's sd here is {rows[1].fcd_sd or 0:.2f}); these numbers cannot tell settings apart")
    return {"folder": str(folder), "n": n,
            "incomplete": {"expected_n": generated.expected, "missing": missing} if missing else None,
            "reference": "fashion-mnist test set (10000 images)", "warning": warning,
            "classes": FASHION_MNIST_CLASSES, "rows": [_jsonable(asdict(r)) for r in rows]}


def _jsonable(row: dict) -> dict:
    """NaN (FD∞ of a set too small to fit) as None: JSON has no NaN."""
    return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}


def table(result: dict) -> str:
    lines = [f"{'':32s} {'n':>6s} {'FCD':>15s} {'FD∞ ± se':>15s} {'KID ± sd':>17s} {'cond. acc. [95 %]':>22s}"]
    if result.get("incomplete"):
        missing, expected = result["incomplete"]["missing"], result["incomplete"]["expected_n"]
        lines.insert(0, f"INCOMPLETE RUN: {result['n']} of {expected} images ({missing} missing); "
                        "these are not the scores of the finished run")
    for r in result["rows"]:
        fcd = f"{r['fcd']:.3f}" + ("" if r.get("fcd_sd") is None else f" ± {r['fcd_sd']:.3f}")
        fd_inf = "—" if r.get("fd_inf") is None else f"{r['fd_inf']:.3f} ± {r['fd_inf_stderr']:.3f}"
        kid = f"{r['kid']:.4f} ± {r['kid_sd']:.4f}"
        acc = ""
        if r["conditional_accuracy"] is not None:
            lo, hi = r["conditional_accuracy_interval"]
            acc = f"{100 * r['conditional_accuracy']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"
        lines.append(f"{r['name']:32s} {r['n']:6d} {fcd:>15s} {fd_inf:>15s} {kid:>17s} {acc:>22s}")
    hist = result["rows"][0]["class_histogram"]
    lines.append("predicted classes of the generated images: "
                 + ", ".join(f"{c} {k}" for c, k in zip(result["classes"], hist)))
    return "\n".join(lines)
