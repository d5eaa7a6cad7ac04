"""``runtime.load(model)`` → ``Pipeline``: images in batches from a backend and a sampling plan.

Run settings (seed, sampler, steps, classes, guidance, batch size) are arguments; everything else comes from
the model's contract. Image k depends only on (seed, k) and the settings — not on the batch size, the shard,
the thread or the backend (within float tolerance). Backends are loaded once; ``generate`` may be called from
several threads at once (each call keeps its state on its own stack).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from runtime.backends.backend import Backend, LoadOptions, host_engine
from runtime.backends.precision import Precision
from runtime.backends.registry import load_backend
from runtime.bundled import resolve
from runtime.classes import Classes, class_index, labels
from runtime.errors import GenerationError
from runtime.files import sha256_file
from runtime.sampling.noise import NoiseStreams
from runtime.sampling.plan import SamplingPlan, make_plan
from runtime.sampling.settings import RunSettings


class Pipeline:
    """A loaded model ready to sample: ``contract``, ``provider``, ``precision``, ``sha256``, ``plan`` and
    ``generate``."""

    def __init__(self, backend: Backend, log: Callable[[str], None] | None = None) -> None:
        self.backend = backend
        self.path = backend.path
        self.contract = backend.contract
        self.provider: str = backend.provider
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self._schedule = self.contract.schedule.build()
        self._sha256: str | None = None

    @property
    def precision(self) -> Precision:
        """What the network computes in: fp32, fp16 or bf16 (the backend's ``precision``)."""
        return self.backend.precision

    @property
    def runs_on(self) -> str:
        """What ran the model as summaries say it: the provider, and the precision where it is not fp32."""
        return self.provider if self.precision == "fp32" else f"{self.provider} ({self.precision})"

    @property
    def sha256(self) -> str:
        """SHA-256 of the model file (computed once)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def plan(self, settings: RunSettings | None = None, *, model_defaults: bool = True, **given) -> SamplingPlan:
        """``runtime.sampling.plan.make_plan`` for this model: ``settings`` and keyword run settings (``sampler=``,
        ``steps=``, ``eta=``, ``guidance=``, ``guidance_interval=``, ``clip_denoised=``, ``variance=``: the fields
        of ``runtime.sampling.settings.RunSettings``); those left None take the model's recommendations (unless
        ``model_defaults`` is False), then the runtime's defaults."""
        return make_plan(self.contract, settings, model_defaults=model_defaults, schedule=self._schedule, **given)

    def progress_steps(self, plan: SamplingPlan) -> int:
        """How many times ``generate_batches`` calls ``progress`` for a batch: the sampler steps, and the decode of a
        latent model."""
        return len(plan.coefs.timesteps) + (self.contract.decoder is not None)

    def labels(self, indices: Sequence[int], classes: Classes) -> np.ndarray | None:
        """(B,) int64 labels of the images ``indices`` (see ``runtime.classes.labels``)."""
        return labels(self.contract, indices, classes)

    def class_index(self, value: int | str) -> int:
        return class_index(self.contract, value)

    def generate(self, n: int, *, seed: int = 0, batch_size: int = 64, classes: Classes = None, start_index: int = 0,
                 fused: bool | None = None, model_defaults: bool = True, settings: RunSettings | None = None,
                 **given) -> np.ndarray:
        """Images ``start_index … start_index+n−1``: (n, H, W, C) uint8. Run settings as for ``plan``."""
        if n < 1:
            raise GenerationError(f"n must be positive, got {n}")
        plan = self.plan(settings, model_defaults=model_defaults, **given)
        indices = list(range(start_index, start_index + n))
        batches = self.generate_batches(indices, plan, seed=seed, batch_size=batch_size,
                                        labels=self.labels(indices, classes), fused=fused)
        return np.concatenate([images for _, _, images in batches])

    def generate_batches(self, indices: Sequence[int], plan: SamplingPlan, *, seed: int, batch_size: int,
                         labels: np.ndarray | None = None, progress: Callable[[int], None] | None = None,
                         fused: bool | None = None) -> Iterator[tuple[list[int], np.ndarray | None, np.ndarray]]:
        """Yield (indices, labels, uint8 images (B, H, W, C)) batch by batch for the given image indices.

        ``progress(k)`` is called after each sampler step with the batch's size, and once more after a latent
        model's decode (``progress_steps`` calls a batch in all). The batch engine
        (``runtime.sampling.engine``) advances each batch; ``fused`` gives it the backend's device form (the fused
        ONNX step, or torch tensors on the device; default: where the backend prefers it, i.e. on GPUs).
        """
        if batch_size < 1:
            raise GenerationError(f"batch size must be positive, got {batch_size}")
        if seed < 0:
            raise GenerationError(f"seed must be non-negative, got {seed}")
        c, backend = self.contract, self.backend
        shape = c.latent_shape
        on_device = backend.prefers_device_loop if fused is None else fused
        engine = backend.device_engine() if on_device else host_engine(backend)
        for start in range(0, len(indices), batch_size):
            batch = list(indices[start:start + batch_size])
            y = None if labels is None else labels[start:start + batch_size]
            # noise is drawn ahead on threads while the predictor runs; they end with the batch, also on errors
            with NoiseStreams(seed, batch, shape, draws=plan.coefs.draws) as streams:
                engine.add(plan.coefs, batch, streams, y)
                while True:
                    tick = engine.tick()
                    if tick.failed:
                        raise GenerationError(f"{tick.failed[0][1]}; no images were written for this batch")
                    if progress is not None:
                        progress(len(batch))
                        if tick.out is not None and c.decoder is not None:
                            progress(len(batch))  # the decode, in the tick that finished the batch
                    if tick.out is not None:
                        break
            yield batch, y, tick.out


def load(model: str | os.PathLike, provider: str = "auto", *, dtype: Precision | None = None,
         threads: int | None = None, cpu_arena: bool = True, provider_options: dict | None = None,
         session_options=None, log: Callable[[str], None] | None = None) -> Pipeline:
    """Load an exported model (``.onnx``; TorchScript ``.pt`` and ``.pt2``, which need torch) for generation.

    ``model`` is a file, or the name of a model bundled with the package (``fashion-mnist``); a latent model's
    ``.onnx`` finds its decoder stage beside it (the file its contract names, checked by SHA-256).
    ``provider``: auto (for ONNX the best onnxruntime provider that actually starts: tensorrt, cuda, then cpu),
    cpu, cuda, tensorrt or openvino (the openvino extra; never chosen by auto): ``runtime.backends.registry``.
    ``dtype``: the precision to compute in (fp32, fp16, bf16; None: the backend's choice: OpenVINO takes bf16 where
    the CPU has it, the other backends what the file was exported in).
    ``threads`` (intra-op threads) and ``cpu_arena`` (onnxruntime's CPU memory arena) set up the session;
    ``provider_options`` go to the chosen provider (e.g. ``{"cudnn_conv_algo_search": "EXHAUSTIVE"}`` for CUDA,
    compile properties for OpenVINO); ``session_options`` (an ``onnxruntime.SessionOptions``) replaces all
    onnxruntime session settings.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    path, _ = resolve(os.fspath(model))
    options = LoadOptions(threads=threads, cpu_arena=cpu_arena, provider_options=provider_options,
                          session_options=session_options, log=log)
    return Pipeline(load_backend(path, provider, dtype=dtype, options=options), log)
