"""Messages about files that are not what a command takes: real torch files given to ddpm-generate, and
checkpoints that ddpm-train --resume refuses (never with torch's advice to load them with weights_only=False)."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import runtime
from runtime.backends.registry import model_format
from tests.cli_checks import one_error_line


class Payload:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_generate_names_a_torch_save_checkpoint(tmp_path: Path):
    from runtime.generate_cli import main

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"unet.w": torch.zeros(3)}, "hyper_parameters": {"lr": 1e-3}}, evil)
    line = one_error_line(CliRunner().invoke(main, [str(evil), "-n", "1", "--out", str(tmp_path / "out")]))
    assert "evil.pt is not a TorchScript or .pt2 model (it looks like a torch.save checkpoint; export it with " \
           "ddpm-export)" in line, line
    assert "constants.pkl" not in line and "corrupted" not in line


def scripted_linear(path: Path) -> None:
    """A TorchScript archive of a Linear layer, without torch's deprecation notice for torch.jit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))


def test_a_torchscript_archive_is_still_torchscript(tmp_path: Path):
    path = tmp_path / "plain.pt"
    scripted_linear(path)
    assert model_format(path) == "torchscript"
    with pytest.raises(runtime.ModelError, match="carries no sampling contract"):  # loaded, then checked
        runtime.load(path, "cpu")


def test_a_torchscript_archive_that_does_not_load_says_why(tmp_path: Path):
    """torch's message starts with a newline here ("\\nUnknown type name ..."): the reason is its first real line."""
    import zipfile

    whole = tmp_path / "whole.pt"
    scripted_linear(whole)
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(whole) as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            code = b"def forward(self, x: Tensor) -> Tensor:\n  return x\n"
            dst.writestr(name, code if name.endswith(".py") else src.read(name))
    assert model_format(broken) == "torchscript"
    with pytest.raises(runtime.ModelError) as caught:
        runtime.load(broken, "cpu")
    assert str(caught.value).startswith(f"cannot load {broken} as TorchScript: Unknown type name"), caught.value


def test_a_torchscript_archive_holding_pickled_code_is_refused_in_plain_words(tmp_path: Path):
    import zipfile

    marker = tmp_path / "payload-ran"
    whole = tmp_path / "whole.pt"
    scripted_linear(whole)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(whole) as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, pickle.dumps(Payload(marker), protocol=2) if name.endswith("/data.pkl") else
                         src.read(name))
    assert model_format(evil) == "torchscript"
    with pytest.raises(runtime.ModelError) as caught:
        runtime.load(evil, "cpu")
    assert str(caught.value) == (f"refusing to load {evil}: it looks like a TorchScript archive but holds pickled "
                                 "Python code (posix.system), which is never run"), caught.value
    assert not marker.exists()


def resume(tmp_path: Path, fashion_root: Path, ckpt: Path):
    from training.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["--dataset", "fashion-mnist", "--data-root", str(fashion_root),
                                           "--out", str(tmp_path / "run"), "--resume", str(ckpt)])
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    assert "weights_only" not in result.output and "arbitrary code" not in result.output, result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
    return one_error_line(result)


def test_resume_refuses_pickled_code_and_never_runs_it(tmp_path: Path, fashion_root: Path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"unet.w": torch.zeros(1)}, "hyper_parameters": {"lr": 1e-3, "extra": Payload(marker)}},
               evil)
    line = resume(tmp_path, fashion_root, evil)
    assert f"refusing to load {evil}: it contains pickled code or objects" in line, line
    assert not marker.exists()


@pytest.mark.parametrize("kind, message", [("pickle", "is a plain Python pickle (pickle.dump), not a PyTorch "
                                                       "checkpoint (a torch.save archive); it is not loaded, because "
                                                       "unpickling it would run whatever code it holds"),
                                           ("nohparams", "is not a ddpm-train checkpoint (no hyper_parameters)")])
def test_resume_says_what_the_file_is(tmp_path: Path, fashion_root: Path, kind, message):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": {}}))
    else:
        torch.save({"state_dict": {"unet.w": torch.zeros(1)}}, path)
    line = resume(tmp_path, fashion_root, path)
    assert message in line, line


def test_resume_help_says_what_happens_to_the_data_order():
    from training.cli import main

    text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    assert "mid-epoch" in text and "fresh shuffle" in text
