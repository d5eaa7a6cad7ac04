"""ddpm-train: a short run and its resume end to end, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from training.cli import main
from training.config import ModelConfig

TINY = ["--base-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "8",
        "--batch-size", "8", "--sample-steps", "4", "--timesteps", "100"]


# What every run (or every mid-epoch resume) used to print from Lightning; --resume's help explains the data order.
NOISE = ("`validation_step` but have no `val_dataloader`", "dataloader is not resumable",
         "`weights_only` was not set", "LeafSpec", "GPU available", "TPU available", "Tip:", "`Trainer.fit` stopped")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True, timeout=300)


def test_train_then_resume(fashion_root: Path, tmp_path: Path):
    out = tmp_path / "run"
    r = run_cli("--dataset", "fashion-mnist", "--data-root", str(fashion_root), "--max-steps", "5",
                "--conditional", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [w for w in NOISE if w in r.stderr] == [], r.stderr[-2000:]
    last = out / "checkpoints" / "last.ckpt"
    assert r.stdout.strip().splitlines()[-1] == str(last)
    assert Image.open(out / "samples" / "last.png").size[0] > 32  # a grid, not one image
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5
    assert ckpt["hyper_parameters"]["num_classes"] == 10 and ckpt["hyper_parameters"]["dataset"] == "fashion-mnist"
    assert ckpt["hyper_parameters"]["class_names"][7] == "Sneaker"

    r = run_cli("--dataset", "fashion-mnist", "--data-root", str(fashion_root), "--max-steps", "8",
                "--out", str(out), "--resume", str(last), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [w for w in NOISE if w in r.stderr] == [], r.stderr[-2000:]  # step 5 of 8 per epoch: a mid-epoch resume
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 8
    assert int(resumed["state_dict"]["ema.n_averaged"]) == 8  # EMA state carried over, not restarted
    assert resumed["hyper_parameters"]["num_classes"] == 10  # model flags come from the checkpoint


def bad_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs" / "cats"
    root.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "ok.png")
    (root / "broken.png").write_text("not an image")
    return tmp_path / "imgs"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "imagenet"], "imagenet"),
        (["--dataset", "mnist", "--data-root", "{tmp}/nowhere"], "not found"),
        (["--dataset", "fashion-mnist", "--data-root", "{fashion}", "--image-size", "36", "--channel-mult", "1,2,2,2"],
         "not divisible by 8"),
        (["--dataset", "fashion-mnist", "--data-root", "{fashion}", "--channels", "2"], "1 or 3"),
        (["--dataset", "fashion-mnist", "--data-root", "{fashion}", "--max-steps", "-5"], "-5"),
        (["--dataset", "folder", "--data-root", "{folder}"], "broken.png"),
        (["--dataset", "fashion-mnist", "--data-root", "{fashion}", "--channel-mult", "1,x"], "comma-separated"),
        (["--dataset", "fashion-mnist", "--data-root", "{fashion}", "--precision", "16-mixed", "--accelerator", "cpu"],
         "16-mixed"),
    ],
)
def test_bad_input_is_a_one_line_error(args, message, tmp_path, fashion_root):
    if torch.cuda.is_available() and "16-mixed" in args:
        pytest.skip("16-mixed is valid with a GPU")
    subs = {"{tmp}": str(tmp_path), "{fashion}": str(fashion_root), "{folder}": str(bad_folder(tmp_path))}
    args = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in args]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # handled, no traceback
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_model_flags_become_the_model_config(monkeypatch):
    import training.cli
    from training.config import ModelConfig

    seen = []
    monkeypatch.setattr(training.cli, "train", lambda options: seen.append(options) or "last.ckpt")
    result = CliRunner().invoke(main, ["--dataset", "mnist", *TINY, "--schedule", "cosine", "--lr", "1e-3",
                                       "--dropout", "0.2", "--p-uncond", "0.3", "--ema-decay", "0.99"])
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert options.model == ModelConfig(t_range=100, schedule="cosine", base_channels=8, channel_mult=(1, 2),
                                        num_res_blocks=1, attention_resolutions=(8,), dropout=0.2, p_uncond=0.3,
                                        lr=1e-3, ema_decay=0.99)
    assert (options.batch_size, options.sample_steps, options.dataset) == (8, 4, "mnist")
    assert options.sample_sampler == "dpmpp-2m"
    CliRunner().invoke(main, ["--dataset", "mnist", "--attention-resolutions", "none"])
    assert seen[-1].model == ModelConfig(attention_resolutions=())  # and the flags' defaults are the config's


def test_run_defaults_at_training_go_into_the_model_config_and_its_contract(monkeypatch, fashion_root, tmp_path):
    import dataclasses

    import training.cli
    from runtime.metadata import RunDefaults

    # guidance needs classes, which come from the data: refused when the data makes the model unconditional
    result = CliRunner().invoke(main, ["--dataset", "fashion-mnist", "--data-root", str(fashion_root), *TINY,
                                       "--out", str(tmp_path / "u"), "--run-defaults", "guidance=2"])
    assert result.exit_code == 2 and "--run-defaults: guidance needs a class-conditional model" in result.output, \
        result.output

    seen = []
    monkeypatch.setattr(training.cli, "train", lambda options: seen.append(options) or "last.ckpt")
    result = CliRunner().invoke(main, ["--dataset", "mnist", *TINY, "--run-defaults",
                                       "sampler=ddim,steps=30,guidance=2,guidance_interval=0:40"])
    assert result.exit_code == 0, result.output
    cfg = seen[0].model
    assert cfg.run_defaults == {"sampler": "ddim", "steps": 30, "guidance": 2.0, "guidance_interval": [0, 40]}
    assert ModelConfig.from_hparams(cfg.to_hparams()) == cfg  # kept in the checkpoint as plain data
    conditional = dataclasses.replace(cfg, num_classes=10)  # as the data makes it
    assert conditional.contract(ema=True).run_defaults == RunDefaults(sampler="ddim", steps=30, guidance=2.0,
                                                                      guidance_interval=(0, 40))
    for bad, message in (("steps=abc", "steps needs an integer"), ("sampler=ddim,steps=500", "steps must be between 1 "
                                                                  "and T = 100"), ("colour=red", "expected KEY=VALUE")):
        result = CliRunner().invoke(main, ["--dataset", "mnist", *TINY, "--run-defaults", bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_help_explains_every_option():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--dataset", "--data-root", "--image-size", "--channels", "--batch-size", "--max-steps",
                   "--max-epochs", "--lr", "--schedule", "--timesteps", "--base-channels", "--channel-mult",
                   "--num-classes", "--conditional", "--precision", "--devices", "--strategy", "--num-nodes",
                   "--seed", "--out", "--resume", "--sample-every", "--sample-sampler", "--sample-steps",
                   "--run-defaults"):
        assert option in result.output
