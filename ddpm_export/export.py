"""Model source → verified ONNX / TorchScript / .pt2 artifacts, each with a JSON report beside it.

``export_source`` exports any ``ddpm_export.source.ModelSource``; ``export_checkpoint`` opens a path first (a
``ddpm-train`` checkpoint or a diffusers folder: what ``ddpm-export`` calls) and ``export_module`` takes any PyTorch
module with its contract. Every artifact is written under a temporary name, loaded back the way users load it
(``runtime.load``, through the table of backends ``runtime.backends.registry.BACKENDS``) and checked against the
eager network; it is renamed only after its verification passed, so a failed or interrupted export never leaves a
file that looks valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx

from ddpm_export.errors import ExportError
from ddpm_export.fp16 import to_fp16
from ddpm_export.onnx_export import DEFAULT_OPSET, export_decoder_onnx, export_onnx, input_output_summary
from ddpm_export.pt2_export import EXPORTER as PT2_EXPORTER
from ddpm_export.pt2_export import Device, export_pt2
from ddpm_export.source import ModelSource, open_source
from ddpm_export.torchscript_export import EXPORTER as TS_EXPORTER
from ddpm_export.torchscript_export import export_torchscript, save_torchscript
from ddpm_export.verify import VerificationReport, torch_decoder, torch_net, verify_backend
from runtime.backends.backend import Backend, Format
from runtime.backends.precision import Precision
from runtime.backends.providers import Provider
from runtime.backends.registry import BACKENDS, FORMATS
from runtime.backends.step_graph import MIN_OPSET
from runtime.errors import ModelError, reason
from runtime.files import atomic_path, atomic_paths, atomic_write, check_writable
from runtime.metadata import CONTRACT_KEY, RunDefaults, SamplingContract
from runtime.pipeline import load
from runtime.tolerances import TOLERANCES

DECODER_SUFFIX = ".decoder.onnx"  # a latent model's decoder: <stem>.decoder.onnx beside <stem>.onnx

# Which --dtype each format is written in: its kind's ``writes`` (ONNX fp16: a <stem>.fp16.onnx copy beside the fp32
# model). The per-call check judges the export, not the provider's arithmetic mode: it runs with the provider's
# ``strict`` options (onnxruntime's CUDA provider computes fp32 convolutions and matmuls in TF32 by default); the
# trajectory check runs with the provider's defaults, as generation does.


@dataclass
class ExportOptions:
    source: str | Path | None = None  # a checkpoint file or a diffusers folder (None: export_module's module)
    formats: tuple[Format, ...] = ("onnx",)
    out: str | Path | None = None
    weights: Literal["ema", "raw"] | None = None  # checkpoints: which weights
    opset: int = DEFAULT_OPSET
    fp16: bool = False  # the same as dtype="fp16" (its older name, for ONNX)
    verify: bool = True
    optimize: bool = False
    run_defaults: RunDefaults | None = None  # run settings the model recommends; given ones replace the source's
    device: Device = "cpu"  # .pt2: the device it is compiled for
    dtype: Precision = "fp32"  # ONNX: fp16 also writes <stem>.fp16.onnx; .pt2: the precision it computes in
    scheduler_config: str | Path | None = None  # diffusers: the scheduler of a bare UNet2DModel folder
    null_class: int | None = None  # diffusers: the label a class-conditional model was trained with for "no class"
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else self.dtype


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
    stages: list[Path] = field(default_factory=list)  # stage files beside it that belong to it (a decoder)

    def summary(self) -> str:
        beside = "".join(f" and {p}" for p in self.stages)
        return (f"wrote {self.path}{beside} ({self.format}, {self.precision}, {self.size_bytes / 1e6:.2f} MB, "
                f"exporter {self.exporter}); verification: {self.verification}; report: {self.report_path}")


def export_checkpoint(o: ExportOptions) -> list[Artifact]:
    """Export the checkpoint or diffusers folder ``o.source`` in every requested format; raises ``ExportError``
    (or ``CheckpointError``/``SourceError`` for a source that cannot be read)."""
    check_options(o)
    return export_source(open_source(o.source, weights=o.weights, scheduler_config=o.scheduler_config,
                                     null_class=o.null_class), o)


def export_module(module, contract: SamplingContract, out: str | Path, *, formats: tuple[Format, ...] = ("onnx",),
                  decoder=None, **options) -> list[Artifact]:
    """Export any PyTorch ``module`` — ``forward(x, t[, y])`` returning, per row at its own timestep, what
    ``contract.prediction`` names — with ``contract`` to ``out`` (a file for one format, a path stem for several).

    A latent model also passes its ``decoder`` (``forward(z)`` → the image in [-1, 1], z the latent as the contract's
    decoder stage scales it), with a contract whose ``stages`` say so (``runtime.metadata.latent_stages``).
    ``options`` are ``ExportOptions`` fields (``verify``, ``dtype``, ``opset``, ``run_defaults``, ``log`` …).
    """
    import torch

    import ddpm_export

    p = contract.provenance
    provenance = dataclasses.replace(p, package=p.package or "ddpm-toolkit",
                                     package_version=p.package_version or ddpm_export.__version__,
                                     torch_version=p.torch_version or torch.__version__,
                                     source=p.source or f"PyTorch module {type(module).__qualname__}")
    contract = dataclasses.replace(contract, provenance=provenance)
    shape = f"{contract.channels}x{contract.image_size}x{contract.image_size}"
    if contract.decoder is not None:
        shape = f"latent {'x'.join(map(str, contract.latent_shape))} -> image {shape} ({type(decoder).__qualname__})"
    source = ModelSource(module, contract, None, f"{type(module).__qualname__}: {shape}, {contract.prediction} "
                         "prediction", {"source": provenance.source}, decoder)
    o = ExportOptions(None, tuple(formats), out, **options)
    check_options(o)
    return export_source(source, o)


def check_options(o: ExportOptions) -> None:
    """Refuse option combinations that cannot be exported (one line each)."""
    if o.opset < MIN_OPSET or o.opset > onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {o.opset} is not supported: use {MIN_OPSET}..{onnx.defs.onnx_opset_version()} "
                          f"(attention and GroupNorm need at least {MIN_OPSET})")
    unknown = [f for f in o.formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown format {unknown[0]!r} (expected one of {', '.join(FORMATS)})")
    if o.precision not in {d for f in o.formats for d in FORMATS[f].writes}:
        fits = [f for f in FORMATS if o.precision in FORMATS[f].writes]
        raise ExportError(f"--dtype {o.precision} applies to {' and '.join(fits)} (not {', '.join(o.formats)})")


def export_source(source: ModelSource, o: ExportOptions) -> list[Artifact]:
    """Export ``source`` in every requested format; raises ``ExportError``."""
    if o.out is None and source.stem is None:
        raise ExportError("give the output path (out=): a module has no file to put artifacts beside")
    paths = _output_paths(source.stem, o)
    for p in paths.values():
        _check_writable(p)
    contract = source.contract
    if o.run_defaults is not None:  # given settings replace the source's recommendations
        base = contract.run_defaults or RunDefaults()
        contract = dataclasses.replace(contract, run_defaults=dataclasses.replace(base, **o.run_defaults.given()))
    if source.decoder is not None and contract.decoder is None:
        raise ExportError("a decoder module needs a contract with a decoder stage (runtime.metadata.latent_stages)")
    if source.decoder is None and contract.decoder is not None:
        raise ExportError("the contract has a decoder stage: pass its decoder module too (decoder=)")
    if contract.decoder is not None and "torchscript" in o.formats:
        raise ExportError("a latent model (a decoder after the denoiser) is written as ONNX (the model and its "
                          "decoder beside it) or .pt2 (both in one package), not TorchScript")
    o.log(source.description)
    reference = torch_net(source.network, contract=contract)
    artifacts = []
    if "onnx" in o.formats:
        artifacts += _export_onnx(source, contract, reference, paths["onnx"], o)
    if "torchscript" in o.formats:
        artifacts.append(_export_torchscript(source, contract, reference, paths["torchscript"], o))
    if "pt2" in o.formats:
        artifacts.append(_export_pt2(source, contract, reference, paths["pt2"], o))
    return artifacts


def _output_paths(stem: Path | None, o: ExportOptions) -> dict[str, Path]:
    if o.out is not None and len(o.formats) == 1:
        return {o.formats[0]: Path(o.out)}
    base = Path(o.out).with_suffix("") if o.out is not None else stem
    return {f: base.with_name(base.name + FORMATS[f].suffix) for f in o.formats}


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory")
    try:  # the way the artifact will be written (a temporary sibling): os.access misses read-only mounts and root
        check_writable(path)
    except OSError as e:
        raise ExportError(f"cannot write {path}: directory {parent} is not writable ({reason(e)})") from None


def _write_report(path: Path, data: dict) -> Path:
    report_path = path.with_name(path.name + ".report.json")
    atomic_write(report_path, (json.dumps(data, indent=2, default=str) + "\n").encode())
    return report_path


def _finish(path: Path, tmp: Path, fmt: str, precision: str, exporter: str, report: VerificationReport,
            skip_reason: str | None, extra: dict, source: ModelSource, o: ExportOptions,
            stages: list[Path] = ()) -> Artifact:
    """Always write the report; raise if the verification failed, so that ``atomic_path`` drops the artifact."""
    if report.failed:
        status = "failed"
    elif report.verified:
        status = "passed"
    else:
        status = f"skipped: {skip_reason or 'no backend could run it'}"
    size = tmp.stat().st_size
    data = {"artifact": str(path), "format": fmt, "precision": precision, "exporter": exporter, "size_bytes": size,
            **source.details, "verification": status, **extra, "checks": report.to_dict()}
    report_path = _write_report(path, data)
    if status == "failed":
        failures = "; ".join(r.summary() for r in report.results + report.informational if not r.passed)
        raise ExportError(f"verification of {fmt} ({precision}) failed, nothing written: {failures} "
                          f"(details in {report_path})")
    for r in report.results + report.informational:
        o.log(f"  {r.summary()}")
    return Artifact(path, fmt, precision, exporter, size, status, report_path, list(stages))


def _load(tmp: Path, provider: str, report: VerificationReport, what: str, dtype: Precision | None = None,
          **session) -> Backend | None:
    """The artifact loaded as users load it (``runtime.load``), or None with the reason recorded as skipped."""
    try:
        return load(tmp, provider, dtype=dtype, log=lambda msg: None, **session).backend
    except ModelError as e:
        report.skipped.append({"backend": what, "reason": str(e)})
        return None


def _onnx_backends(tmp: Path, report: VerificationReport, dtype: Precision = "fp32",
                   only: tuple[str, ...] | None = None) -> Iterator[tuple[Provider, Backend]]:
    """The ONNX artifact computing in ``dtype`` on each provider export checks it on (every ONNX kind's ``verify``,
    or those of them named in ``only``), with its ``Provider``; those that do not start are recorded as skipped with
    the reason, and a provider whose ``after`` did not start is not tried."""
    failed = set()
    for kind in BACKENDS:
        names = [name for name in kind.verify if kind.format == "onnx" and (only is None or name in only)]
        for p in map(kind.provider, names):
            if p.after in failed:
                report.skipped.append({"backend": f"onnx:{p.full_name}",
                                       "reason": f"needs {p.after}, which did not start"})
                continue
            backend = _load(tmp, p.name, report, f"onnx:{p.full_name}", dtype)
            if backend is None:
                failed.add(p.name)
            else:
                yield p, backend


def _decoders(decoder, m: Backend) -> tuple | None:
    """A latent model's decoders for the checks: the eager ``decoder`` module and the loaded backend's (None: a pixel
    model)."""
    return None if decoder is None else (torch_decoder(decoder), m.decode)


def _verify_onnx_fp32(tmp: Path, p: Provider, m: Backend, reference, contract: SamplingContract,
                      report: VerificationReport, decoder=None):
    """The fp32 checks on one provider: per-call output with strict fp32 arithmetic (its ``strict`` options), the
    trajectories as generation runs them; a latent model's ``decoder`` (the eager module) through both."""
    options = p.strict or None
    strict = (_load(tmp, p.name, report, f"onnx:{m.provider} (strict fp32)", "fp32", provider_options=options)
              if options else m)
    if strict is None:
        return None
    return verify_backend(f"onnx:{m.provider}", reference, strict.predict_eps, contract,
                          trajectory_candidate=m.predict_eps, decoders=_decoders(decoder, strict),
                          settings={"eps": options or "provider defaults", "trajectory": "provider defaults"})


def _with_decoder_file(contract: SamplingContract, file: str | None, sha256: str | None) -> SamplingContract:
    """The contract with its decoder stage in ``file`` (beside the model file; its ``sha256``), or in the model
    file itself (None)."""
    if contract.decoder is None:
        return contract
    stage = dataclasses.replace(contract.decoder, file=file, sha256=sha256)
    return dataclasses.replace(contract, stages=[contract.denoiser, stage])


def _export_onnx(source: ModelSource, contract: SamplingContract, reference, path: Path,
                 o: ExportOptions) -> list[Artifact]:
    stage_paths, stage_bytes, stages = [], b"", {}
    if source.decoder is not None:  # its own file beside the model, named and bound by sha256 in the contract
        stage_paths = [path.with_name(path.stem + DECODER_SUFFIX)]
        _check_writable(stage_paths[0])
        o.log(f"exporting the decoder to ONNX (opset {o.opset}) -> {stage_paths[0]} ...")
        stage_bytes = export_decoder_onnx(source.decoder, contract, opset=o.opset).SerializeToString()
        digest = hashlib.sha256(stage_bytes).hexdigest()
        contract = _with_decoder_file(contract, stage_paths[0].name, digest)
        stages = {"decoder": {"path": str(stage_paths[0]), "sha256": digest, "size_bytes": len(stage_bytes)}}
    o.log(f"exporting ONNX (opset {o.opset}) ...")
    model = export_onnx(source.network, contract, opset=o.opset)
    exported = SamplingContract.from_json({p.key: p.value for p in model.metadata_props}[CONTRACT_KEY])
    exporter = exported.provenance.exporter
    extra = {"opset": o.opset, **input_output_summary(model), "contract": exported.to_dict(),
             **({"stages": stages} if stages else {})}
    artifacts = []
    with atomic_paths(path, *stage_paths) as (tmp, *stage_tmps):
        onnx.save_model(model, str(tmp))
        for stage_tmp in stage_tmps:
            stage_tmp.write_bytes(stage_bytes)
        report = VerificationReport(dataclasses.asdict(TOLERANCES["fp32"]))
        if o.verify:
            for p, m in _onnx_backends(tmp, report):
                o.log(f"verifying on {m.provider} ...")
                if (result := _verify_onnx_fp32(tmp, p, m, reference, contract, report, source.decoder)) is not None:
                    report.results.append(result)
        artifacts.append(_finish(path, tmp, "onnx", "fp32", exporter, report,
                                 None if o.verify else "--no-verify", extra, source, o, stage_paths))
    if o.optimize:
        artifacts.append(_export_optimized(path, reference, contract, exporter, extra, source, o))
    if o.precision == "fp16":
        artifacts.append(_export_fp16(model, path, reference, contract, exporter, extra, source, o))
    return artifacts


def _export_optimized(path: Path, reference, contract, exporter: str, extra: dict, source: ModelSource,
                      o: ExportOptions) -> Artifact:
    """onnxruntime's extended graph optimizations saved to ``<stem>.opt.onnx`` (for the CPU provider)."""
    import onnxruntime as ort

    out = path.with_name(path.stem + ".opt.onnx")
    _check_writable(out)
    o.log(f"optimizing with onnxruntime (ORT_ENABLE_EXTENDED) -> {out} ...")
    with atomic_path(out) as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp)
        cpu = FORMATS["onnx"].provider("cpu").full_name
        ort.InferenceSession(str(path), so, providers=[cpu])
        report = VerificationReport(dataclasses.asdict(TOLERANCES["fp32"]))
        if o.verify:
            for _, m in _onnx_backends(tmp, report, only=("cpu",)):
                report.results.append(verify_backend(f"onnx-optimized:{m.provider}", reference, m.predict_eps,
                                                     contract, decoders=_decoders(source.decoder, m)))
        extra = {**extra, "optimized_for": cpu, "graph_optimization_level": "ORT_ENABLE_EXTENDED"}
        return _finish(out, tmp, "onnx", "fp32-optimized", exporter, report,
                       None if o.verify else "--no-verify", extra, source, o)


def _export_fp16(model: onnx.ModelProto, path: Path, reference, contract, exporter: str, extra: dict,
                 source: ModelSource, o: ExportOptions) -> Artifact:
    """The fp16 copy ``<stem>.fp16.onnx``, verified on the CUDA provider it targets (trajectory vs fp32 eager)."""
    out = path.with_name(path.stem + ".fp16.onnx")
    _check_writable(out)
    o.log(f"converting to fp16 -> {out} ...")
    with atomic_path(out) as tmp:
        onnx.save_model(to_fp16(model), str(tmp))
        report = VerificationReport(dataclasses.asdict(TOLERANCES["fp16"]))
        reason = "--no-verify"
        if o.verify:
            for _, m in _onnx_backends(tmp, report, "fp16", only=("cuda",)):
                o.log(f"verifying fp16 on {m.provider} ...")
                report.results.append(verify_backend(f"onnx-fp16:{m.provider}", reference, m.predict_eps, contract,
                                                     "fp16", decoders=_decoders(source.decoder, m)))
            reason = None
            if not report.results:  # not the target provider: a CPU run can fail the export, never pass it
                for _, m in _onnx_backends(tmp, report, "fp16", only=("cpu",)):
                    o.log("CUDA is not available; checking fp16 on the CPU provider (informational) ...")
                    r = verify_backend(f"onnx-fp16:{m.provider}", reference, m.predict_eps, contract, "fp16",
                                       decoders=_decoders(source.decoder, m))
                    report.informational.append(r)
                    reason = (f"fp16 targets {FORMATS['onnx'].provider('cuda').full_name}, which cannot run here "
                              f"(on {m.provider}, not the target: trajectory max Δ "
                              f"{r.trajectory.max_level_diff} uint8 levels)")
        return _finish(out, tmp, "onnx", "fp16", exporter, report, reason, extra, source, o)


TORCHSCRIPT_DEPRECATED = ("note: torch deprecates TorchScript (torch.jit) in favour of torch.export; --format pt2 is "
                          "its successor (docs/export.md: which format to choose)")


def _export_torchscript(source: ModelSource, contract: SamplingContract, reference, path: Path,
                        o: ExportOptions) -> Artifact:
    o.log(TORCHSCRIPT_DEPRECATED)
    o.log("exporting TorchScript (torch.jit.trace) ...")
    contract = _exported_by(contract, TS_EXPORTER)
    module, warned = export_torchscript(source.network, contract, strict=not o.verify)
    if warned:
        o.log(f"  {len(warned)} tracer warning(s), e.g. {warned[0]}; the verification checks the trace on other "
              "batch sizes and timesteps")
    with atomic_path(path) as tmp:
        save_torchscript(module, contract, tmp)
        report = VerificationReport(dataclasses.asdict(TOLERANCES["fp32"]))
        on = FORMATS["torchscript"].verify[0]
        if o.verify and (loaded := _load(tmp, on, report, f"torchscript:{on}")) is not None:
            report.results.append(verify_backend(loaded.provider, reference, loaded.predict_eps, contract))
        return _finish(path, tmp, "torchscript", "fp32", TS_EXPORTER, report, None if o.verify else "--no-verify",
                       {"tracer_warnings": warned, "contract": contract.to_dict()}, source, o)


def _export_pt2(source: ModelSource, contract: SamplingContract, reference, path: Path, o: ExportOptions) -> Artifact:
    """torch.export + AOTInductor for ``o.device`` at ``o.dtype``; verified on that device by loading the file."""
    o.log(f"exporting .pt2 (torch.export + AOTInductor for {o.device}, {o.precision}; compiling takes a while) ...")
    contract = _exported_by(contract, PT2_EXPORTER)
    contract = _with_decoder_file(contract, None, None)  # both stages in the one package
    with atomic_path(path) as tmp:
        export_pt2(source.network, contract, tmp, device=o.device, precision=o.precision, decoder=source.decoder)
        report = VerificationReport(dataclasses.asdict(TOLERANCES[o.precision]))
        if o.verify and (loaded := _load(tmp, o.device, report, f"pt2:{o.device}")) is not None:
            o.log(f"verifying on {loaded.provider} ...")  # on the device it targets
            report.results.append(verify_backend(loaded.provider, reference, loaded.predict_eps, contract, o.precision,
                                                 decoders=_decoders(source.decoder, loaded)))
        extra = {"device": o.device, "contract": contract.to_dict()}
        return _finish(path, tmp, "pt2", o.precision, PT2_EXPORTER, report, None if o.verify else "--no-verify",
                       extra, source, o)


def _exported_by(contract: SamplingContract, exporter: str) -> SamplingContract:
    import torch

    return dataclasses.replace(contract, provenance=dataclasses.replace(
        contract.provenance, exporter=exporter, exporter_version=torch.__version__))
