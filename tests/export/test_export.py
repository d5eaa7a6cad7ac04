"""ddpm-export end to end: artifacts, embedded contracts, dynamic batch, weights choice, verification that fails."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from click.testing import CliRunner

import ddpm_export.export as export_module
from ddpm_export.checkpoint import load_checkpoint
from ddpm_export.cli import main
from runtime.metadata import CONTRACT_KEY, SamplingContract
from runtime.tolerances import TOLERANCES

FP32, FP16 = TOLERANCES["fp32"], TOLERANCES["fp16"]
ATOL, RTOL = FP32.atol, FP32.rtol  # per-call ε of an fp32 export


def export(*args: str):
    result = CliRunner().invoke(main, [*args])
    return result


def eager(ckpt: Path, weights: str | None = None):
    net, _ = load_checkpoint(ckpt).build_unet(weights)
    return net


def test_onnx_export_is_self_describing_and_batch_dynamic(uncond_ckpt, fresh_copy):
    ckpt = fresh_copy(uncond_ckpt)
    r = export(str(ckpt), "--format", "onnx")
    assert r.exit_code == 0, r.output
    path = ckpt.with_suffix(".onnx")
    assert f"wrote {path}" in r.output and "verification: passed" in r.output
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.producer_name == "ddpm-toolkit"
    ins = {i.name: (i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
           for i in model.graph.input}
    assert ins == {"x": (onnx.TensorProto.FLOAT, ["batch", 1, 16, 16]), "t": (onnx.TensorProto.INT64, ["batch"])}
    assert [o.name for o in model.graph.output] == ["eps"]

    contract = SamplingContract.from_json({p.key: p.value for p in model.metadata_props}[CONTRACT_KEY])
    assert contract.image_size == 16 and contract.channels == 1 and contract.schedule.timesteps == 100
    assert contract.ema and contract.provenance.training_steps == 4
    assert contract.provenance.exporter.startswith("torch.onnx.export")

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net = eager(ckpt)
    for batch in (1, 37):
        x = np.random.default_rng(batch).standard_normal((batch, 1, 16, 16)).astype(np.float32)
        t = np.random.default_rng(batch).integers(0, 100, batch)
        with torch.no_grad():
            ref = net(torch.from_numpy(x), torch.from_numpy(t)).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x, "t": t})[0], ref, atol=ATOL, rtol=RTOL)

    report = json.loads(path.with_name(path.name + ".report.json").read_text())
    assert report["verification"] == "passed" and report["checks"]["passed"]
    assert report["checks"]["tolerance"] == dataclasses.asdict(FP32)
    cpu = report["checks"]["results"][0]
    assert cpu["backend"] == "onnx:CPUExecutionProvider" and cpu["eps"]["calls"] == 5
    assert {"case", "index", "t", "abs_diff"} <= set(cpu["eps"]["worst"])
    assert cpu["trajectory"]["steps"] == 20 and cpu["trajectory"]["max_level_diff"] <= FP32.max_levels


def test_conditional_rgb_export_all_formats(cond_rgb_ckpt, fresh_copy):
    ckpt = fresh_copy(cond_rgb_ckpt)
    r = export(str(ckpt), "--format", "all", "--out", str(ckpt.parent / "model"))
    assert r.exit_code == 0, r.output
    onnx_path, ts_path = ckpt.parent / "model.onnx", ckpt.parent / "model.pt"
    assert onnx_path.is_file() and ts_path.is_file()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "t", "y"]
    net = eager(ckpt)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    t, y = np.array([0, 50, 99, 7]), np.array([0, 1, 2, 3])  # 3 = the null label
    with torch.no_grad():
        ref = net(*(torch.from_numpy(a) for a in (x, t, y))).numpy()
    np.testing.assert_allclose(session.run(None, {"x": x, "t": t, "y": y})[0], ref, atol=ATOL, rtol=RTOL)
    for path in (onnx_path, ts_path):
        report = json.loads(path.with_name(path.name + ".report.json").read_text())
        assert report["verification"] == "passed"
        assert report["checks"]["results"][0]["trajectory"]["guidance"] == 2.0  # the guided path is exercised


def test_ema_and_raw_weights(uncond_ckpt, fresh_copy, tmp_path):
    ckpt = fresh_copy(uncond_ckpt)
    outs = {}
    for weights in ("ema", "raw"):
        path = tmp_path / f"{weights}.onnx"
        assert export(str(ckpt), "--weights", weights, "--out", str(path), "--no-verify").exit_code == 0
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x, t = np.ones((2, 1, 16, 16), np.float32), np.array([10, 90])
        outs[weights] = session.run(None, {"x": x, "t": t})[0]
        with torch.no_grad():
            ref = eager(ckpt, weights)(torch.from_numpy(x), torch.from_numpy(t)).numpy()
        np.testing.assert_allclose(outs[weights], ref, atol=ATOL, rtol=RTOL)
        meta = session.get_modelmeta().custom_metadata_map
        assert SamplingContract.from_json(meta[CONTRACT_KEY]).ema == (weights == "ema")
    assert np.abs(outs["ema"] - outs["raw"]).max() > 1e-4


def test_no_ema_checkpoint_defaults_to_raw_and_refuses_ema(no_ema_ckpt, fresh_copy):
    ckpt = fresh_copy(no_ema_ckpt)
    r = export(str(ckpt), "--weights", "ema")
    assert r.exit_code != 0 and "no EMA weights" in r.output
    assert not ckpt.with_suffix(".onnx").exists()
    r = export(str(ckpt), "--no-verify")
    assert r.exit_code == 0, r.output
    assert "verification: skipped: --no-verify" in r.output
    contract = SamplingContract.from_json(
        ort.InferenceSession(str(ckpt.with_suffix(".onnx"))).get_modelmeta().custom_metadata_map[CONTRACT_KEY])
    assert contract.ema is False


def test_perturbed_export_fails_verification_and_leaves_no_artifact(uncond_ckpt, fresh_copy, monkeypatch):
    """Weights changed between export and verification: non-zero exit, a failed report, no model file."""
    real_export = export_module.export_onnx

    def broken_export(*args, **kwargs):
        model = real_export(*args, **kwargs)
        init = next(i for i in model.graph.initializer if onnx.numpy_helper.to_array(i).ndim == 4)
        perturbed = onnx.numpy_helper.to_array(init) + 0.05
        init.CopyFrom(onnx.numpy_helper.from_array(perturbed.astype(np.float32), init.name))
        return model

    monkeypatch.setattr(export_module, "export_onnx", broken_export)
    ckpt = fresh_copy(uncond_ckpt)
    r = export(str(ckpt))
    assert r.exit_code != 0
    assert "verification of onnx (fp32) failed" in r.output and "Traceback" not in r.output
    assert not ckpt.with_suffix(".onnx").exists()
    assert not list(ckpt.parent.glob(".*partial*"))
    report = json.loads(ckpt.with_name("uncond.onnx.report.json").read_text())
    assert report["verification"] == "failed"
    worst = report["checks"]["results"][0]["eps"]["worst"]
    assert worst["abs_diff"] > ATOL and worst["case"]


def test_optimized_copy_keeps_contract_and_verifies(uncond_ckpt, fresh_copy):
    ckpt = fresh_copy(uncond_ckpt)
    r = export(str(ckpt), "--optimize")
    assert r.exit_code == 0, r.output
    opt = ckpt.with_name("uncond.opt.onnx")
    meta = ort.InferenceSession(str(opt)).get_modelmeta().custom_metadata_map
    assert SamplingContract.from_json(meta[CONTRACT_KEY]).image_size == 16
    assert json.loads(opt.with_name(opt.name + ".report.json").read_text())["verification"] == "passed"


def test_fp16_keeps_sensitive_ops_in_fp32_and_never_claims_unmeasured_success(cond_rgb_ckpt, fresh_copy):
    ckpt = fresh_copy(cond_rgb_ckpt)
    r = export(str(ckpt), "--fp16")
    assert r.exit_code == 0, r.output
    path = ckpt.with_name("cond.fp16.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    assert all(i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
               for i in model.graph.input)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    sensitive = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "Softmax", "Sin", "Cos")]
    assert sensitive and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in sensitive)
    assert any(types.get(n.input[1]) == onnx.TensorProto.FLOAT16 for n in model.graph.node if n.op_type == "Conv")
    report = json.loads(path.with_name(path.name + ".report.json").read_text())
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        assert report["verification"] == "passed"
    else:
        assert report["verification"].startswith("skipped: fp16 targets CUDAExecutionProvider")
        assert ("verification: skipped" in r.output
                and "passed" not in r.output.split("cond.fp16.onnx")[1].split("\n")[0])
        assert report["checks"]["informational"][0]["trajectory"]["max_level_diff"] <= FP16.max_levels


def test_export_leaves_model_mode_and_weights_unchanged(uncond_ckpt):
    from ddpm_export.onnx_export import export_onnx
    from ddpm_export.torchscript_export import export_torchscript

    ckpt = load_checkpoint(uncond_ckpt)
    net, used_ema = ckpt.build_unet()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_onnx(net, ckpt.contract(ema=used_ema))
    assert net.training
    export_torchscript(net, ckpt.contract(ema=used_ema))
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("training", "ddpm_export", "runtime", "pytorch_lightning", "lightning"):
                raise ImportError(name + " is blocked in this process")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    extra = {"ddpm_contract.json": ""}
    m = torch.jit.load(sys.argv[1], _extra_files=extra)
    contract = json.loads(extra["ddpm_contract.json"])
    x = torch.from_numpy(np.load(sys.argv[2]))
    t = torch.tensor([0, 50, 99])
    np.save(sys.argv[3], m(x, t).detach().numpy())
    m(x[:1], t[:1])  # batch 1 works too
    print(contract["image_size"], contract["provenance"]["exporter"])
    """
)


def test_torchscript_loads_in_a_fresh_process_without_this_package(uncond_ckpt, fresh_copy, tmp_path):
    ckpt = fresh_copy(uncond_ckpt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = export(str(ckpt), "--format", "torchscript")
    assert r.exit_code == 0, r.output
    # torch deprecates TorchScript: said once, in our words, and torch's own notices stay off the console
    notes = [line for line in r.stderr.splitlines() if "deprecates TorchScript" in line]
    assert notes == ["note: torch deprecates TorchScript (torch.jit) in favour of torch.export; --format pt2 is its "
                     "successor (docs/export.md: which format to choose)"], r.stderr
    assert not [w for w in caught if "torch.jit" in str(w.message)], [str(w.message) for w in caught]
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(ckpt.with_suffix(".pt")), str(tmp_path / "x.npy"),
                        str(tmp_path / "eps.npy")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["16", "torch.jit.trace"]
    with torch.no_grad():
        ref = eager(ckpt)(torch.from_numpy(x), torch.tensor([0, 50, 99])).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "eps.npy"), ref, atol=ATOL, rtol=RTOL)
