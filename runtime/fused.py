"""The fused sampling loop: each step is one call of the ONNX step graph (``runtime.step_graph``).

``sample_fused(step, x_T, coefs, noise, on_step=...)`` has the signature of ``samplers.sample`` with a
``FusedStep`` in place of the predictor: the update (and guidance, for a guided graph) runs inside onnxruntime.
On a GPU provider x stays on the device between steps (IOBinding) and is copied to the host only every
``FINITE_CHECK_EVERY`` steps and at the end, to check that it is finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.plan import StepCoefficients
from runtime.samplers import NoiseFn, OnStep

FINITE_CHECK_EVERY = 25
_DTYPES = {"x_t": np.float32, "z": np.float32, "t": np.int64, "y": np.int64}
_ORT_TYPES = {np.float32: "tensor(float)", np.int64: "tensor(int64)"}


class StepSession:
    """An onnxruntime session over a ``build_step_graph`` model.

    ``providers`` are onnxruntime provider entries (e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``).
    ``conditional`` / ``guided`` say whether the model takes ``y`` / ``w``.
    """

    def __init__(self, step_model, providers: list, session_options=None) -> None:
        import onnxruntime as ort

        data = step_model if isinstance(step_model, bytes) else step_model.SerializeToString()
        self.session = ort.InferenceSession(data, sess_options=session_options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.conditional = "y" in self.input_names
        self.guided = "w" in self.input_names

    def _feed(self, t, z, coef, y, w) -> dict[str, Any]:
        """Checked inputs other than x_t: numpy arrays or OrtValues (t, z, y), float32 coef (6,), w (1,)."""
        feed: dict[str, Any] = {"t": t, "z": z}
        if y is not None:
            feed["y"] = y
        for name, value in feed.items():
            _check_dtype(name, value)
        feed["coef"] = np.asarray(coef, dtype=np.float32).reshape(6)
        if w is not None:
            feed["w"] = np.asarray(w, dtype=np.float32).reshape(1)
        if {"x_t", *feed} != set(self.input_names):
            raise ValueError(f"this step model takes inputs {self.input_names}, got {['x_t', *feed]}")
        return feed

    def run(self, x_t: np.ndarray, t: np.ndarray, z: np.ndarray, coef: np.ndarray,
            y: np.ndarray | None = None, w: float | np.ndarray | None = None) -> np.ndarray:
        """One step on the host: x_t, z float32 (B,C,H,W); t, y int64 (B,); coef (6,) and w (1,) are cast
        to float32. Returns x_next float32 (B,C,H,W). Other dtypes of x_t, z, t, y raise TypeError."""
        _check_dtype("x_t", x_t)
        feed = {"x_t": x_t, **self._feed(t, z, coef, y, w)}
        return self.session.run(["x_next"], feed)[0]

    def run_iobinding(self, x_t, t, z, coef, y=None, w=None, *, device_id: int | None = None):
        """One step with x_t an ``OrtValue`` (float32 (B,C,H,W), on any device); returns x_next as an
        OrtValue on the same device, to feed back as the next step's x_t without a host copy.
        t, y (int64 (B,)) and z (float32 (B,C,H,W)) may be numpy arrays or OrtValues. OrtValue has no
        device id accessor: ``device_id`` defaults to the session's first provider's ``device_id`` (or 0)."""
        import onnxruntime as ort

        _check_dtype("x_t", x_t)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("x_t", x_t)
        for name, value in self._feed(t, z, coef, y, w).items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        device = x_t.device_name().lower()
        if device_id is None:
            options = self.session.get_provider_options().get(self.session.get_providers()[0], {})
            device_id = 0 if device == "cpu" else int(options.get("device_id", 0))
        binding.bind_output("x_next", device, device_id)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]


class FusedStep:
    """A ``StepSession`` bound to one batch's labels ``y`` and a plan's guidance ``w`` (None: not guided).

    ``step(x, t, z, coef)`` makes one step; with ``on_device`` x is an OrtValue on CUDA device 0 between steps.
    """

    def __init__(self, session: StepSession, y: np.ndarray | None, guidance: float | None, on_device: bool) -> None:
        self.session, self.y, self.on_device = session, y, on_device
        self.w = None if guidance is None else np.array([guidance], dtype=np.float32)

    def upload(self, x: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0) if self.on_device else x

    def download(self, x) -> np.ndarray:
        return x.numpy() if self.on_device else x

    def __call__(self, x, t: int, z: np.ndarray, coef: np.ndarray):
        tt = np.full((x.shape()[0] if self.on_device else x.shape[0],), t, dtype=np.int64)
        if self.on_device:
            return self.session.run_iobinding(x, tt, z, coef, y=self.y, w=self.w)
        return self.session.run(x, tt, z, coef, y=self.y, w=self.w)


def sample_fused(step: FusedStep, x_T: np.ndarray, coefs: StepCoefficients, noise: NoiseFn, *,
                 on_step: OnStep | None = None) -> np.ndarray:
    """``samplers.sample`` through the step graph: the same steps, the same ``noise(i)`` calls, float32.

    ``on_step(i, x)`` gets x on the host, or None on the device steps between finiteness checks.
    """
    table, timesteps = coefs.table(), coefs.timesteps.tolist()
    zeros = np.zeros_like(x_T)
    x = step.upload(x_T)
    for i in reversed(range(len(table))):
        z = noise(i) if coefs.noise_coef[i] != 0.0 else zeros
        x = step(x, timesteps[i], z, table[i])
        if on_step is not None:
            on_host = not step.on_device or i % FINITE_CHECK_EVERY == 0
            on_step(i, step.download(x) if on_host else None)
    return step.download(x)


def _check_dtype(name: str, value: Any) -> None:
    want = _DTYPES[name]
    got = value.data_type() if hasattr(value, "data_type") else getattr(value, "dtype", type(value))
    if got != _ORT_TYPES[want] and got != want:
        raise TypeError(f"step input {name!r} must be {np.dtype(want).name}, got {got}")
