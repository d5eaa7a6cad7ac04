"""``runtime.load(path)`` → ``Generator``: batch image generation around an exported noise predictor.

The sampling settings come from the model's embedded contract; run settings (seed, sampler, steps, classes,
guidance, batch size) are arguments. Image k depends only on (seed, k) and the settings — not on the batch
size, the shard, the thread or the backend (within float tolerance). Sessions are created once; ``generate``
may be called from several threads at once (each call keeps its state on its own stack).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from runtime.errors import ModelError
from runtime.images import to_uint8
from runtime.metadata import SamplingContract
from runtime.noise import NoiseStreams
from runtime.onnx_model import PROVIDER_NAMES, OnnxModel
from runtime.samplers import array_predictor, sample
from runtime.schedule import StepCoefficients

Sampler = Literal["ddpm", "ddim"]
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
DEFAULT_DDIM_STEPS = 50
FUSED_CHECK_EVERY = 25  # GPU fused loop: host copy of x for the finiteness check every this many steps


class GenerationError(RuntimeError):
    """A run that cannot proceed (bad settings or a model that produced NaN/Inf); one line."""


@dataclass(frozen=True)
class SamplingPlan:
    """Resolved run settings: which sampler, how many steps, and each step's coefficients."""

    sampler: Sampler
    steps: int
    eta: float
    guidance: float
    clip_denoised: bool
    variance: str | None
    coefs: StepCoefficients


class Generator:
    """An exported model ready to sample: ``contract``, ``provider``, ``sha256`` and ``generate``."""

    def __init__(self, backend, path: Path, log: Callable[[str], None]) -> None:
        self.backend = backend
        self.path = path
        self.contract: SamplingContract = backend.contract
        self.provider: str = backend.provider
        self._schedule = self.contract.schedule.build()
        self._sha256: str | None = None
        self._step_session = None
        self.log = log

    @property
    def sha256(self) -> str:
        """SHA-256 of the model file (computed once)."""
        if self._sha256 is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._sha256 = h.hexdigest()
        return self._sha256

    # -- settings ------------------------------------------------------------------------------------------
    def plan(self, sampler: Sampler = "ddpm", steps: int | None = None, eta: float = 0.0, guidance: float = 1.0,
             clip_denoised: bool = False, variance: Literal["beta", "beta_tilde"] | None = None) -> SamplingPlan:
        """Validate the run settings against the contract and precompute the per-step coefficients."""
        T = self.contract.schedule.timesteps
        if sampler not in ("ddpm", "ddim"):
            raise GenerationError(f"unknown sampler {sampler!r} (expected ddpm or ddim)")
        if steps is None:
            steps = T if sampler == "ddpm" else min(DEFAULT_DDIM_STEPS, T)
        if int(steps) != steps or not 1 <= steps <= T:
            raise GenerationError(f"steps must be between 1 and T = {T}, got {steps}")
        if guidance != 1.0 and not self.contract.conditional:
            raise GenerationError("guidance needs a class-conditional model; this one is unconditional")
        if not eta >= 0:
            raise GenerationError(f"eta must be >= 0, got {eta}")
        schedule = self._schedule if steps == T else self._schedule.respace(int(steps))
        if sampler == "ddpm":
            # Full T: the contract's variance (Algorithm 2); respaced: β̃ of the respaced schedule (Improved DDPM).
            var = variance or (self.contract.variance if steps == T else "beta_tilde")
            coefs = schedule.ddpm_step_coefficients(var, clip_denoised)
        else:
            var = None
            coefs = schedule.ddim_step_coefficients(eta, clip_denoised)
        return SamplingPlan(sampler, int(steps), float(eta), float(guidance), clip_denoised, var, coefs)

    def labels(self, indices: Sequence[int], classes: int | str | Sequence[int | str] | None) -> np.ndarray | None:
        """(B,) int64 class labels for the images ``indices`` (None for unconditional models).

        ``classes``: None cycles through the classes by image index; one class (index or case-insensitive
        name) for all; or one per image.
        """
        c = self.contract
        if not c.conditional:
            if classes is not None:
                raise GenerationError("this model is unconditional: it takes no class")
            return None
        if classes is None:
            return np.asarray(indices, dtype=np.int64) % c.num_classes
        if isinstance(classes, (int, str, np.integer)):
            return np.full(len(indices), self.class_index(classes), dtype=np.int64)
        if len(classes) != len(indices):
            raise GenerationError(f"{len(classes)} classes given for {len(indices)} images")
        return np.array([self.class_index(k) for k in classes], dtype=np.int64)

    def class_index(self, value: int | str) -> int:
        """A class given as an index or a (case-insensitive) name from the contract."""
        c = self.contract
        names = [n.lower() for n in c.class_names]
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            if value.lower() not in names:
                known = ", ".join(c.class_names) if c.class_names else f"indices 0..{c.num_classes - 1}"
                raise GenerationError(f"unknown class {value!r} (this model knows: {known})")
            return names.index(value.lower())
        index = int(value)
        if not 0 <= index < c.num_classes:
            raise GenerationError(f"class {index} is out of range (this model has classes 0..{c.num_classes - 1})")
        return index

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, n: int, *, seed: int = 0, batch_size: int = 64, sampler: Sampler = "ddpm",
                 steps: int | None = None, eta: float = 0.0, classes=None, guidance: float = 1.0,
                 start_index: int = 0, clip_denoised: bool = False,
                 variance: Literal["beta", "beta_tilde"] | None = None) -> np.ndarray:
        """Images ``start_index … start_index+n−1``: (n, H, W, C) uint8."""
        if n < 1:
            raise GenerationError(f"n must be positive, got {n}")
        plan = self.plan(sampler, steps, eta, guidance, clip_denoised, variance)
        indices = list(range(start_index, start_index + n))
        labels = self.labels(indices, classes)
        out = [images for _, _, images in self.generate_batches(indices, plan, seed=seed, batch_size=batch_size,
                                                                  labels=labels)]
        return np.concatenate(out)

    def generate_batches(self, indices: Sequence[int], plan: SamplingPlan, *, seed: int, batch_size: int,
                         labels: np.ndarray | None = None, progress: Callable[[int], None] | None = None,
                         fused: bool | None = None) -> Iterator[tuple[list[int], np.ndarray | None, np.ndarray]]:
        """Yield (indices, labels, uint8 images (B, H, W, C)) batch by batch for the given image indices.

        ``progress(k)`` is called after each sampler step with the batch's size. ``fused`` runs the ONNX step
        graph (default: on GPU providers only).
        """
        if batch_size < 1:
            raise GenerationError(f"batch size must be positive, got {batch_size}")
        if seed < 0:
            raise GenerationError(f"seed must be non-negative, got {seed}")
        c = self.contract
        shape = (c.channels, c.image_size, c.image_size)
        for start in range(0, len(indices), batch_size):
            batch = list(indices[start:start + batch_size])
            y = None if labels is None else labels[start:start + batch_size]
            streams = NoiseStreams(seed, batch, shape)
            x_T = streams.next()

            def on_step(i: int, x: np.ndarray | None) -> None:
                if x is not None and not np.isfinite(x).all():
                    t = int(plan.coefs.timesteps[i])
                    raise GenerationError(f"the model produced NaN or Inf at sampler step {len(plan.coefs.timesteps) - i}"
                                          f" of {len(plan.coefs.timesteps)} (t = {t}); no images were written for this batch")
                if progress is not None:
                    progress(len(batch))

            use_fused = fused if fused is not None else self.provider != PROVIDER_NAMES["cpu"]
            if use_fused and isinstance(self.backend, OnnxModel):
                x0 = self._sample_fused(x_T, y, plan, streams, on_step)
            else:
                predict = array_predictor(self.backend, y, guidance=plan.guidance, null_class=c.null_class)
                x0 = sample(predict, x_T, plan.coefs, lambda i: streams.next(), on_step=on_step)
            yield batch, y, to_uint8(x0)

    def _sample_fused(self, x_T, y, plan: SamplingPlan, streams: NoiseStreams, on_step) -> np.ndarray:
        """The same loop through the fused ONNX step graph (runtime.step_graph): one session call per step.

        On a GPU provider x stays on the device between steps (IOBinding); it is copied to the host only every
        ``FUSED_CHECK_EVERY`` steps and at the end, to check that it is finite.
        """
        import onnxruntime as ort

        session = self._fused_session(guided=plan.guidance != 1.0)
        table = plan.coefs.table()
        zeros = np.zeros_like(x_T)
        w = np.array([plan.guidance], dtype=np.float32) if plan.guidance != 1.0 else None
        on_device = self.provider != PROVIDER_NAMES["cpu"]
        x = ort.OrtValue.ortvalue_from_numpy(x_T, "cuda", 0) if on_device else x_T
        for i in reversed(range(len(table))):
            t = np.full(len(x_T), plan.coefs.timesteps[i], dtype=np.int64)
            z = streams.next() if table[i, 2] != 0.0 else zeros
            if on_device:
                x = session.run_iobinding(x, t, z, table[i], y=y, w=w)
                if i % FUSED_CHECK_EVERY == 0:
                    on_step(i, x.numpy())
                elif on_step is not None:
                    on_step(i, None)
            else:
                x = session.run(x, t, z, table[i], y=y, w=w)
                on_step(i, x)
        return x.numpy() if on_device else x

    def _fused_session(self, guided: bool):
        import onnx

        from runtime.step_graph import StepSession, build_step_graph

        key = "guided" if guided else "plain"
        if self._step_session is None:
            self._step_session = {}
        if key not in self._step_session:
            model = onnx.load(str(self.path))
            step = build_step_graph(model, guided=guided, null_class=self.contract.null_class)
            self._step_session[key] = StepSession(step, self.backend.providers, self.backend.session_options)
        return self._step_session[key]


def load(path: str | os.PathLike, provider: str = "auto", *, threads: int | None = None, cpu_arena: bool = True,
         provider_options: dict | None = None, session_options=None,
         log: Callable[[str], None] | None = None) -> Generator:
    """Load an exported model (``.onnx``, or TorchScript ``.pt`` which needs torch) for generation.

    ``provider``: auto (the best that actually starts: tensorrt, cuda, then cpu), cpu, cuda or tensorrt.
    ``threads`` (onnxruntime intra-op threads) and ``cpu_arena`` (its CPU memory arena) set up the session;
    ``provider_options`` go to the chosen GPU provider (e.g. ``{"cudnn_conv_algo_search": "EXHAUSTIVE"}``);
    ``session_options`` (an ``onnxruntime.SessionOptions``) replaces all session settings.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if provider not in ("auto", *PROVIDER_NAMES):
        raise ModelError(f"unknown provider {provider!r} (expected auto, {', '.join(PROVIDER_NAMES)})")
    if _is_torchscript(path):
        from runtime.torchscript_model import TorchScriptModel

        device = "cpu"
        if provider in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                device = "cuda"
            elif provider == "cuda":
                raise ModelError("provider cuda: torch sees no CUDA device")
        return Generator(TorchScriptModel(path, device), path, log)
    order = AUTO_ORDER if provider == "auto" else (provider,)
    failures = []
    for name in order:
        try:
            options = provider_options if name == provider or (provider == "auto" and name == "cuda") else None
            model = OnnxModel(path, name, threads=threads, cpu_arena=cpu_arena, provider_options=options,
                              session_options=session_options, quiet=provider == "auto")
        except ModelError:
            if name == "cpu" or provider != "auto":
                raise
            failures.append(PROVIDER_NAMES[name])  # auto: any failure off the CPU means "try the next one"
            continue
        if failures:
            log(f"provider auto: {', '.join(failures)} did not start here; using {model.provider}")
        return Generator(model, path, log)
    raise AssertionError("unreachable: the CPU provider always starts")


def _is_torchscript(path: Path) -> bool:
    """TorchScript files are zip archives (torch.jit.save); ONNX files are protobuf."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
