"""ddpm-generate says what a wrong file is and keeps onnxruntime's provider noise off the terminal (torch-free)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import runtime
from runtime.generate_cli import main
from tests.cli_checks import one_error_line

REPO = Path(runtime.__file__).resolve().parents[1]


def test_a_plain_pickle_is_named_as_one(tmp_path: Path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    line = one_error_line(CliRunner().invoke(main, [str(evil), "-n", "1", "--out", str(tmp_path / "out")]))
    assert "evil.pt is not an ONNX, TorchScript or .pt2 model" in line and "pickle" in line, line
    assert not (tmp_path / "out").exists()


def torch_save_layout(path: Path) -> Path:
    """A zip laid out as torch.save writes one (a pickle and its tensors' storages, no TorchScript code)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"state_dict": {}}))
        z.writestr("evil/byteorder", "little")
        z.writestr("evil/data/0", b"\0" * 16)
        z.writestr("evil/version", "3\n")
    return path


@pytest.mark.parametrize("provider", ["auto", "cpu"])
def test_a_torch_save_zip_is_named_as_a_checkpoint(tmp_path: Path, provider):
    evil = torch_save_layout(tmp_path / "evil.pt")
    line = one_error_line(CliRunner().invoke(main, [str(evil), "-n", "1", "--out", str(tmp_path / "out"),
                                                    "--provider", provider]))
    assert "evil.pt is not a TorchScript or .pt2 model (it looks like a torch.save checkpoint; export it with " \
           "ddpm-export)" in line, line
    assert "constants.pkl" not in line and "corrupt" not in line


@pytest.mark.parametrize("kind, message",
                         [("truncated", "truncated or corrupt"), ("other", "without TorchScript code")])
def test_other_zips_are_not_called_torchscript(tmp_path: Path, kind, message):
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(torch_save_layout(tmp_path / "whole.pt").read_bytes()[:40])
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    with pytest.raises(runtime.ModelError, match=message):
        runtime.load(path, "cpu")


@pytest.mark.parametrize("provider", ["tensorrt", "cuda"])
def test_a_gpu_provider_that_does_not_start_is_one_line(uncond_onnx, tmp_path: Path, provider):
    r = subprocess.run([sys.executable, "-m", "runtime.generate_cli", str(uncond_onnx), "-n", "1",
                        "--out", str(tmp_path / "o"), "--provider", provider],
                       capture_output=True, text=True, timeout=120)
    both = r.stdout + r.stderr
    assert "EP Error" not in both and "onnxruntime::" not in both, both
    if r.returncode != 0:  # no such GPU provider here (a machine where it starts makes the image)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and provider in lines[0].lower(), r.stderr
        from runtime.backends.providers import gpu_visible

        assert gpu_visible() or lines[0].endswith("; no NVIDIA GPU is visible here"), lines


WITHOUT_TORCH = """
import sys

class Block:  # what imports meet where the train extra is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "pytorch_lightning", "lightning", "einops", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
from ddpm_export.entry import main
sys.argv = ["ddpm-export", sys.argv[1]]
main()
"""


def test_ddpm_export_without_the_train_extra_is_one_line_naming_it(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\0" * 16)
    r = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(ckpt)], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: ddpm-export needs the train extra (torch is not installed here): pip install 'ddpm-toolkit[train]'"]
    assert list(tmp_path.iterdir()) == [ckpt]
