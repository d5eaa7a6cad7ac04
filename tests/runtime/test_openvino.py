"""The OpenVINO backend (the openvino extra): the exported ONNX file as it is, in fp32 and bf16; what runs record of
its precision; its one-line errors. Tests that need OpenVINO skip without the extra; those of its absence run
everywhere (on a base install for real, elsewhere with the module hidden)."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import runtime
from runtime.backends import openvino_model
from runtime.backends.registry import FORMATS
from runtime.generate_cli import main
from runtime.tolerances import TOLERANCES
from tests.cli_checks import one_error_line

try:
    import openvino

    BF16_HERE = openvino_model.cpu_bf16(openvino.Core())
except ImportError:
    openvino = None
    BF16_HERE = False

needs_openvino = pytest.mark.skipif(openvino is None, reason="needs the openvino extra: pip install -e '.[openvino]'")
needs_bf16 = pytest.mark.skipif(not BF16_HERE, reason="needs the openvino extra" if openvino is None else
                                "OpenVINO computes no bf16 on this CPU (no AMX, no AVX-512 BF16)")
FP32 = TOLERANCES["fp32"]
QUIET = dict(log=lambda m: None)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@needs_openvino
def test_fp32_computes_what_onnxruntime_computes(cond_onnx):
    ort = runtime.load(cond_onnx, "cpu", **QUIET)
    ov = runtime.load(cond_onnx, "openvino", dtype="fp32", **QUIET)
    assert (ov.provider, ov.precision, ov.contract) == ("openvino:CPU", "fp32", ort.contract)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 16, 16)).astype(np.float32)
    t, y = np.array([0, 10, 50, 99, 3]), np.array([0, 1, 2, 3, 1])
    want = ort.backend.predict_eps(x, t, y)
    assert np.all(np.abs(ov.backend.predict_eps(x, t, y) - want) <= FP32.atol + FP32.rtol * np.abs(want))
    settings = dict(sampler="dpmpp-2m", steps=10, guidance=2.0)
    a, b = ort.generate(6, seed=1, **settings), ov.generate(6, seed=1, **settings)
    assert np.abs(a.astype(int) - b).max() <= FP32.max_levels


@needs_openvino
@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_images_do_not_depend_on_the_batch_size(dtype):
    """The bundled (trained) model, the recommended settings: bit for bit at batch sizes 1, 3 and 8."""
    g = runtime.load("fashion-mnist", "openvino", dtype=dtype, **QUIET)
    whole = g.generate(8, seed=2, batch_size=8)
    for batch_size in (1, 3):
        assert np.array_equal(g.generate(8, seed=2, batch_size=batch_size), whole), batch_size


@needs_openvino
@needs_bf16
def test_bf16_runs_of_the_trained_model_stay_within_their_tolerance():
    """bf16 judged the way export judges a precision: whole runs of a trained model against fp32."""
    tol = TOLERANCES["bf16-run"]
    fp32 = runtime.load("fashion-mnist", "cpu", **QUIET).generate(100, seed=0, batch_size=50).astype(int)
    g = runtime.load("fashion-mnist", "openvino", **QUIET)
    assert g.precision == "bf16"  # OpenVINO's default where the CPU has bf16
    diff = np.abs(g.generate(100, seed=0, batch_size=50) - fp32)
    assert diff.max() > 0  # it did compute in bf16
    assert diff.mean() <= tol.mean_levels and np.percentile(diff, 99) <= tol.p99_levels, (diff.mean(), diff.max())


def test_auto_never_picks_openvino(uncond_onnx):
    assert runtime.load(uncond_onnx, **QUIET).provider in {p.full_name for p in FORMATS["onnx"].providers}


@pytest.mark.parametrize("where", ["cli", "load", "serve"])
def test_without_the_extra_one_line_names_it(uncond_onnx, tmp_path, monkeypatch, where):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as on an install without the extra
    if where == "load":
        with pytest.raises(runtime.ModelError, match=r"pip install 'ddpm-toolkit\[openvino\]'"):
            runtime.load(uncond_onnx, "openvino", **QUIET)
        return
    if where == "serve":  # the server refuses to start, in one line
        pytest.importorskip("uvicorn", reason="needs the serve extra")
        from serve.cli import main as serve

        line = one_error_line(CliRunner().invoke(serve, [str(uncond_onnx), "--port", "0", "--provider", "openvino"]))
        assert "pip install 'ddpm-toolkit[openvino]'" in line
        return
    out = tmp_path / "run"
    line = one_error_line(cli(uncond_onnx, "-n", 2, "--out", out, "--provider", "openvino"))
    assert "pip install 'ddpm-toolkit[openvino]'" in line and not out.exists()


@needs_openvino
def test_bf16_on_a_cpu_without_it(uncond_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_model, "cpu_bf16", lambda core: False)
    out = tmp_path / "run"
    line = one_error_line(cli(uncond_onnx, "-n", 2, "--out", out, "--provider", "openvino", "--dtype", "bf16"))
    assert "has no bf16" in line and "fp32 is what it can run" in line and not out.exists()
    assert runtime.load(uncond_onnx, "openvino", **QUIET).precision == "fp32"  # the default follows the CPU


def test_a_precision_the_backend_cannot_run(uncond_onnx, tmp_path):
    out = tmp_path / "run"
    line = one_error_line(cli(uncond_onnx, "-n", 2, "--out", out, "--provider", "cpu", "--dtype", "bf16"))
    assert "onnxruntime runs fp32 or fp16" in line and "--provider openvino" in line and not out.exists()
    line = one_error_line(cli(uncond_onnx, "-n", 2, "--out", out, "--provider", "cpu", "--dtype", "fp16"))
    assert "computes in fp32" in line and not out.exists()


@needs_openvino
def test_a_model_openvino_cannot_compile(uncond_onnx, tmp_path):
    model = onnx.load(str(uncond_onnx))
    model.graph.node[-1].op_type, model.graph.node[-1].domain = "NoSuchOp", "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    bad = tmp_path / "bad.onnx"
    onnx.save_model(model, str(bad))
    out = tmp_path / "run"
    line = one_error_line(cli(bad, "-n", 2, "--out", out, "--provider", "openvino"))
    assert line.startswith(f"Error: OpenVINO cannot read {bad}: ") and "NoSuchOp" in line and not out.exists()


@needs_openvino
@needs_bf16
def test_the_precision_is_recorded_and_a_resume_keeps_it(uncond_onnx, tmp_path):
    out = tmp_path / "run"
    r = cli(uncond_onnx, "-n", 3, "--out", out, "--provider", "openvino", "--dtype", "bf16", "--batch-size", 2)
    assert r.exit_code == 0 and "provider openvino:CPU (bf16)" in r.output, r.output
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"
    assert {json.loads(line)["precision"] for line in (out / "manifest.jsonl").read_text().splitlines()} == {"bf16"}
    line = one_error_line(cli(uncond_onnx, "-n", 3, "--out", out, "--provider", "openvino", "--dtype", "fp32"))
    assert "other settings (precision differ)" in line
    fp32 = tmp_path / "fp32"
    assert cli(uncond_onnx, "-n", 2, "--out", fp32, "--provider", "openvino", "--dtype", "fp32").exit_code == 0
    assert "precision" not in json.loads((fp32 / "run.json").read_text())  # fp32: as every folder before it
    assert cli(uncond_onnx, "-n", 2, "--out", fp32, "--provider", "cpu").exit_code == 0  # the same run: resumes


@needs_openvino
def test_the_server_says_the_precision(uncond_onnx):
    pytest.importorskip("fastapi", reason="needs the serve extra")
    from serve.app import create_app
    from serve.scheduler import Scheduler
    from tests.serve.helpers import client_class

    pipeline = runtime.load(uncond_onnx, "openvino", threads=1, **QUIET)
    app = create_app(Scheduler(pipeline), pipeline, api_key=None, max_images=4, deadline_s=60.0, grace_s=5.0)
    with client_class()(app) as client:
        card = client.get("/v1/model").json()
        assert (card["provider"], card["precision"]) == ("openvino:CPU", pipeline.precision)
        answer = client.post("/v1/images", json={"n": 2, "steps": 5, "sampler": "ddim"}).json()
        assert (answer["provider"], answer["precision"]) == ("openvino:CPU", pipeline.precision)


def test_every_provider_belongs_to_a_backend_that_states_its_facts():
    """Each backend's facts are consistent: precisions from the one vocabulary, a device per provider, and auto,
    export and the Ray driver naming only providers of that backend."""
    from runtime.backends.registry import BACKENDS

    for kind in BACKENDS:
        names = {p.name for p in kind.providers}
        assert set(kind.precisions) <= {"fp32", "fp16", "bf16"} and set(kind.writes) <= set(kind.precisions)
        assert all(p.device in ("cpu", "cuda") for p in kind.providers)
        assert set(kind.auto) <= names and set(kind.verify) <= names | {"auto"} and kind.host in names | {"auto"}
