"""``export_checkpoint``: checkpoint → verified ONNX / TorchScript / .pt2 artifacts, each with a JSON report beside it.

Every artifact is written under a temporary name and renamed only after its verification passed, so a
failed or interrupted export never leaves a file that looks valid. What ``ddpm-export`` calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx

from ddpm_export.checkpoint import Checkpoint, load_checkpoint
from ddpm_export.errors import ExportError
from ddpm_export.fp16 import to_fp16
from ddpm_export.onnx_export import DEFAULT_OPSET, export_onnx, input_output_summary
from ddpm_export.pt2_export import EXPORTER as PT2_EXPORTER, Device, Precision, export_pt2
from ddpm_export.torchscript_export import EXPORTER as TS_EXPORTER, export_torchscript, save_torchscript
from ddpm_export.verify import VerificationReport, torch_net, verify_backend
from runtime.backends.backend import start_onnx
from runtime.generation.files import atomic_path, atomic_write
from runtime.metadata import CONTRACT_KEY, RunDefaults, SamplingContract
from runtime.backends.onnx_model import OnnxModel
from runtime.backends.step_graph import MIN_OPSET
from runtime.backends.providers import PROVIDER_NAMES
from runtime.tolerances import TOLERANCES
from runtime.backends.torchscript_model import TorchScriptModel

Format = Literal["onnx", "torchscript", "pt2"]
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
# The per-call ε check must judge the export, not the provider's arithmetic mode: onnxruntime's CUDA provider
# computes fp32 convolutions and matmuls in TF32 by default, so that check runs with TF32 off; the trajectory
# check runs with the provider's defaults, as generation does.
STRICT_FP32_OPTIONS = {"cuda": {"use_tf32": "0"}}


@dataclass
class ExportOptions:
    checkpoint: str | Path
    formats: tuple[Format, ...] = ("onnx",)
    out: str | Path | None = None
    weights: Literal["ema", "raw"] | None = None
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    verify: bool = True
    optimize: bool = False
    run_defaults: RunDefaults | None = None  # run settings the model recommends (in its contract)
    device: Device = "cpu"  # .pt2: the device it is compiled for
    dtype: Precision = "fp32"  # .pt2: the precision it computes in (float32 in and out either way)
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))


@dataclass
class Artifact:
    """One written file: what it is, how big, and how (or whether) it was verified."""

    path: Path
    format: str
    precision: str
    exporter: str
    size_bytes: int
    verification: str  # "passed", or "skipped: <why>"
    report_path: Path

    def summary(self) -> str:
        return (f"wrote {self.path} ({self.format}, {self.precision}, {self.size_bytes / 1e6:.2f} MB, "
                f"exporter {self.exporter}); verification: {self.verification}; report: {self.report_path}")


def export_checkpoint(o: ExportOptions) -> list[Artifact]:
    """Export the checkpoint in every requested format; raises ``ExportError`` (or ``CheckpointError``)."""
    if o.opset < MIN_OPSET or o.opset > onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {o.opset} is not supported: use {MIN_OPSET}..{onnx.defs.onnx_opset_version()} "
                          f"(attention and GroupNorm need at least {MIN_OPSET})")
    ckpt = load_checkpoint(o.checkpoint)
    paths = _output_paths(ckpt.path, o)
    for p in paths.values():
        _check_writable(p)
    net, used_ema = ckpt.build_unet(o.weights)
    contract = dataclasses.replace(ckpt.contract(ema=used_ema), run_defaults=o.run_defaults)
    o.log(f"{ckpt.path}: step {ckpt.global_step}, {'EMA' if used_ema else 'raw'} weights, "
          f"{contract.channels}x{contract.image_size}x{contract.image_size}, {contract.num_classes} classes")
    reference = torch_net(net)
    artifacts = []
    if "onnx" in o.formats:
        artifacts += _export_onnx(ckpt, net, contract, reference, paths["onnx"], o)
    if "torchscript" in o.formats:
        artifacts.append(_export_torchscript(ckpt, net, contract, reference, paths["torchscript"], o))
    if "pt2" in o.formats:
        artifacts.append(_export_pt2(net, contract, reference, paths["pt2"], o))
    return artifacts


def _output_paths(ckpt_path: Path, o: ExportOptions) -> dict[str, Path]:
    if o.out is not None and len(o.formats) == 1:
        return {o.formats[0]: Path(o.out)}
    base = Path(o.out).with_suffix("") if o.out is not None else ckpt_path.with_suffix("")
    return {f: base.with_name(base.name + SUFFIXES[f]) for f in o.formats}


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {path}: directory {parent} is not writable")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory")


def _write_report(path: Path, data: dict) -> Path:
    report_path = path.with_name(path.name + ".report.json")
    atomic_write(report_path, (json.dumps(data, indent=2, default=str) + "\n").encode())
    return report_path


def _finish(path: Path, tmp: Path, fmt: str, precision: str, exporter: str, report: VerificationReport,
            skip_reason: str | None, extra: dict, o: ExportOptions) -> Artifact:
    """Always write the report; raise if the verification failed, so that ``atomic_path`` drops the artifact."""
    if report.failed:
        status = "failed"
    elif report.verified:
        status = "passed"
    else:
        status = f"skipped: {skip_reason or 'no backend could run it'}"
    size = tmp.stat().st_size
    data = {"artifact": str(path), "format": fmt, "precision": precision, "exporter": exporter, "size_bytes": size,
            "checkpoint": str(o.checkpoint), "verification": status, **extra,
            "checks": report.to_dict()}
    report_path = _write_report(path, data)
    if status == "failed":
        failures = "; ".join(r.summary() for r in report.results + report.informational if not r.passed)
        raise ExportError(f"verification of {fmt} ({precision}) failed, nothing written: {failures} "
                          f"(details in {report_path})")
    for r in report.results + report.informational:
        o.log(f"  {r.summary()}")
    return Artifact(path, fmt, precision, exporter, size, status, report_path)


def _onnx_backends(tmp: Path, providers: tuple[str, ...], report: VerificationReport) -> Iterator[OnnxModel]:
    """An ``OnnxModel`` per provider that starts; the others are recorded as skipped with the reason.

    TensorRT is tried only where CUDA started.
    """
    cuda_failed = False
    for provider in providers:
        if provider == "tensorrt" and cuda_failed:
            report.skipped.append({"backend": "onnx:TensorrtExecutionProvider", "reason": "needs CUDA, which did not start"})
            continue
        ((_, model),) = start_onnx(tmp, (provider,), quiet=True)
        if isinstance(model, OnnxModel):
            yield model
        else:
            cuda_failed |= provider == "cuda"
            report.skipped.append({"backend": f"onnx:{PROVIDER_NAMES[provider]}", "reason": str(model)})


def _verify_onnx_fp32(tmp: Path, m: OnnxModel, reference, contract: SamplingContract):
    """The fp32 checks on one provider: per-call ε with strict fp32 arithmetic, the trajectory as generation runs."""
    short = next(k for k, v in PROVIDER_NAMES.items() if v == m.provider)
    options = STRICT_FP32_OPTIONS.get(short)
    strict = OnnxModel(tmp, short, provider_options=options, quiet=True) if options else m
    return verify_backend(f"onnx:{m.provider}", reference, strict.predict_eps, contract,
                          trajectory_candidate=m.predict_eps,
                          settings={"eps": options or "provider defaults", "trajectory": "provider defaults"})


def _export_onnx(ckpt: Checkpoint, net, contract: SamplingContract, reference, path: Path,
                 o: ExportOptions) -> list[Artifact]:
    o.log(f"exporting ONNX (opset {o.opset}) ...")
    model = export_onnx(net, contract, opset=o.opset)
    exported = SamplingContract.from_json({p.key: p.value for p in model.metadata_props}[CONTRACT_KEY])
    exporter = exported.provenance.exporter
    extra = {"opset": o.opset, "weights": "ema" if contract.ema else "raw", **input_output_summary(model),
             "contract": exported.to_dict()}
    artifacts = []
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
        report = VerificationReport(dataclasses.asdict(TOLERANCES["fp32"]))
        if o.verify:
            for m in _onnx_backends(tmp, tuple(PROVIDER_NAMES), report):
                o.log(f"verifying on {m.provider} ...")
                report.results.append(_verify_onnx_fp32(tmp, m, reference, contract))
        artifacts.append(_finish(path, tmp, "onnx", "fp32", exporter, report,
                                 None if o.verify else "--no-verify", extra, o))
    if o.optimize:
        artifacts.append(_export_optimized(path, reference, contract, exporter, extra, o))
    if o.fp16:
        artifacts.append(_export_fp16(model, path, reference, contract, exporter, extra, o))
    return artifacts


def _export_optimized(path: Path, reference, contract, exporter: str, extra: dict, o: ExportOptions) -> Artifact:
    """onnxruntime's extended graph optimizations saved to ``<stem>.opt.onnx`` (for the CPU provider)."""
    import onnxruntime as ort

    out = path.with_name(path.stem + ".opt.onnx")
    _check_writable(out)
    o.log(f"optimizing with onnxruntime (ORT_ENABLE_EXTENDED) -> {out} ...")
    with atomic_path(out) as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        report = VerificationReport(dataclasses.asdict(TOLERANCES["fp32"]))
        if o.verify:
            for m in _onnx_backends(tmp, ("cpu",), report):
                report.results.append(verify_backend(f"onnx-optimized:{m.provider}", reference, m.predict_eps, contract))
        extra = {**extra, "optimized_for": "CPUExecutionProvider", "graph_optimization_level": "ORT_ENABLE_EXTENDED"}
        return _finish(out, tmp, "onnx", "fp32-optimized", exporter, report,
                       None if o.verify else "--no-verify", extra, o)


def _export_fp16(model: onnx.ModelProto, path: Path, reference, contract, exporter: str, extra: dict,
                 o: ExportOptions) -> Artifact:
    """The fp16 copy ``<stem>.fp16.onnx``, verified on the CUDA provider it targets (trajectory vs fp32 eager)."""
    out = path.with_name(path.stem + ".fp16.onnx")
    _check_writable(out)
    o.log(f"converting to fp16 -> {out} ...")
    with atomic_path(out) as tmp:
        onnx.save_model(to_fp16(model), str(tmp))
        report = VerificationReport(dataclasses.asdict(TOLERANCES["fp16"]))
        reason = "--no-verify"
        if o.verify:
            for m in _onnx_backends(tmp, ("cuda",), report):
                o.log(f"verifying fp16 on {m.provider} ...")
                report.results.append(verify_backend(f"onnx-fp16:{m.provider}", reference, m.predict_eps, contract, "fp16"))
            reason = None
            if not report.results:  # not the target provider: a CPU run can fail the export, never pass it
                for m in _onnx_backends(tmp, ("cpu",), report):
                    o.log("CUDA is not available; checking fp16 on the CPU provider (informational) ...")
                    r = verify_backend(f"onnx-fp16:{m.provider}", reference, m.predict_eps, contract, "fp16")
                    report.informational.append(r)
                    reason = (f"fp16 targets CUDAExecutionProvider, which cannot run here "
                              f"(on CPUExecutionProvider, not the target: trajectory max Δ "
                              f"{r.trajectory.max_level_diff} uint8 levels)")
        return _finish(out, tmp, "onnx", "fp16", exporter, report, reason, extra, o)


def _export_torchscript(ckpt: Checkpoint, net, contract: SamplingContract, reference, path: Path,
                        o: ExportOptions) -> Artifact:
    o.log("exporting TorchScript (torch.jit.trace) ...")
    contract = dataclasses.replace(contract, provenance=dataclasses.replace(
        contract.provenance, exporter=TS_EXPORTER, exporter_version=contract.provenance.torch_version))
    module = export_torchscript(net, contract)
    with atomic_path(path) as tmp:
        save_torchscript(module, contract, tmp)
        report = VerificationReport(dataclasses.asdict(TOLERANCES["fp32"]))
        if o.verify:
            loaded = TorchScriptModel(tmp)  # verify what was written, not the object in memory
            report.results.append(verify_backend("torchscript:cpu", reference, loaded.predict_eps, contract))
        extra = {"weights": "ema" if contract.ema else "raw", "contract": contract.to_dict()}
        return _finish(path, tmp, "torchscript", "fp32", TS_EXPORTER, report,
                       None if o.verify else "--no-verify", extra, o)


def _export_pt2(net, contract: SamplingContract, reference, path: Path, o: ExportOptions) -> Artifact:
    """torch.export + AOTInductor for ``o.device`` at ``o.dtype``; verified on that device by loading the file."""
    from runtime.backends.pt2_model import Pt2Model

    o.log(f"exporting .pt2 (torch.export + AOTInductor for {o.device}, {o.dtype}; compiling takes a while) ...")
    import torch

    contract = dataclasses.replace(contract, provenance=dataclasses.replace(
        contract.provenance, exporter=PT2_EXPORTER, exporter_version=torch.__version__))
    with atomic_path(path) as tmp:
        export_pt2(net, contract, tmp, device=o.device, precision=o.dtype)
        report = VerificationReport(dataclasses.asdict(TOLERANCES[o.dtype]))
        if o.verify:
            loaded = Pt2Model(tmp)  # verify what was written, on the device it targets
            o.log(f"verifying on {loaded.provider} ...")
            report.results.append(verify_backend(loaded.provider, reference, loaded.predict_eps, contract, o.dtype))
        extra = {"weights": "ema" if contract.ema else "raw", "device": o.device, "contract": contract.to_dict()}
        return _finish(path, tmp, "pt2", o.dtype, PT2_EXPORTER, report, None if o.verify else "--no-verify", extra, o)
