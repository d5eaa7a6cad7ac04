"""The onnxruntime backend: an exported noise predictor in a session, its contract, and its fused step loop."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from pathlib import Path

import numpy as np

from runtime.backends.providers import PROVIDER_NAMES, full_name
from runtime.errors import ContractError, ModelError, reason
from runtime.metadata import CONTRACT_KEY, SamplingContract


def _contract_of(session, path) -> SamplingContract:
    meta = session.get_modelmeta().custom_metadata_map
    if CONTRACT_KEY not in meta:
        raise ModelError(f"{path} carries no sampling contract ('{CONTRACT_KEY}' metadata); export it with ddpm-export")
    try:
        return SamplingContract.from_json(meta[CONTRACT_KEY])
    except ContractError as e:
        raise ModelError(f"{path}: {e}") from None


def _session(path, providers: list, options, quiet: bool = False):
    import onnxruntime as ort

    if not Path(path).is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        # onnxruntime print()s an "EP Error" banner to stdout when a provider fails and it falls back;
        # stdout is for results, so the banner goes to stderr.
        with contextlib.redirect_stdout(io.StringIO() if quiet else sys.stderr):
            return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad file
        raise ModelError(f"cannot load {path} with {providers[0]}: {reason(e)}") from None


_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


def _check_graph(session, contract: SamplingContract, path) -> None:
    """Everything the contract claims about the graph's inputs and outputs (names, dtypes, fixed dimensions)."""
    for kind, specs, values in (("inputs", contract.inputs, session.get_inputs()),
                                ("outputs", contract.outputs, session.get_outputs())):
        graph = {v.name: v for v in values}
        if sorted(graph) != sorted(s.name for s in specs):
            raise ModelError(f"{path}: its contract names {kind} {[s.name for s in specs]} but the graph has "
                             f"{sorted(graph)}")
        for spec in specs:
            v = graph[spec.name]
            fixed = [(want, got) for want, got in zip(spec.shape, v.shape)
                     if isinstance(want, int) and isinstance(got, int)]
            if _ORT_TYPES[spec.dtype] != v.type or len(spec.shape) != len(v.shape) or any(w != g for w, g in fixed):
                raise ModelError(f"{path}: its contract says {spec.name} is {spec.dtype} {spec.shape} but the graph "
                                 f"takes {v.type} {v.shape} (image_size, channels or dtype disagree)")


class OnnxModel:
    """``predict_eps(x, t, y=None) -> ε`` through onnxruntime; ``contract`` says how to sample from it.

    ``provider`` is ``cpu``, ``cuda`` or ``tensorrt`` (or a full onnxruntime provider name), with
    ``provider_options`` passed to it (e.g. ``{"cudnn_conv_algo_search": "EXHAUSTIVE"}`` for CUDA); ``threads``
    and ``cpu_arena`` set the session, or ``session_options`` replaces all session settings. A provider that
    onnxruntime lists but cannot start (it silently falls back to the CPU) raises ``ModelError``; ``quiet``
    keeps onnxruntime's own multi-line log of that failure off stderr (for probing).
    """

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", *, threads: int | None = None,
                 cpu_arena: bool = True, provider_options: dict | None = None, session_options=None,
                 quiet: bool = False) -> None:
        import onnxruntime as ort

        name = full_name(provider)
        first = (name, dict(provider_options)) if provider_options else name
        self.providers = [first] if name == PROVIDER_NAMES["cpu"] else [first, PROVIDER_NAMES["cpu"]]
        if session_options is None:
            session_options = ort.SessionOptions()
            if threads:
                session_options.intra_op_num_threads = threads
            session_options.enable_cpu_mem_arena = cpu_arena
        self.session_options = session_options
        self.path = Path(path)
        if quiet and name != PROVIDER_NAMES["cpu"]:  # a provider that cannot start logs a multi-line error
            ort.set_default_logger_severity(4)
        try:
            self.session = _session(path, self.providers, session_options, quiet)
        finally:
            ort.set_default_logger_severity(2)
        if self.session.get_providers()[0] != name:
            raise ModelError(f"{name} did not start for {path} "
                             f"(onnxruntime fell back to {self.session.get_providers()[0]})")
        self.provider = name
        self.contract = _contract_of(self.session, path)
        _check_graph(self.session, self.contract, path)
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._step_sessions: dict[tuple[bool, int], object] = {}
        self._step_lock = threading.Lock()

    @property
    def prefers_device_loop(self) -> bool:
        """GPU providers run the fused step loop by default (x stays on the device)."""
        return self.provider != PROVIDER_NAMES["cpu"]

    def predict_eps(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """x: (B, C, H, W) float32, t: (B,) int64, y: (B,) int64 for conditional models -> ε (B, C, H, W) float32."""
        feed = {"x": np.ascontiguousarray(x, dtype=np.float32), "t": np.ascontiguousarray(t, dtype=np.int64)}
        if y is not None:
            feed["y"] = np.ascontiguousarray(y, dtype=np.int64)
        if set(feed) != set(self._input_names):
            raise ValueError(f"{self.path} takes inputs {self._input_names}, got {sorted(feed)}")
        return self.session.run(None, feed)[0]

    def device_engine(self):
        """The batch engine with the fused step (``runtime.backends.fused``): one step graph call per step, x and the
        history kept on the device on a GPU provider. Each step graph (plain or guided, by history width) is built
        from the model file once, when first needed, with the same providers and session settings as the model."""
        from runtime.backends.fused import FusedStep, fused_ops
        from runtime.sampling.engine import Engine

        on_device = self.prefers_device_loop
        return Engine(None, fused_ops("cuda" if on_device else None), null_class=self.contract.null_class,
                      fused=FusedStep(self._step_session, on_device))

    def _step_session(self, guided: bool, history: int):
        from runtime.backends.fused import StepSession

        with self._step_lock:
            if (guided, history) not in self._step_sessions:
                import onnx

                from runtime.backends.step_graph import build_step_graph

                null = self.contract.null_class if guided else None
                step = build_step_graph(onnx.load(str(self.path)), null_class=null, history=history)
                self._step_sessions[guided, history] = StepSession(step, self.providers, self.session_options)
            return self._step_sessions[guided, history]
