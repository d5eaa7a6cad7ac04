"""ddpm-generate: files, manifest, resume after SIGKILL, concurrent shards, and one-line errors for bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image

import runtime
import runtime.generation.output
from runtime.generate_cli import main
from runtime.metadata import CONTRACT_KEY, SamplingContract
from runtime.sampling.settings import SAMPLERS
from tests.cli_checks import one_error_line

REPO = Path(runtime.__file__).resolve().parents[1]  # this checkout, for subprocesses


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def images_in(d: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(d / f"{i:06d}.png")) for i in range(n)])


def cli_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runtime.generate_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_files_manifest_npz_and_grid(cond_onnx, tmp_path):
    out = tmp_path / "run"
    r = cli(cond_onnx, "-n", 7, "--batch-size", 3, "--sampler", "ddim", "--steps", 5, "--out", out,
            "--format", "both", "--grid", "--provider", "cpu")
    assert r.exit_code == 0, r.output
    assert "7 images in" in r.output and "CPUExecutionProvider" in r.output and "ddim 5 steps" in r.output
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(7)]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(7))
    assert ({"index", "seed", "class", "class_name", "sampler", "steps", "provider", "model_sha256", "file"}
            <= set(records[0]))
    assert [r["class"] for r in records] == [0, 1, 2, 0, 1, 2, 0]
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (7, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert np.array_equal(npz["arr_0"], images_in(out, 7))
    assert Image.open(out / "grid.png").size[0] > 16 * 3
    assert not list(out.glob(".*tmp*"))


def test_npz_only_keeps_the_folder_clean(uncond_onnx, tmp_path):
    r = cli(uncond_onnx, "-n", 3, "--steps", 4, "--out", tmp_path / "o", "--format", "npz")
    assert r.exit_code == 0, r.output
    assert not list((tmp_path / "o").glob("0*.png"))
    assert np.load(tmp_path / "o" / "samples.npz")["arr_0"].shape == (3, 16, 16, 1)


def test_shards_running_at_once_equal_one_run(cond_onnx, tmp_path):
    common = ["-n", 10, "--batch-size", 2, "--sampler", "ddim", "--steps", 6, "--guidance", 2, "--provider", "cpu"]
    assert cli(cond_onnx, *common, "--out", tmp_path / "single").exit_code == 0
    procs = [cli_process(cond_onnx, *common, "--out", tmp_path / "sharded", "--shard", f"{i}/3") for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    assert np.array_equal(images_in(tmp_path / "single", 10), images_in(tmp_path / "sharded", 10))
    manifest = (tmp_path / "sharded" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in manifest] == list(range(10))
    assert len(list((tmp_path / "sharded").glob("manifest-*-of-3.jsonl"))) == 3


# Runs the CLI with one function wrapped to stop the run at a known point: it touches HELD, then sleeps until a
# signal comes. Interruption tests send their signal there, however fast or slow the machine is.
HELD_CLI = """
import os, signal, sys, time
from pathlib import Path

# Its own signal dispositions, whatever it inherited: a test runner started in the background (nohup, CI jobs)
# hands children SIGINT ignored, and this child must take Ctrl-C as a user's terminal delivers it.
signal.signal(signal.SIGINT, signal.default_int_handler)

import runtime
import runtime.generation.output
from runtime.generate_cli import main

held, where, k = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
count = 0


def hold_at_k():
    global count
    count += 1
    if count == k:
        held.touch()
        while True:
            time.sleep(0.05)


if where == "after-batch":  # batch k is on disk (images and manifest lines)
    write_images = runtime.generation.output.OutputDir.write_images

    def held_write_images(*args, **kwargs):
        write_images(*args, **kwargs)
        hold_at_k()

    runtime.generation.output.OutputDir.write_images = held_write_images
elif where == "before-rename":  # image file k is written under its temporary name, not renamed yet
    replace = os.replace

    def held_replace(src, dst):
        if str(dst).endswith(".png"):
            hold_at_k()
        return replace(src, dst)

    os.replace = held_replace
main(sys.argv[4:], prog_name="ddpm-generate")
"""


def held_process(tmp_path: Path, where: str, k: int, *args) -> tuple[subprocess.Popen, Path]:
    """``ddpm-generate ARGS`` in a subprocess, held at the k-th ``where`` (see HELD_CLI); returns it and its log."""
    script, held, log = tmp_path / "held_cli.py", tmp_path / f"held-{where}-{k}", tmp_path / f"held-{where}-{k}.log"
    script.write_text(HELD_CLI)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:  # a file, not a pipe, so that progress output can never block the run
        p = subprocess.Popen([sys.executable, str(script), str(held), where, str(k), *map(str, args)], stdout=f,
                             stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while not held.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the run was not held at {where} {k}: {log.read_text()[-2000:]}")
        time.sleep(0.01)
    return p, log


def test_sigkill_then_resume_gives_the_identical_set(uncond_onnx, tmp_path):
    args = [uncond_onnx, "-n", 8, "--batch-size", 2, "--steps", 3, "--provider", "cpu", "--seed", 5]
    assert cli(*args, "--out", tmp_path / "whole").exit_code == 0
    out = tmp_path / "killed"
    p, _ = held_process(tmp_path, "before-rename", 5, *args, "--out", out)  # batches 1-2 done, image 4 half-written
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert sorted(f.name for f in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert len(list(out.glob(".000004.png.tmp-*"))) == 1  # what kill -9 leaves
    r = cli(*args, "--out", out)
    assert r.exit_code == 0, r.output
    assert "4 images in" in r.output and "4 already there" in r.output, r.output
    assert np.array_equal(images_in(out, 8), images_in(tmp_path / "whole", 8))
    assert (out / "manifest.jsonl").read_text() == (tmp_path / "whole" / "manifest.jsonl").read_text()
    assert not list(out.glob(".*tmp*")), "the killed run's temporary file is removed on resume"


def test_ctrl_c_stops_cleanly_and_resumes(uncond_onnx, tmp_path):
    out = tmp_path / "int"
    args = [uncond_onnx, "-n", 8, "--batch-size", 2, "--steps", 3, "--provider", "cpu", "--out", out]
    p, log = held_process(tmp_path, "after-batch", 2, *args)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=60)
    finally:  # a test that times out kills what it started
        if p.poll() is None:
            p.kill()
            p.wait()
    err = log.read_text()
    assert p.returncode != 0 and "interrupted; rerun the same command" in err and "Traceback" not in err, err
    assert not list(out.glob(".*tmp*"))
    r = cli(*args)
    assert r.exit_code == 0 and "4 images in" in r.output and "4 already there" in r.output, r.output
    assert len(list(out.glob("0*.png"))) == 8


def test_other_settings_are_refused_unless_overwrite(uncond_onnx, tmp_path):
    out = tmp_path / "o"
    assert cli(uncond_onnx, "-n", 2, "--steps", 3, "--out", out).exit_code == 0
    r = cli(uncond_onnx, "-n", 2, "--steps", 4, "--out", out)
    assert r.exit_code != 0 and "other settings (steps differ)" in r.output
    r = cli(uncond_onnx, "-n", 2, "--steps", 4, "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "run.json").read_text())["steps"] == 4


def foreign_model(path: Path, contract_json: str | None) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 16, 16])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"])
    eps = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", 1, 16, 16])
    nodes = [helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT),
             helper.make_node("Constant", [], ["limit"], value=helper.make_tensor("l", TensorProto.FLOAT, [], [50.0])),
             helper.make_node("Less", ["tf", "limit"], ["late"]),
             helper.make_node("Constant", [], ["shape"],
                              value=helper.make_tensor("s", TensorProto.INT64, [4], [-1, 1, 1, 1])),
             helper.make_node("Reshape", ["late", "shape"], ["late4"]),
             helper.make_node("Constant", [], ["nan"],
                              value=helper.make_tensor("n", TensorProto.FLOAT, [], [float("nan")])),
             helper.make_node("Constant", [], ["tenth"], value=helper.make_tensor("c", TensorProto.FLOAT, [], [0.1])),
             helper.make_node("Mul", ["x", "tenth"], ["sq"]),
             helper.make_node("Where", ["late4", "nan", "sq"], ["eps"])]  # NaN once t < 50
    model = helper.make_model(helper.make_graph(nodes, "nan_model", [x, t], [eps]),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if contract_json is not None:
        helper.set_model_props(model, {CONTRACT_KEY: contract_json})
    onnx.save(model, path)
    return path


def test_nan_from_the_model_stops_the_run_naming_the_step(tmp_path):
    model = foreign_model(tmp_path / "nan.onnx", SamplingContract(image_size=16, channels=1,
                          schedule=SamplingContract(image_size=16, channels=1).schedule.__class__("linear", 100,
                          {"beta_start": 1e-4, "beta_end": 0.02})).to_json())
    r = cli(model, "-n", 2, "--out", tmp_path / "o")
    assert r.exit_code != 0
    assert "NaN or Inf at sampler step 51 of 100 (t = 49)" in r.output, r.output
    assert not list((tmp_path / "o").glob("*.png"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("corrupt", "cannot load"),
        ("foreign", "carries no sampling contract"),
        ("no-variance", "contract field 'variance': missing"),
        ("n0", "-n"),
        ("batch0", "--batch-size"),
        ("steps0", "steps must be between 1 and T = 100"),
        ("steps-too-many", "steps must be between 1 and T = 100"),
        ("unknown-class", "unknown class 'sneaker'"),
        ("class-on-uncond", "unconditional"),
        ("guidance-on-uncond", "guidance needs a class-conditional model"),
        ("bad-shard", "I/N"),
        ("shard-out-of-range", "I/N"),
        ("out-is-a-file", "it is a file"),
        ("out-under-a-file", "cannot create"),
        ("unknown-sampler", "'euler' is not one of " + ", ".join(f"'{name}'" for name in SAMPLERS)),
        ("eta-on-dpmpp", "eta applies to the ddim sampler only, not to dpmpp-2m"),
        ("variance-on-unipc", "variance applies to the ddpm sampler only, not to unipc"),
        ("below-warm-up", "dpmpp-3m needs at least 3 steps (its first 2 warm up its history), got 2"),
        ("interval-not-two", "guidance interval must be two integers LO,HI"),
        ("interval-not-numbers", "guidance interval must be two integers LO,HI"),
        ("interval-outside", "0 <= LO <= HI < T = 100, got 10,100"),
        ("interval-reversed", "0 <= LO <= HI < T = 100, got 50,10"),
        ("interval-on-uncond", "a guidance interval needs a class-conditional model"),
        ("guidance-huge", "guidance must be from 0 (unconditional) to 50, got 3e+38"),
        ("guidance-negative", "guidance must be from 0 (unconditional) to 50, got -1"),
    ],
)
def test_bad_input_is_a_one_line_error(case, message, tmp_path, uncond_onnx, cond_onnx):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    model, out, extra = uncond_onnx, tmp_path / "out", []
    if case == "missing":
        model = tmp_path / "nope.onnx"
    elif case == "corrupt":
        model = tmp_path / "corrupt.onnx"
        model.write_bytes(os.urandom(2000))
    elif case == "foreign":
        model = foreign_model(tmp_path / "foreign.onnx", None)
    elif case == "no-variance":
        d = json.loads(SamplingContract(image_size=16, channels=1).to_json())
        del d["variance"]
        model = foreign_model(tmp_path / "novar.onnx", json.dumps(d))
    extra = {
        "n0": ["-n", "0"], "batch0": ["--batch-size", "0"], "steps0": ["--steps", "0"],
        "steps-too-many": ["--steps", "101"], "unknown-class": ["--class", "sneaker"],
        "class-on-uncond": ["--class", "1"], "guidance-on-uncond": ["--guidance", "2"],
        "bad-shard": ["--shard", "a/b"], "shard-out-of-range": ["--shard", "3/3"],
        "unknown-sampler": ["--sampler", "euler"], "eta-on-dpmpp": ["--sampler", "dpmpp-2m", "--eta", "0.3"],
        "variance-on-unipc": ["--sampler", "unipc", "--variance", "beta"],
        "below-warm-up": ["--sampler", "dpmpp-3m", "--steps", "2"],
        "interval-not-two": ["--guidance-interval", "5"], "interval-not-numbers": ["--guidance-interval", "a,b"],
        "interval-outside": ["--guidance-interval", "10,100"], "interval-reversed": ["--guidance-interval", "50,10"],
        "interval-on-uncond": ["--guidance-interval", "0,50"],
        "guidance-huge": ["--guidance", "3e38"], "guidance-negative": ["--guidance", "-1"],
    }.get(case, [])
    if case.startswith(("unknown-class", "guidance-huge", "guidance-negative")) or (
            case.startswith("interval-") and case != "interval-on-uncond"):
        model = cond_onnx
    if case == "out-is-a-file":
        out = a_file
    if case == "out-under-a-file":
        out = a_file / "sub"
    args = [model, "-n", "2", "--steps", "3", "--out", out, *extra]
    if case in ("steps0", "steps-too-many"):
        args = [model, "-n", "2", "--out", out, *extra]
    r = cli(*args)
    assert r.exit_code != 0
    assert isinstance(r.exception, SystemExit), r.exception
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output
    if out.is_dir():
        assert not list(out.glob("*.png")) and not (out / "run.json").exists()
    if case.startswith(("interval-", "eta-", "unknown-sampler", "guidance-")):  # refused before anything is written
        assert not out.exists()


def test_full_disk_is_a_one_line_error_and_leaves_no_partial_file(uncond_onnx, tmp_path, monkeypatch):
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("000001.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(runtime.generation.output.os, "replace", full)
    out = tmp_path / "o"
    r = cli(uncond_onnx, "-n", 3, "--batch-size", 1, "--steps", 3, "--out", out)
    assert r.exit_code != 0 and "disk full while writing" in r.output and "000001.png" in r.output
    assert (sorted(p.name for p in out.iterdir() if not p.name.startswith("run"))
            == ["000000.png", "manifest-0-of-1.jsonl"])
    monkeypatch.setattr(runtime.generation.output.os, "replace", real_replace)
    r = cli(uncond_onnx, "-n", 3, "--batch-size", 1, "--steps", 3, "--out", out)
    assert r.exit_code == 0 and "1 already there" in r.output


def test_help_explains_every_option():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for option in ("-n", "--out", "--batch-size", "--seed", "--sampler", "--steps", "--eta", "--class", "--guidance",
                   "--provider", "--shard", "--format", "--grid", "--overwrite"):
        assert option in r.output


def test_bundled_model_by_name_and_by_default(uncond_onnx, tmp_path, monkeypatch):
    import runtime.bundled

    assets = tmp_path / "assets"
    assets.mkdir()
    monkeypatch.setattr(runtime.bundled, "assets_dir", lambda: assets)
    r = cli("-n", 2, "--steps", 2, "--out", tmp_path / "a")
    assert r.exit_code != 0 and "bundled model 'fashion-mnist' is not part of this installation" in r.output
    (assets / "fashion-mnist.onnx").write_bytes(uncond_onnx.read_bytes())
    r = cli("-n", 2, "--steps", 2, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert "using the bundled model fashion-mnist" in r.output
    r = cli("Fashion-MNIST", "-n", 2, "--steps", 2, "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert np.array_equal(images_in(tmp_path / "b", 2), images_in(tmp_path / "c", 2))


def test_the_same_class_spelled_differently_is_the_same_run(cond_onnx, tmp_path):
    out = tmp_path / "o"
    assert cli(cond_onnx, "-n", 2, "--steps", 2, "--class", "1", "--out", out).exit_code == 0
    r = cli(cond_onnx, "-n", 2, "--steps", 2, "--class", "01", "--out", out)
    assert r.exit_code == 0 and "2 already there" in r.output, r.output


def test_progress_never_runs_past_the_total(uncond_onnx, tmp_path, monkeypatch):
    """64 images × 50 steps: 64/50 added 50 times is more than 64 in floating point; every update is drawn here."""
    import warnings

    from tqdm import TqdmWarning

    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # tqdm reads its defaults from TQDM_* variables
    with warnings.catch_warnings():
        warnings.simplefilter("error", TqdmWarning)
        r = cli(uncond_onnx, "-n", 64, "--batch-size", 64, "--sampler", "ddim", "--steps", 50, "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output


def test_ray_without_the_cluster_extra_is_one_line_naming_it(uncond_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    r = cli(uncond_onnx, "-n", 2, "--out", tmp_path / "o", "--ray")
    assert one_error_line(r) == ("Error: --ray needs Ray, which is not installed here: "
                                 "pip install 'ddpm-toolkit[cluster]'")
    assert not (tmp_path / "o").exists()
