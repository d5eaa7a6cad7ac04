"""ddpm-train and signals: SIGTERM or Ctrl-C stops a run within one training step or one sampling step, with a
resumable checkpoint and a line saying how to resume; the resumed run goes on from that step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runtime
from tests.training.test_cli import TINY, run_cli

REPO = Path(runtime.__file__).resolve().parents[1]

# ddpm-train, slowed where the test sends its signal: each training step from step 3 on, or each predictor call of
# the sample grids. The marker file appears once the run is there.
SLOWED_CLI = """
import sys, time, pathlib
marker, where = pathlib.Path(sys.argv[1]), sys.argv[2]
import training.model as m
if where == "training":
    real_step = m.DiffusionModel.training_step
    def training_step(self, batch, batch_idx):
        if self.global_step >= 3:
            marker.touch()
            time.sleep(0.2)
        return real_step(self, batch, batch_idx)
    m.DiffusionModel.training_step = training_step
else:
    real_predictor = m.eps_predictor
    def eps_predictor(*args, **kwargs):
        predict = real_predictor(*args, **kwargs)
        def slowed(*a):
            marker.touch()
            time.sleep(0.05)
            return predict(*a)
        return slowed
    m.eps_predictor = eps_predictor
from training.cli import main
main(sys.argv[3:], prog_name="ddpm-train")
"""


def start_slowed(tmp_path: Path, where: str, *args: str) -> tuple[subprocess.Popen, Path]:
    script, marker, log = tmp_path / "slowed_cli.py", tmp_path / f"at-{where}", tmp_path / f"{where}.log"
    script.write_text(SLOWED_CLI)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:  # a file, not a pipe: progress output never blocks the run
        p = subprocess.Popen([sys.executable, str(script), str(marker), where, *args], stdout=f,
                             stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            p.wait()
            pytest.fail(f"the run never reached {where}: {log.read_text()[-2000:]}")
        time.sleep(0.01)
    return p, log


def stop(p: subprocess.Popen, sig: int, within: float) -> float:
    """Send ``sig``; the seconds until the process ended (it is killed, and the test fails, past ``within``)."""
    sent = time.monotonic()
    p.send_signal(sig)
    try:
        p.wait(timeout=within)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"still running {within} s after {signal.Signals(sig).name}")
    return time.monotonic() - sent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_a_signal_mid_training_saves_a_checkpoint_that_resumes(fashion_root: Path, tmp_path: Path, sig):
    out = tmp_path / "run"
    args = ["--dataset", "fashion-mnist", "--data-root", str(fashion_root), "--out", str(out), *TINY]
    p, log = start_slowed(tmp_path, "training", *args, "--max-steps", "1000")
    stop(p, sig, within=20)  # the step in flight (0.2 s here), the checkpoint, Lightning's teardown
    text = log.read_text()
    last = out / "checkpoints" / "last.ckpt"
    name = signal.Signals(sig).name
    assert p.returncode == 1 and "Traceback" not in text, text[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 3 <= step < 1000
    assert f"Error: stopped by {name} at step {step}; checkpoint: {last}; to go on, run the same command with " \
           f"--resume {last}" in text, text[-3000:]
    assert not (out / "samples" / "last.png").exists()  # no end-of-run grid for a stopped run

    r = run_cli(*args, "--max-steps", str(step + 2), "--resume", str(last))
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 2


def test_sigterm_while_the_grid_is_drawn_stops_at_the_next_sampling_step(fashion_root: Path, tmp_path: Path):
    """The end-of-run grid of 100 DDPM steps takes over 5 s here (0.05 s per predictor call): SIGTERM ends it
    within a step or so, writes no grid, and the run's checkpoint is there to resume from."""
    out = tmp_path / "run"
    args = ["--dataset", "fashion-mnist", "--data-root", str(fashion_root), "--out", str(out), *TINY,
            "--max-steps", "2", "--sample-steps", "100"]
    p, log = start_slowed(tmp_path, "sampling", *args)
    took = stop(p, signal.SIGTERM, within=20)
    text = log.read_text()
    assert took < 3 and p.returncode == 1, (took, text[-3000:])
    assert "SIGTERM: the sample grid last.png was not drawn" in text and "Traceback" not in text, text[-3000:]
    assert not (out / "samples" / "last.png").exists() and not list((out / "samples").glob(".*"))
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    assert f"--resume {last}" in text
