"""ddpm-train under Lightning DDP, run for real: two CPU processes (``--accelerator cpu --devices 2 --strategy
ddp``) that talk through gloo on 127.0.0.1. The ranks end with identical weights, only rank 0 writes files,
``--resume`` goes on with the DDP run, and a signal to the main process stops every rank with a checkpoint.

Each run goes through ``tests/training/ddp_cli.py``, ``ddpm-train`` with every rank recording what it did (its
rank, backend and first step, its weights at the end, the sums of its batches, every file it wrote, its exit
status); Lightning starts rank 1 by running that same command line again. Nothing in ``training/`` knows about it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runtime
from tests.training.test_cli import TINY

pytestmark = pytest.mark.slow

REPO = Path(runtime.__file__).resolve().parents[1]
LAUNCHER = REPO / "tests" / "training" / "ddp_cli.py"
# Lightning's ddp on a CPU device sets up the process group with gloo, its default there (nccl is for CUDA);
# each rank records the backend it got, and the test checks it is gloo.
DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One ``ddpm-train`` DDP run in its own session (so the test can end both ranks, whatever happens), with the
    ranks' records, stdout and stderr in ``tmp_path/name/`` (files, never pipes: progress output cannot block)."""

    def __init__(self, tmp_path: Path, name: str, *args: str, slow_from: int | str = 0) -> None:
        self.record = tmp_path / name
        self.record.mkdir()
        self.stdout, self.stderr = self.record / "stdout.txt", self.record / "stderr.txt"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               # the rendezvous on this machine's loopback, at a port no other run uses
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        env.pop("LOCAL_RANK", None)
        if sys.platform == "linux":
            env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on the loopback too
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(LAUNCHER), str(self.record), str(slow_from), *args],
                                         stdout=out, stderr=err, env=env, start_new_session=True)

    def log(self) -> str:
        return f"stdout:\n{self.stdout.read_text()[-1500:]}\nstderr:\n{self.stderr.read_text()[-3000:]}"

    def wait(self, timeout: float) -> int:
        """The main process's exit status, once every rank has exited (the test fails past ``timeout``)."""
        deadline = time.monotonic() + timeout
        try:
            self.proc.wait(timeout=timeout)
            while not all((self.record / f"rank{r}.exit").exists() for r in (0, 1)):
                if time.monotonic() > deadline:
                    pytest.fail(f"rank 1 still running after the main process exited\n{self.log()}")
                time.sleep(0.05)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s\n{self.log()}")
        return self.proc.returncode

    def kill(self) -> None:
        """End what is left of the run's session (both ranks are in it): for a test that failed or timed out."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def rank(self, r: int) -> dict:
        return json.loads((self.record / f"rank{r}.json").read_text())

    def exit_status(self, r: int) -> str:
        return (self.record / f"rank{r}.exit").read_text()

    def weights(self, r: int) -> dict[str, torch.Tensor]:
        return torch.load(self.record / f"rank{r}.pt", map_location="cpu", weights_only=True)

    def batch_sums(self, r: int) -> list[float]:
        return [float(v) for v in (self.record / f"rank{r}.batches").read_text().split()]

    def wrote(self, r: int, under: Path) -> set[Path]:
        """What rank ``r`` wrote under ``under`` (opened for writing, renamed into place, removed, made a folder)."""
        entries = (line.split(" ", 1) for line in (self.record / f"rank{r}.writes").read_text().splitlines())
        return {Path(p) for _, p in entries if Path(p).is_relative_to(under)}


def run_to_end(tmp_path: Path, name: str, *args: str) -> Run:
    run = Run(tmp_path, name, *args)
    try:
        status = run.wait(timeout=180)
    finally:
        run.kill()
    assert status == 0 and "Traceback" not in run.stderr.read_text(), run.log()
    assert [run.exit_status(r) for r in (0, 1)] == ["0", "0"]
    return run


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ between the ranks, e.g. {differ[:3]}"


def assert_only_rank_0_wrote(out: Path, *runs: Run) -> None:
    """Each rank logs every file it opens for writing, renames into place, removes or makes a folder of; a grid
    or checkpoint written by rank 1 (even under rank 0's name, even overwritten later) would be in its log and
    fail the first assertion. Every file in the run folder is one that rank 0 of one of ``runs`` wrote."""
    out = out.resolve()
    for run in runs:
        assert run.wrote(1, out) == set(), run.wrote(1, out)
    by_rank_0 = set().union(*(run.wrote(0, out) for run in runs))
    on_disk = {p.resolve() for p in out.rglob("*") if p.is_file()}
    assert on_disk <= by_rank_0, on_disk - by_rank_0


def test_ddp_on_two_cpu_processes_trains_identical_ranks_and_resumes(fashion_root: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = ["--dataset", "fashion-mnist", "--data-root", str(fashion_root), "--out", str(out), *TINY, *DDP,
            "--checkpoint-every", "2", "--sample-every", "2"]
    last = out / "checkpoints" / "last.ckpt"

    first = run_to_end(tmp_path, "first", *args, "--max-steps", "4")
    assert [{**first.rank(r), "pid": None} for r in (0, 1)] == [
        {"pid": None, "global_rank": r, "world_size": 2, "backend": "gloo", "start_step": 0, "seed": r} for r in (0, 1)]
    # each rank its own random stream (seed + rank): their own timesteps and noise, not one batch's worth twice
    # 64 images, 8 a batch, shared out over 2 ranks: 4 steps, each rank on its own half of the data. Identical
    # weights after different batches mean the gradients were averaged over the ranks at every step.
    sums = [first.batch_sums(r) for r in (0, 1)]
    assert len(sums[0]) == len(sums[1]) == 4 and sums[0] != sums[1]
    assert_identical(first.weights(0), first.weights(1))  # raw U-Net and EMA, bit for bit
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert_identical(ckpt["state_dict"], first.weights(0))
    # One file per checkpoint and per grid event (steps 2 and 4, and the end), nothing per rank
    assert files(out / "checkpoints") == {"step0000002.ckpt", "step0000004.ckpt", "last.ckpt"}
    assert files(out / "samples") == {"step_0000002.png", "step_0000004.png", "last.png"}
    assert files(out / "logs") <= {"version_0/hparams.yaml", "version_0/metrics.csv"}
    assert_only_rank_0_wrote(out, first)
    printed = first.stdout.read_text().splitlines()
    assert printed[-1] == str(last) and printed.count(str(last)) == 1, first.log()  # the result line, once
    assert first.stderr.read_text().count("trained to step 4;") == 1, first.log()

    resumed = run_to_end(tmp_path, "resumed", *args, "--max-steps", "8", "--resume", str(last))
    assert [resumed.rank(r)["start_step"] for r in (0, 1)] == [4, 4]  # both ranks went on from the checkpoint
    assert resumed.stderr.read_text().count(f"resuming from {last}") == 1, resumed.log()
    assert_identical(resumed.weights(0), resumed.weights(1))
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == 8  # the EMA went on too, not restarted
    assert_identical(ckpt["state_dict"], resumed.weights(0))
    assert files(out / "checkpoints") == {f"step000000{s}.ckpt" for s in (2, 4, 6, 8)} | {"last.ckpt"}
    assert files(out / "samples") == {f"step_000000{s}.png" for s in (2, 4, 6, 8)} | {"last.png"}
    assert_only_rank_0_wrote(out, first, resumed)


def slow_run_at_step_3(tmp_path: Path, fashion_root: Path, out: Path, ranks: tuple[int, ...] = (0, 1)) -> Run:
    """A DDP run of up to 1000 steps, slowed to 1 s a step from step 3 on (``ddp_cli.SLOW_STEP_S``) on ``ranks``,
    returned once it is there (killed and failed if it never gets there), so a test can signal it mid-training."""
    run = Run(tmp_path, "record", "--dataset", "fashion-mnist", "--data-root", str(fashion_root), "--out", str(out),
              *TINY, *DDP, "--max-steps", "1000", slow_from=f"3:{','.join(map(str, ranks))}")
    deadline = time.monotonic() + 120
    while not (run.record / "at-step").exists():
        if run.proc.poll() is not None or time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"the run never reached step 3\n{run.log()}")
        time.sleep(0.01)
    return run


@pytest.mark.parametrize("sig, to", [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGTERM, 1)],
                         ids=["SIGTERM-rank0", "SIGINT-rank0", "SIGTERM-rank1"])
def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(fashion_root: Path, tmp_path: Path, sig, to):
    """The signal goes to one process alone (``kill PID``): the main one, or the rank Lightning started. The ranks
    agree on the stop at the step's end and save last.ckpt together (saving is collective: a rank saving alone
    waits for the others for ever); rank 0 says so and exits 1, rank 1 exits 0 (to Lightning a rank it started
    that exits non-zero has crashed)."""
    out = tmp_path / "run"
    run = slow_run_at_step_3(tmp_path, fashion_root, out)
    try:
        os.kill(run.rank(to)["pid"], sig)
        status = run.wait(timeout=30)
    finally:
        run.kill()
    err, name = run.stderr.read_text(), signal.Signals(sig).name
    assert status == 1 and "Traceback" not in err, run.log()
    assert [run.exit_status(r) for r in (0, 1)] == ["1", "0"]  # rank 1 leaves the report to rank 0
    last = out / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 3 <= step < 1000
    assert err.count(f"Error: stopped by {name} at step {step}; checkpoint: {last}; to go on, run the same "
                     f"command with --resume {last}") == 1, run.log()
    assert_only_rank_0_wrote(out, run)


@pytest.mark.parametrize("to, gap", [("group", 0.3), ("rank0", 0.05), ("rank0", 0.3), ("rank1", 0.3)])
def test_ctrl_c_twice_stops_every_rank_at_once_without_a_traceback(fashion_root: Path, tmp_path: Path, gap, to):
    """A second signal stops at once. Ctrl-C in a terminal signals every process of the foreground group (both
    ranks get SIGINT twice, and each ends as the signal ends a process); ``kill -INT PID`` twice reaches one rank,
    which ends, and the other, blocked in a gloo collective with it, must not print the broken connection as a
    traceback: it says in one line that another rank ended and it stopped without a checkpoint of this step.

    Only the signalled ranks are slowed: the other waits in the step's all-reduce and sees its peer end at once. Were
    it mid-step too, Lightning's watcher in rank 0 (it polls the rank it started every 5 s and SIGKILLs every rank
    once that one exits non-zero) could end rank 0 before rank 0 reached a collective and said so."""
    out = tmp_path / "run"
    run = slow_run_at_step_3(tmp_path, fashion_root, out, (0, 1) if to == "group" else (int(to[-1]),))
    try:
        for second in (False, True):
            time.sleep(gap if second else 0)
            if to == "group":  # as a terminal's Ctrl-C
                os.killpg(run.proc.pid, signal.SIGINT)
            else:  # kill -INT PID
                os.kill(run.rank(int(to[-1]))["pid"], signal.SIGINT)
        status = run.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{run.rank(r)['pid']}").exists() for r in (0, 1)):
            if time.monotonic() > deadline:
                pytest.fail(f"a rank is still running 30 s after the second Ctrl-C\n{run.log()}")
            time.sleep(0.05)
    finally:
        run.kill()
    err = run.stderr.read_text()
    assert status != 0 and "Traceback" not in err and "Connection" not in err, run.log()
    errors = [line for line in err.splitlines() if line.startswith("Error")]
    if to == "group":  # every rank ended as the signal ends a process
        assert errors == [], run.log()
    else:  # the rank left says so, once
        assert len(errors) == 1 and (errors[0].startswith("Error: another rank of this DDP run ended at once (a "
                                                          "second signal, or a crash), so this one stopped at step")
                                     or errors[0].startswith("Error: stopped by SIGINT")), run.log()
