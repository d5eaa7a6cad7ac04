"""ddpm-export refuses bad input with a one-line error, a non-zero exit and no artifact; pickled code never runs."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ddpm_export.cli import main


class Payload:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run(*args: str):
    return CliRunner().invoke(main, [*args])


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


def test_pickled_code_payload_is_refused_and_never_runs(tmp_path, uncond_ckpt):
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "evil.ckpt"
    good = torch.load(uncond_ckpt, weights_only=True)
    good["hyper_parameters"]["extra"] = Payload(marker)
    torch.save(good, ckpt)
    result = run(str(ckpt))
    assert_one_line_error(result, "refusing to load")
    assert "weights_only" not in result.output and "arbitrary code" not in result.output
    assert not marker.exists()
    assert not list(tmp_path.glob("evil*.onnx*"))


def make_bad(tmp_path: Path, kind: str, good: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("this is not a checkpoint")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:4096])
    elif kind == "nohparams":
        torch.save({"state_dict": {"unet.x": torch.zeros(1)}, "hyper_parameters": {"lr": 1e-3}}, path)
    elif kind == "plain":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": [0.0, 1.0]}))
    elif kind.startswith("legacy"):  # torch.save before PyTorch 1.6: not a zip; protocol 4 frames its pickles
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path, _use_new_zipfile_serialization=False,
                   pickle_protocol=2 if kind == "legacy-truncated" else 4)  # protocol 2 loads, when whole
        if kind == "legacy-truncated":
            path.write_bytes(path.read_bytes()[:200])
    return path


@pytest.mark.parametrize(
    "kind, message",
    [("missing", "does not exist"), ("text", "not a PyTorch checkpoint"), ("truncated", "truncated or corrupt"),
     ("nohparams", "lacks this project's hyperparameters"), ("plain", "not a ddpm-train checkpoint"),
     ("pickle", "is a plain Python pickle (pickle.dump), not a PyTorch checkpoint (a torch.save archive); it is not "
                "loaded, because unpickling it would run whatever code it holds"),
     ("legacy", "is a torch.save checkpoint in the legacy (non-zip, pickle protocol 4) format, and PyTorch's "
                "weights-only loader cannot read it: Unsupported operand 149; it is refused because"),
     ("legacy-truncated", "in the legacy (non-zip, pickle protocol 2) format, and it is truncated or corrupt")],
)
def test_bad_checkpoints(tmp_path, uncond_ckpt, kind, message):
    ckpt = make_bad(tmp_path, kind, uncond_ckpt)
    with warnings.catch_warnings(record=True) as caught:  # only our one line: torch's warnings stay quiet
        warnings.simplefilter("always")
        result = run(str(ckpt))
    assert_one_line_error(result, message)
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    assert not list(tmp_path.glob("*.onnx*")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "{tmp}/no/such/dir/m.onnx"], "does not exist"),
        (["--out", "{file}/m.onnx"], "does not exist"),
        (["--out", "{tmp}"], "directory"),
        (["--format", "tflite"], "tflite"),
        (["--opset", "11"], "opset 11 is not supported"),
        (["--format", "torchscript", "--fp16"], "--dtype fp16 applies to onnx and pt2 (not torchscript)"),
        (["--format", "onnx", "--dtype", "bf16"], "--dtype bf16 applies to pt2 (not onnx)"),
        (["--format", "pt2", "--fp16", "--dtype", "bf16"], "cannot be combined"),
        (["--format", "onnx", "--device", "cuda"], "--device applies to --format pt2"),
        (["--scheduler-config", "{file}"], "apply to diffusers folders"),
        (["--null-class", "3"], "apply to diffusers folders"),
    ],
)
def test_bad_options(tmp_path, uncond_ckpt, extra, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{file}", str(a_file)) for a in extra]
    before = set(tmp_path.iterdir())
    assert_one_line_error(run(str(uncond_ckpt), *args), message)
    assert set(tmp_path.iterdir()) == before
    assert not uncond_ckpt.with_suffix(".onnx").exists()


def test_help_explains_every_option():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--format", "--out", "--weights", "--opset", "--fp16", "--verify / --no-verify", "--optimize",
                   "--dtype", "--scheduler-config", "--null-class", "--run-defaults", "--device"):
        assert option in result.output
