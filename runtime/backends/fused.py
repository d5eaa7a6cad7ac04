"""The fused sampling loop: each step is one call of the ONNX step graph (``runtime.backends.step_graph``).

``sample_fused(step, x_T, coefs, noise, on_step=...)`` has the signature of ``samplers.sample`` with a
``FusedStep`` in place of the predictor: the update (and guidance, on the steps whose scale is not 1) runs inside
onnxruntime. On a GPU provider x and the step's state (the previous x̂₀ of a multistep solver) stay on the device
between steps (IOBinding); x is copied to the host only every ``FINITE_CHECK_EVERY`` steps and at the end, to
check that it is finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.sampling.plan import TABLE_COLUMNS, StepCoefficients
from runtime.sampling.samplers import NoiseFn, OnStep

FINITE_CHECK_EVERY = 25
_DTYPES = {"x_t": np.float32, "z": np.float32, "x0_prev": np.float32, "t": np.int64, "y": np.int64}
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

    def _feed(self, t, z, x0_prev, coef, y, w) -> dict[str, Any]:
        """Checked inputs other than x_t: numpy arrays or OrtValues (t, z, x0_prev, y), float32 coef (8,), w (1,)."""
        feed: dict[str, Any] = {"t": t, "z": z, "x0_prev": x0_prev}
        if y is not None:
            feed["y"] = y
        for name, value in feed.items():
            _check_dtype(name, value)
        feed["coef"] = np.asarray(coef, dtype=np.float32).reshape(len(TABLE_COLUMNS))
        if w is not None:
            feed["w"] = np.asarray(w, dtype=np.float32).reshape(1)
        if {"x_t", *feed} != set(self.input_names):
            raise ValueError(f"this step model takes inputs {self.input_names}, got {['x_t', *feed]}")
        return feed

    def run(self, x_t: np.ndarray, t: np.ndarray, z: np.ndarray, x0_prev: np.ndarray, coef: np.ndarray,
            y: np.ndarray | None = None, w: float | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One step on the host: x_t, z, x0_prev float32 (B,C,H,W); t, y int64 (B,); coef (8,) and w (1,) are
        cast to float32. Returns (x_next, x0_hat) float32 (B,C,H,W). Other dtypes of x_t, z, x0_prev, t, y raise
        TypeError."""
        _check_dtype("x_t", x_t)
        feed = {"x_t": x_t, **self._feed(t, z, x0_prev, coef, y, w)}
        x_next, x0_hat = self.session.run(["x_next", "x0_hat"], feed)
        return x_next, x0_hat

    def run_iobinding(self, x_t, t, z, x0_prev, coef, y=None, w=None, *, device_id: int | None = None):
        """One step with x_t and x0_prev ``OrtValue``s (float32 (B,C,H,W), on any device); returns (x_next,
        x0_hat) as OrtValues on the same device, to feed back as the next step's x_t and x0_prev without a host
        copy. t, y (int64 (B,)) and z (float32 (B,C,H,W)) may be numpy arrays or OrtValues. OrtValue has no
        device id accessor: ``device_id`` defaults to the session's first provider's ``device_id`` (or 0)."""
        import onnxruntime as ort

        _check_dtype("x_t", x_t)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("x_t", x_t)
        for name, value in self._feed(t, z, x0_prev, coef, y, w).items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        device = x_t.device_name().lower()
        if device_id is None:
            options = self.session.get_provider_options().get(self.session.get_providers()[0], {})
            device_id = 0 if device == "cpu" else int(options.get("device_id", 0))
        binding.bind_output("x_next", device, device_id)
        binding.bind_output("x0_hat", device, device_id)
        self.session.run_with_iobinding(binding)
        x_next, x0_hat = binding.get_outputs()
        return x_next, x0_hat


class FusedStep:
    """The step sessions of a plan (``sessions[guided]``: the plain and, where some step is guided, the guided
    graph) bound to one batch's labels ``y``.

    ``step(x, x0_prev, t, w, z, coef)`` makes one step with guidance scale w (the plain graph where w = 1) and
    returns (x_next, x0_hat); with ``on_device`` they are OrtValues on CUDA device 0 between steps.
    """

    def __init__(self, sessions: dict[bool, StepSession], y: np.ndarray | None, on_device: bool) -> None:
        self.sessions, self.y, self.on_device = sessions, y, on_device

    def upload(self, x: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0) if self.on_device else x

    def download(self, x) -> np.ndarray:
        return x.numpy() if self.on_device else x

    def __call__(self, x, x0_prev, t: int, w: float, z: np.ndarray, coef: np.ndarray):
        tt = np.full((x.shape()[0] if self.on_device else x.shape[0],), t, dtype=np.int64)
        guided = w != 1.0
        ww = np.array([w], dtype=np.float32) if guided else None
        run = self.sessions[guided].run_iobinding if self.on_device else self.sessions[guided].run
        return run(x, tt, z, x0_prev, coef, y=self.y, w=ww)


def sample_fused(step: FusedStep, x_T: np.ndarray, coefs: StepCoefficients, noise: NoiseFn, *,
                 on_step: OnStep | None = None) -> np.ndarray:
    """``samplers.sample`` through the step graph: the same steps, the same ``noise(i)`` calls, float32.

    ``on_step(i, x)`` gets x on the host, or None on the device steps between finiteness checks.
    """
    table, timesteps, w = coefs.table(), coefs.timesteps.tolist(), coefs.guidance.tolist()
    zeros = np.zeros_like(x_T)
    x, x0 = step.upload(x_T), step.upload(zeros)
    for i in reversed(range(len(table))):
        z = noise(i) if coefs.noise_coef[i] != 0.0 else zeros
        x, x0 = step(x, x0, timesteps[i], w[i], z, table[i])
        if on_step is not None:
            on_host = not step.on_device or i % FINITE_CHECK_EVERY == 0
            on_step(i, step.download(x) if on_host else None)
    return step.download(x)


def _check_dtype(name: str, value: Any) -> None:
    want = _DTYPES[name]
    got = value.data_type() if hasattr(value, "data_type") else getattr(value, "dtype", type(value))
    if got != _ORT_TYPES[want] and got != want:
        raise TypeError(f"step input {name!r} must be {np.dtype(want).name}, got {got}")
