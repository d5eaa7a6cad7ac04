"""The OpenVINO backend (the ``openvino`` extra): the exported ONNX file as it is, compiled by OpenVINO's CPU plugin,
in bf16 where the CPU computes it (AMX or AVX-512 BF16) and fp32 elsewhere; torch-free. ``KIND`` is its descriptor.

``--provider auto`` never picks it: auto must not change the images a user gets, and bf16 changes them (a mean of
about one uint8 level, a few trajectories far more: ``runtime.tolerances``), as would a default that depends on
which extras happen to be installed. It runs when asked for: ``--provider openvino``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from runtime.backends.backend import Backend, BackendKind, LoadOptions, host_engine, predicted
from runtime.backends.onnx_file import check_graph, contract_of, feed, is_onnx
from runtime.backends.precision import Precision
from runtime.backends.providers import Provider
from runtime.backends.stage_file import stage_file
from runtime.errors import ModelError
from runtime.metadata import CONTRACT_KEY, STAGE_KEY

PROVIDER = Provider("openvino", "openvino:CPU")
HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16"}  # INFERENCE_PRECISION_HINT for each precision it runs
_DTYPES = {"f32": "float32", "f16": "float16", "i64": "int64"}


def require_openvino():
    """``openvino``, or a one-line ``ModelError`` naming the extra."""
    try:
        import openvino
    except ImportError:
        raise ModelError("provider openvino needs OpenVINO: pip install 'ddpm-toolkit[openvino]'") from None
    return openvino


def cpu_bf16(core) -> bool:
    """Whether OpenVINO computes bf16 on this CPU (it reports BF16 where the CPU has AMX or AVX-512 BF16)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def reason(e: BaseException) -> str:
    """OpenVINO's error report as one line: its message lines without the source locations it stacks above them."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return " ".join(said or lines) or type(e).__name__


def _ports(values) -> list:
    return [(v.get_any_name(), _DTYPES.get(v.get_element_type().get_type_name(), str(v.get_element_type())),
             [d.get_length() if d.is_static else None for d in v.get_partial_shape()]) for v in values]


class OpenVinoModel:
    """``predict_eps(x, t, y=None) -> ε`` through OpenVINO on the CPU, computing in ``precision`` (None: bf16 where
    the CPU has it, else fp32). ``threads``: OpenVINO's inference threads (default: all cores); ``config``: more
    compile properties. Each thread that calls ``predict_eps`` gets its own infer request."""

    device = "cpu"
    prefers_device_loop = False  # the host loop: the fused step does not pay here (docs/benchmarks.md)

    def __init__(self, path: str | os.PathLike, precision: Precision | None = None, *, threads: int | None = None,
                 config: dict | None = None) -> None:
        ov = require_openvino()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file {path} does not exist")
        core = ov.Core()
        bf16 = cpu_bf16(core)
        self.precision: Precision = precision or ("bf16" if bf16 else "fp32")
        if self.precision not in HINTS:
            raise ModelError(f"--dtype {self.precision}: OpenVINO runs {' or '.join(HINTS)}")
        if self.precision == "bf16" and not bf16:
            raise ModelError(f"--dtype bf16: this CPU ({core.get_property('CPU', 'FULL_DEVICE_NAME')}) has no bf16 "
                             "(AMX or AVX-512 BF16); fp32 is what it can run (--dtype fp32)")
        try:
            model = core.read_model(str(self.path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError with a multi-line report
            raise ModelError(f"OpenVINO cannot read {path}: {reason(e)}") from None
        meta = {k: model.get_rt_info(["framework", k]).astype(str) for k in (CONTRACT_KEY, STAGE_KEY)
                if model.has_rt_info(["framework", k])}
        self.contract = contract_of(meta, path)
        check_graph(self.contract.denoiser, _ports(model.inputs), _ports(model.outputs), path)
        properties = {"INFERENCE_PRECISION_HINT": HINTS[self.precision], **(config or {})}
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        self.compiled = self._compile(core, model, properties, path)
        self.decoder = None  # a latent model's decoder, compiled with the same properties
        if (stage := self.contract.decoder) is not None:
            decoder = stage_file(self.path, stage)
            try:
                graph = core.read_model(str(decoder))
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"OpenVINO cannot read {decoder}: {reason(e)}") from None
            check_graph(stage, _ports(graph.inputs), _ports(graph.outputs), decoder)
            self.decoder = self._compile(core, graph, properties, decoder)
        self.provider = PROVIDER.full_name
        self._input_names = [i.get_any_name() for i in model.inputs]
        self._local = threading.local()

    @staticmethod
    def _compile(core, model, properties: dict, path):
        try:
            return core.compile_model(model, "CPU", properties)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"OpenVINO cannot compile {path}: {reason(e)}") from None

    def _request(self, name: str, compiled):
        """This thread's infer request of ``compiled`` (a request reuses its buffers: one per thread)."""
        request = getattr(self._local, name, None)
        if request is None:
            request = compiled.create_infer_request()
            setattr(self._local, name, request)
        return request

    def predict_eps(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """x: (B, C, H, W) float32, t: (B,) int64, y: (B,) int64 for conditional models -> ε (B, C, H, W) float32."""
        request = self._request("denoiser", self.compiled)
        request.infer(feed(x, t, y, self._input_names, self.path))
        out = np.array(request.get_output_tensor(0).data, dtype=np.float32)  # a copy: the request reuses its buffer
        return predicted(out, self.contract)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """The decoder stage on host arrays (``Backend.decode``)."""
        request = self._request("decoder", self.decoder)
        request.infer({"z": np.ascontiguousarray(z, dtype=np.float32)})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    def device_engine(self):
        """The host engine: OpenVINO's arrays are the host's."""
        return host_engine(self)


def _load(path: Path, provider: str, dtype: Precision | None, o: LoadOptions) -> Backend:
    return OpenVinoModel(path, dtype, threads=o.threads, config=o.provider_options)


KIND = BackendKind(
    name="openvino", format="onnx", suffix=".onnx", recognise=is_onnx, providers=(PROVIDER,), auto=(),
    precisions=tuple(HINTS), writes=(), verify=("openvino",), host="openvino", load=_load)
