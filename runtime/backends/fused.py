"""The fused step: one call of the ONNX step graph (``runtime.backends.step_graph``) per step of a batch on one row.

``StepSession`` runs a step graph on host arrays or, with IOBinding, on onnxruntime values kept on the device.
``FusedStep`` is the batch engine's ``fused`` hook (``runtime.sampling.engine.Engine``): the predictor, guidance and
the update run inside onnxruntime, with x and the H history tensors on the device between steps (``fused_ops``);
x comes to the host only every ``runtime.sampling.engine.FINITE_CHECK_EVERY`` steps and at the end, for the NaN
check and the finish.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from runtime.sampling.engine import NUMPY, Ops
from runtime.sampling.table import COLUMNS

_ORT_TYPES = {np.float32: "tensor(float)", np.int64: "tensor(int64)"}


class StepSession:
    """An onnxruntime session over a ``build_step_graph`` model.

    ``providers`` are onnxruntime provider entries (e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``).
    ``conditional`` / ``guided`` say whether the model takes ``y`` / ``w``; ``history`` how many earlier d's (h1 …).
    """

    def __init__(self, step_model, providers: list, session_options=None) -> None:
        import onnxruntime as ort

        data = step_model if isinstance(step_model, bytes) else step_model.SerializeToString()
        self.session = ort.InferenceSession(data, sess_options=session_options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.conditional = "y" in self.input_names
        self.guided = "w" in self.input_names
        self.history = sum(1 for name in self.input_names if name[:1] == "h" and name[1:].isdigit())

    def _feed(self, t, z, history: Sequence, coef, y, w) -> dict[str, Any]:
        """Checked inputs other than x_t: numpy arrays or OrtValues (t, z, h1 …, y), float32 coef, w (1,)."""
        feed: dict[str, Any] = {"t": (t, np.int64), "z": (z, np.float32)}
        feed |= {f"h{j + 1}": (h, np.float32) for j, h in enumerate(history)}
        if y is not None:
            feed["y"] = (y, np.int64)
        for name, (value, dtype) in feed.items():
            _check_dtype(name, value, dtype)
        feed = {name: value for name, (value, _) in feed.items()}
        feed["coef"] = np.asarray(coef, dtype=np.float32).reshape(-1)
        if w is not None:
            feed["w"] = np.asarray(w, dtype=np.float32).reshape(1)
        if {"x_t", *feed} != set(self.input_names):
            raise ValueError(f"this step model takes inputs {self.input_names}, got {['x_t', *feed]}")
        if feed["coef"].shape != (len(COLUMNS) + self.history,):
            raise ValueError(f"this step model takes {len(COLUMNS) + self.history} coefficients, "
                             f"got {feed['coef'].size}")
        return feed

    def run(self, x_t: np.ndarray, t: np.ndarray, z: np.ndarray, history: Sequence[np.ndarray], coef: np.ndarray,
            y: np.ndarray | None = None, w: float | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """One step on the host: x_t, z, history float32 (B,C,H,W); t, y int64 (B,); coef and w are cast to
        float32. Returns (x_next, d) float32 (B,C,H,W), d None for a graph without history. Other dtypes of x_t, z,
        the history, t, y raise TypeError."""
        _check_dtype("x_t", x_t, np.float32)
        feed = {"x_t": x_t, **self._feed(t, z, history, coef, y, w)}
        out = self.session.run(self.output_names, feed)
        return out[0], (out[1] if len(out) > 1 else None)

    def run_iobinding(self, x_t, t, z, history, coef, y=None, w=None, *, device_id: int | None = None):
        """One step with x_t and the history as ``OrtValue``s (float32 (B,C,H,W), on any device); returns (x_next,
        d) as OrtValues on the same device, to feed back as the next step's x_t and h1 without a host copy. t, y
        (int64 (B,)) and z (float32 (B,C,H,W)) may be numpy arrays or OrtValues. OrtValue has no device id
        accessor: ``device_id`` defaults to the session's first provider's ``device_id`` (or 0)."""
        import onnxruntime as ort

        _check_dtype("x_t", x_t, np.float32)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("x_t", x_t)
        for name, value in self._feed(t, z, history, coef, y, w).items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        device = x_t.device_name().lower()
        if device_id is None:
            options = self.session.get_provider_options().get(self.session.get_providers()[0], {})
            device_id = 0 if device == "cpu" else int(options.get("device_id", 0))
        for name in self.output_names:
            binding.bind_output(name, device, device_id)
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        return out[0], (out[1] if len(out) > 1 else None)


def fused_ops(device: str | None) -> Ops:
    """The engine's arrays for the fused step: numpy (``device`` None), or ``OrtValue``s on ``device`` ("cuda": CUDA
    device 0; "cpu" runs the same IOBinding path on the host). The fused step runs whole batches on one row, so rows
    are gathered only when images leave early (a NaN): through the host."""
    if device is None:
        return NUMPY
    import onnxruntime as ort

    def upload(a):
        if isinstance(a, ort.OrtValue):
            return a
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0)

    def host(a):
        return a.numpy() if isinstance(a, ort.OrtValue) else np.asarray(a)

    def put(a, rows, values):
        raise ValueError("the fused step runs whole batches on one row: it writes no rows in place")

    return Ops(concat=lambda arrays: upload(np.concatenate([host(a) for a in arrays])),
               take=lambda a, rows: upload(host(a)[rows]), put=put, upload=upload, download=host,
               zeros_like=lambda a: upload(np.zeros(a.shape(), np.float32)), on_host=device == "cpu")


class FusedStep:
    """The engine's ``fused`` hook: ``(x, history, t, w, z, row, y) -> (x_next, d)`` through the step graph of the
    row's guidance (the plain graph where w = 1) and history width, ``session(guided, history)`` making it;
    ``on_device``: x and the history are ``OrtValue``s (``fused_ops(device)``), run with IOBinding."""

    def __init__(self, session: Callable[[bool, int], StepSession], on_device: bool) -> None:
        self.session, self.on_device = session, on_device
        self._zeros: dict[tuple, np.ndarray] = {}

    def __call__(self, x, history: Sequence, t: int, w: float, z, row: np.ndarray, y):
        shape = tuple(x.shape()) if self.on_device else x.shape
        if z is None:
            z = self._zeros.setdefault(shape, np.zeros(shape, np.float32))
        guided = w != 1.0
        session = self.session(guided, len(history))
        tt = np.full((shape[0],), t, dtype=np.int64)
        ww = np.array([w], dtype=np.float32) if guided else None
        run = session.run_iobinding if self.on_device else session.run
        return run(x, tt, z, history, row, y=y, w=ww)


def _check_dtype(name: str, value: Any, want: type) -> None:
    got = value.data_type() if hasattr(value, "data_type") else getattr(value, "dtype", type(value))
    if got != _ORT_TYPES[want] and got != want:
        raise TypeError(f"step input {name!r} must be {np.dtype(want).name}, got {got}")
