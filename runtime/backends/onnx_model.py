"""The onnxruntime backend: an exported noise predictor in a session, its contract, its fused step loop, and its
descriptor (``KIND``: the providers tensorrt, cuda and cpu)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from pathlib import Path

import numpy as np

from runtime.backends.backend import Backend, BackendKind, LoadOptions, predicted
from runtime.backends.onnx_file import check_graph, contract_of, feed, is_onnx
from runtime.backends.precision import Precision
from runtime.backends.providers import Provider, gpu_visible
from runtime.backends.stage_file import stage_file
from runtime.errors import ModelError, reason

PROVIDERS = (
    Provider("cpu", "CPUExecutionProvider"),
    Provider("cuda", "CUDAExecutionProvider", device="cuda", strict={"use_tf32": "0"},
             takes=("cudnn_conv_algo_search",)),
    Provider("tensorrt", "TensorrtExecutionProvider", device="cuda", after="cuda"),
)
_CPU, _CUDA = PROVIDERS[:2]
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def _provider(name: str) -> Provider:
    for p in PROVIDERS:
        if name in (p.name, p.full_name):
            return p
    return Provider(name, name)  # another onnxruntime provider, by its full name: its arrays bound in host memory


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


def _ports(values) -> list:
    return [(v.name, _DTYPES.get(v.type, v.type), [d if isinstance(d, int) else None for d in v.shape])
            for v in values]


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

        p = _provider(provider)
        first = (p.full_name, dict(provider_options)) if provider_options else p.full_name
        self.providers = [first] if p == _CPU else [first, _CPU.full_name]
        if session_options is None:
            session_options = ort.SessionOptions()
            if threads:
                session_options.intra_op_num_threads = threads
            session_options.enable_cpu_mem_arena = cpu_arena
        self.session_options = session_options
        self.path = Path(path)
        if quiet and p != _CPU:  # a provider that cannot start logs a multi-line error
            ort.set_default_logger_severity(4)
        try:
            self.session = _session(path, self.providers, session_options, quiet)
        finally:
            ort.set_default_logger_severity(2)
        self._started(self.session, p, path)
        self.provider, self.device = p.full_name, p.device
        self.contract = contract_of(self.session.get_modelmeta().custom_metadata_map, path)
        check_graph(self.contract.denoiser, _ports(self.session.get_inputs()), _ports(self.session.get_outputs()),
                    path)
        self.decoder = None  # a latent model's decoder: a session on its stage file, with the same providers
        if (stage := self.contract.decoder) is not None:
            decoder = stage_file(self.path, stage)
            self.decoder = _session(decoder, self.providers, session_options, quiet)
            self._started(self.decoder, p, decoder)
            check_graph(stage, _ports(self.decoder.get_inputs()), _ports(self.decoder.get_outputs()), decoder)
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._step_sessions: dict[tuple[bool, int], object] = {}
        self._step_lock = threading.Lock()
        self._precision: Precision | None = None

    @staticmethod
    def _started(session, p: Provider, path) -> None:
        if session.get_providers()[0] != p.full_name:
            raise ModelError(f"{p.full_name} did not start for {path} "
                             f"(onnxruntime fell back to {session.get_providers()[0]})")

    @property
    def precision(self) -> Precision:
        """fp16 for a file whose weights are float16 (``ddpm-export --dtype fp16``'s copy), else fp32; read from the
        file once, when first asked."""
        if self._precision is None:
            import onnx

            weights = onnx.load(str(self.path), load_external_data=False).graph.initializer
            half = any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
            self._precision = "fp16" if half else "fp32"
        return self._precision

    @property
    def prefers_device_loop(self) -> bool:
        """GPU providers run the fused step loop by default (x stays on the device)."""
        return self.device != "cpu"

    def predict_eps(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """x: (B, C, H, W) float32, t: (B,) int64, y: (B,) int64 for conditional models -> ε (B, C, H, W) float32."""
        inputs = feed(x, t, y, self._input_names, self.path)
        return predicted(self.session.run(None, inputs)[0], self.contract)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """The decoder stage on host arrays (``Backend.decode``)."""
        return self.decoder.run(None, {"z": np.ascontiguousarray(z, dtype=np.float32)})[0]

    def device_engine(self):
        """The batch engine with the fused step (``runtime.backends.fused``): one step graph call per step, x and the
        history kept on the provider's device off the CPU. Each step graph (plain or guided, by history width) is
        built from the model file once, when first needed, with the same providers and session settings as the
        model."""
        from runtime.backends.fused import FusedStep, fused_ops
        from runtime.sampling.engine import Engine
        from runtime.sampling.finish import finisher

        on_device = self.prefers_device_loop
        ops, finish = fused_ops(self.device if on_device else None), finisher(self.contract, self.decode)
        return Engine(None, ops, null_class=self.contract.null_class, fused=FusedStep(self._step_session, on_device),
                      finish=lambda x: finish(ops.download(x)))  # a decoder runs on host arrays

    def _step_session(self, guided: bool, history: int):
        from runtime.backends.fused import StepSession

        with self._step_lock:
            if (guided, history) not in self._step_sessions:
                import onnx

                from runtime.backends.step_graph import build_step_graph

                null = self.contract.null_class if guided else None
                step = build_step_graph(onnx.load(str(self.path)), null_class=null, history=history,
                                        prediction_channels=self.contract.prediction_channels)
                self._step_sessions[guided, history] = StepSession(step, self.providers, self.session_options)
            return self._step_sessions[guided, history]


def _load(path: Path, provider: str, dtype: Precision | None, o: LoadOptions) -> Backend:
    """``provider`` by name, or ``auto``: the first of ``KIND.auto`` that starts, where a GPU is visible
    (``gpu_visible``) saying which did not. GPU providers are probed quietly (onnxruntime logs a failure in several
    lines); one asked for by name that does not start is one ``ModelError``."""
    failures = []
    session = dict(threads=o.threads, cpu_arena=o.cpu_arena, session_options=o.session_options)
    for name in KIND.auto if provider == "auto" else (provider,):
        p = _provider(name)
        options = o.provider_options if name == provider or (provider == "auto" and p == _CUDA) else None
        try:
            model = OnnxModel(path, name, provider_options=options, quiet=p.on_gpu, **session)
        except ModelError as e:
            if p == _CPU or provider != "auto":
                if p.on_gpu and not gpu_visible():  # the quiet probe dropped onnxruntime's reason
                    raise ModelError(f"{e}; no NVIDIA GPU is visible here") from None
                raise
            failures.append(p.full_name)  # auto: any failure off the CPU means "try the next one"
            continue
        if failures and gpu_visible():  # without a GPU, that they did not start is no news
            o.log(f"provider auto: {', '.join(failures)} did not start here; using {model.provider}")
        return model
    raise AssertionError("unreachable: the CPU provider always starts")


KIND = BackendKind(
    name="onnxruntime", format="onnx", suffix=".onnx", recognise=is_onnx, providers=PROVIDERS,
    auto=("tensorrt", "cuda", "cpu"), precisions=("fp32", "fp16"), writes=("fp32", "fp16"),
    verify=("cpu", "cuda", "tensorrt"), host="cpu", load=_load)
