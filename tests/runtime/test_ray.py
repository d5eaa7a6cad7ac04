"""ddpm-generate --ray and runtime.ray.images on a real (local) Ray cluster: the same images as one process, a worker
killed mid-shard, the driver interrupted and rerun, and one-line errors for bad input.

The cluster is started once for the module (``ray start --head --block`` in its own session) with token
authentication, as Ray sets a cluster up when this machine has a token, but with HOME in a temporary folder so
the token is the test's own. Every driver runs in a subprocess, so no test depends on Ray's state in the test
process. Every cluster keeps its files (sessions, the ``ray_current_cluster`` record) in a temporary folder of its
own (``RAY_TMPDIR``, for the head and its drivers alike) and is stopped as Ray expects (SIGTERM to ``ray start
--block``, which stops its processes): nothing is left in /tmp/ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

import runtime
from runtime.generate_cli import main
from tests.cli_checks import one_error_line

ray = pytest.importorskip("ray", reason="Ray is not installed (the cluster extra: pip install 'ddpm-toolkit[cluster]')")

REPO = Path(runtime.__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


DEFAULT_RAY_FILES = Path("/tmp/ray")  # Ray's temp folder when RAY_TMPDIR is not set


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.fixture(scope="module", autouse=True)
def nothing_left_in_the_default_ray_folder():
    """No cluster of these tests writes to /tmp/ray (a session folder, the ray_current_cluster record): what a user
    runs after the suite must not find a cluster of ours, dead or alive."""
    before = entries(DEFAULT_RAY_FILES)
    yield
    assert entries(DEFAULT_RAY_FILES) <= before, sorted(entries(DEFAULT_RAY_FILES) - before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def stop(head: subprocess.Popen) -> None:
    """Stop ``ray start --block`` as Ray expects: SIGTERM, on which it stops the processes it started; its whole
    session is killed only if it has not stopped in 30 s."""
    if head.poll() is None:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    kill_group(head)


@contextmanager
def ray_tmpdir() -> Iterator[Path]:
    """A temporary folder for Ray's files (``RAY_TMPDIR``): short, because Ray puts Unix sockets in it."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def start_head(env: dict, cpus: int, port: int, log: Path) -> subprocess.Popen:
    ray_cli = Path(sys.executable).parent / "ray"
    with open(log, "a") as f:
        return subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--num-cpus={cpus}", "--num-gpus=0",
                                 f"--port={port}", "--include-dashboard=false", "--disable-usage-stats"],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def wait_for_head(head: subprocess.Popen, address: str, env: dict, log: Path) -> None:
    deadline = time.monotonic() + 120
    while subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r}); ray.shutdown()"],
                         env=env, capture_output=True, timeout=120).returncode:
        if head.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the Ray cluster did not start: {log.read_text()[-2000:]}")
        time.sleep(1)


@contextmanager
def running_cluster(home: Path, cpus: int, token: bool, port: int | None = None) -> Iterator[tuple[str, dict]]:
    """``ray start --head --block`` in its own session, with HOME at ``home`` and its files in a temporary folder of
    its own: its address and the environment its drivers use (the same HOME, so the same token, and the same
    RAY_TMPDIR). With ``token`` the cluster uses token authentication, as Ray sets one up on a machine that has a
    token; without, it runs with none."""
    port = port or free_port()
    with ray_tmpdir() as tmp:
        env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(tmp),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_MODE", None)
        if token:
            subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"], env=env,
                           check=True, capture_output=True)
        head_env = {**env, "RAY_AUTH_MODE": "token" if token else "disabled"}
        head = start_head(head_env, cpus, port, home / "ray-start.log")
        address = f"127.0.0.1:{port}"
        try:
            wait_for_head(head, address, head_env, home / "ray-start.log")
            yield address, env
        finally:
            stop(head)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU Ray cluster with token authentication for the module: its address and its drivers' environment."""
    with running_cluster(tmp_path_factory.mktemp("ray-home"), cpus=2, token=True) as c:
        yield c


def generate(env: dict, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ddpm-generate ARGS`` as a subprocess (its own session: a timeout kills it and its children)."""
    p = subprocess.Popen([sys.executable, "-m", "runtime.generate_cli", *map(str, args)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        kill_group(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_script(path: Path, text: str, *args, env: dict, timeout: float = 300) -> tuple[str, str]:
    """Write ``text`` to ``path`` and run it with ``args`` (its own session: a timeout kills it and its children);
    returns (stdout, stderr) of a run that exited 0."""
    path.write_text(text)
    p = subprocess.Popen([sys.executable, str(path), *map(str, args)], env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        kill_group(p)
    assert p.returncode == 0, err[-3000:]
    return out, err


def one_process(tmp_path: Path, *args) -> Path:
    out = tmp_path / "one-process"
    r = CliRunner().invoke(main, [str(a) for a in (*args, "--out", out)])
    assert r.exit_code == 0, r.output
    return out


def assert_same_run(folder: Path, reference: Path) -> None:
    """Image for image (PNG bytes), manifest.jsonl, samples.npz and grid.png where written, and run.json."""
    names = sorted(p.name for p in reference.iterdir() if not p.name.startswith("manifest-"))
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("manifest-")) == names
    for name in names:
        if (reference / name).is_file():
            assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(folder.glob(".*tmp*")), "no temporary file is left"


def test_a_ray_run_writes_what_one_process_writes(cluster, cond_onnx, tmp_path):
    address, env = cluster
    args = [cond_onnx, "-n", 12, "--batch-size", 2, "--sampler", "ddim", "--steps", 5, "--format", "both", "--grid",
            "--seed", 4]
    # --ray alone joins the running cluster (RAY_ADDRESS here)
    r = generate({**env, "RAY_ADDRESS": address}, *args, "--out", tmp_path / "ray", "--ray", "--workers", 3)
    assert r.returncode == 0, r.stderr
    assert "12 images in" in r.stdout and "on Ray: 3 tasks of 1 CPU, 0 retried" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr and "Ray cluster at" in r.stderr, r.stderr
    assert_same_run(tmp_path / "ray", one_process(tmp_path, *args))
    assert (sorted(p.name for p in (tmp_path / "ray").glob("manifest-*"))
            == [f"manifest-{i}-of-3.jsonl" for i in range(3)])

    again = generate(env, *args, "--out", tmp_path / "ray", "--ray", address)  # complete: nothing to make
    assert again.returncode == 0 and "0 images in" in again.stdout and "12 already there" in again.stdout, again

    other = [*args[:-1], 5]  # another seed: refused in a folder that holds this run, unless --overwrite
    refused = generate(env, *other, "--out", tmp_path / "ray", "--ray", address)
    assert refused.returncode != 0 and "other settings (seed differ)" in refused.stderr, refused.stderr
    replaced = generate(env, *other, "--out", tmp_path / "ray", "--ray", address, "--overwrite")
    assert replaced.returncode == 0 and "12 images in" in replaced.stdout, replaced.stderr
    assert_same_run(tmp_path / "ray", one_process(tmp_path / "other", *other))


def test_a_latent_model_on_ray_writes_what_one_process_writes(cluster, latent_onnx, tmp_path):
    """Each worker loads the model file and its decoder stage beside it; the decoder runs in the workers."""
    address, env = cluster
    args = [latent_onnx, "-n", 6, "--batch-size", 2, "--sampler", "dpmpp-2m", "--steps", 4, "--guidance", 1.5,
            "--format", "both", "--grid", "--seed", 1]
    r = generate(env, *args, "--out", tmp_path / "ray", "--ray", address, "--workers", 2)
    assert r.returncode == 0 and "6 images in" in r.stdout, r.stderr
    assert_same_run(tmp_path / "ray", one_process(tmp_path, *args))


OPENVINO_DATASET = """
import json, sys
import numpy as np
import ray
import runtime
import runtime.ray

model, dtype = sys.argv[1:3]
ray.init(address=sys.argv[3])
ds = runtime.ray.images(model, 4, seed=2, sampler="ddim", steps=5, batch_size=2, provider="openvino", dtype=dtype)
rows = sorted(ds.take_all(), key=lambda row: row["index"])
want = runtime.load(model, "openvino", dtype=dtype).generate(4, seed=2, sampler="ddim", steps=5)
print(json.dumps([bool(np.array_equal(r["image"], want[k])) for k, r in enumerate(rows)]))
"""


def test_openvino_workers_run_in_the_precision_asked_for(cluster, cond_onnx, tmp_path):
    """``--ray --provider openvino`` and ``runtime.ray.images(provider="openvino")``: the workers' images are a
    one-process OpenVINO run's, and the run records their precision."""
    pytest.importorskip("openvino", reason="needs the openvino extra")
    import openvino

    from runtime.backends.openvino_model import cpu_bf16

    dtype = "bf16" if cpu_bf16(openvino.Core()) else "fp32"
    address, env = cluster
    args = [cond_onnx, "-n", 6, "--batch-size", 2, "--sampler", "ddim", "--steps", 5, "--provider", "openvino",
            "--dtype", dtype]
    r = generate(env, *args, "--out", tmp_path / "ray", "--ray", address, "--workers", 2)
    assert r.returncode == 0 and "openvino:CPU" in r.stdout, r.stderr
    assert_same_run(tmp_path / "ray", one_process(tmp_path, *args))
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert run.get("precision", "fp32") == dtype
    out, _ = run_script(tmp_path / "dataset.py", OPENVINO_DATASET, cond_onnx, dtype, address,
                        env={**env, "RAY_AUTH_MODE": "token"})
    assert json.loads(out.strip().splitlines()[-1]) == [True] * 4


def shard_worker_pids() -> list[int]:
    """PIDs of the processes running a shard task (Ray names them after the task: ray::ddpm-shard-I-of-K)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::ddpm-shard-"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def recorded(folder: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in folder.glob("manifest-*-of-*.jsonl"))


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.05)


# ddpm-generate with its own SIGINT disposition, whatever it inherited: a test runner started in the background
# (nohup, CI jobs) hands children SIGINT ignored, and this driver must take Ctrl-C as a user's terminal delivers it.
DRIVER = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from runtime.generate_cli import main; main(prog_name='ddpm-generate')")


def start_generate(env: dict, *args) -> tuple[subprocess.Popen, Path]:
    """``ddpm-generate ARGS`` started in its own session, its output going to a log file beside ``--out``."""
    log = Path(args[args.index("--out") + 1]).with_suffix(".log")
    with open(log, "w") as f:  # a file, not a pipe: the bar can never block the run
        p = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], env=env,
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return p, log


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory) -> Path:
    """A toy predictor with T = 1000 at 3×96×96: a DDPM image takes about 0.5 s here (a 2-core EPYC), so a shard of
    six lasts long enough to kill a worker or interrupt the driver in the middle of it."""
    from tests.toy_onnx import make_toy_predictor

    return make_toy_predictor(tmp_path_factory.mktemp("toy") / "slow.onnx", channels=3, image_size=96, timesteps=1000)


SLOW = ["-n", 12, "--batch-size", 1, "--sampler", "ddpm", "--seed", 2]


def test_a_worker_killed_mid_shard_is_retried_and_the_run_is_identical(cluster, slow_onnx, tmp_path):
    address, env = cluster
    out = tmp_path / "killed"
    p, log = start_generate(env, slow_onnx, *SLOW, "--out", out, "--ray", address, "--workers", 2)
    try:
        wait_until(lambda: recorded(out) >= 1 and len(shard_worker_pids()) == 2 or p.poll() is not None,
                   "a shard has an image on disk")
        shard0 = out / "manifest-0-of-2.jsonl"
        wait_until(lambda: shard0.is_file() and shard0.read_text().count("\n") >= 1 or p.poll() is not None,
                   "shard 0 has an image on disk")
        assert p.poll() is None, log.read_text()
        victim = next(pid for pid in shard_worker_pids()
                      if (Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ddpm-shard-0-of-2")))
        assert 1 <= shard0.read_text().count("\n") < 6, "killed in the middle of its shard"
        os.kill(victim, signal.SIGKILL)
        p.wait(timeout=300)
    finally:
        kill_group(p)
    text = log.read_text()
    assert p.returncode == 0, text
    assert "12 images in" in text and "on Ray: 2 tasks of 1 CPU, 1 retried" in text, text
    assert_same_run(out, one_process(tmp_path, slow_onnx, *SLOW))


def test_ctrl_c_on_the_driver_then_the_same_command_makes_only_the_missing_images(cluster, slow_onnx, tmp_path):
    address, env = cluster
    out = tmp_path / "interrupted"
    args = [slow_onnx, *SLOW, "--out", out, "--ray", address, "--workers", 2]
    p, log = start_generate(env, *args)
    try:
        wait_until(lambda: recorded(out) >= 2 or p.poll() is not None, "two images are on disk")
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    finally:
        kill_group(p)
    text = log.read_text()
    assert p.returncode != 0 and "interrupted; rerun the same command" in text and "Traceback" not in text, text
    wait_until(lambda: not shard_worker_pids(), "the interrupted run's tasks are gone", timeout=30)
    made = recorded(out)
    assert 2 <= made < 12 and not (out / "manifest.jsonl").exists()
    r = generate(env, *args)
    assert r.returncode == 0, r.stderr
    assert f"{12 - made} images in" in r.stdout and f"{made} already there" in r.stdout, r.stdout
    assert_same_run(out, one_process(tmp_path, slow_onnx, *SLOW))


def test_a_worker_larger_than_any_node_is_a_one_line_error_and_writes_nothing(cluster, uncond_onnx, tmp_path):
    address, env = cluster
    r = generate(env, uncond_onnx, "-n", 4, "--out", tmp_path / "o", "--ray", address, "--cpus-per-worker", 64)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert errors == ["Error: no node of the Ray cluster can hold a worker of 64 CPUs "
                      "(the largest has 2 CPUs, 0 GPUs); "
                      "ask for less with --cpus-per-worker/--gpus-per-worker"], r.stderr
    assert not (tmp_path / "o").exists()


def test_a_cluster_without_tokens_is_joined_from_a_machine_that_has_one(cluster, uncond_onnx, tmp_path):
    """This machine has a Ray token (the module cluster's), the cluster runs without token authentication: the
    driver must not send one (the cluster could not call it back, and the run's actors would die)."""
    _, env = cluster
    with running_cluster(tmp_path, cpus=1, token=False) as (address, open_env):
        args = [uncond_onnx, "-n", 3, "--steps", 4, "--out", tmp_path / "o"]
        for how in (["--ray", address], ["--ray"]):  # named, and found (RAY_ADDRESS)
            r = generate({**env, "RAY_ADDRESS": address}, *args, *how, "--overwrite")
            assert r.returncode == 0, r.stderr
            assert "3 images in" in r.stdout and "on Ray: 1 task of 1 CPU" in r.stdout, r.stdout
    assert_same_run(tmp_path / "o", one_process(tmp_path, *args[:-2]))


def listening_silently() -> socket.socket:
    """A port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("token, auth_mode, message", [
    (None, None, "uses token authentication and this machine has no Ray token: copy the cluster's "
                 "~/.ray/auth_token here, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"),
    ("0" * 64, None, "refused this machine's Ray token: use the cluster's ~/.ray/auth_token, or set RAY_AUTH_TOKEN"),
    ("0" * 64, "token", "refused this machine's Ray token (RAY_AUTH_MODE=token)"),
    (None, "disabled", "uses token authentication, and RAY_AUTH_MODE=disabled here sends no token: unset it, or set "
                       "it to token"),
    ("silent", None, "does not answer as a Ray head (no reply from its GCS in 5 s); is that the port `ray start "
                     "--head` printed?"),
], ids=["no-token", "wrong-token", "wrong-token-chosen", "auth-disabled", "not-a-ray-head"])
def test_a_cluster_that_cannot_be_joined_is_one_line_at_once(cluster, uncond_onnx, tmp_path, token, auth_mode,
                                                               message):
    address, env = cluster
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    if token not in (None, "silent"):
        (home / ".ray" / "auth_token").write_text(token)
    env = {**env, "HOME": str(home), **({"RAY_AUTH_MODE": auth_mode} if auth_mode else {})}
    silent = listening_silently() if token == "silent" else None
    if silent is not None:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        started = time.monotonic()
        r = generate(env, uncond_onnx, "-n", 2, "--out", tmp_path / "o", "--ray", address, timeout=120)
        took = time.monotonic() - started
    finally:
        if silent is not None:
            silent.close()
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and f"Error: the Ray cluster at {address} " in errors[0] and message in errors[0], r.stderr
    assert took < 30, f"it took {took:.0f} s to say so"  # ray.init alone retries for minutes
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--ray", "127.0.0.1:{closed}"], "cannot reach the Ray cluster at 127.0.0.1:{closed}: connection refused"),
    (["--ray", "ray://127.0.0.1:{closed}"], "cannot reach the Ray cluster at ray://127.0.0.1:{closed}"),
    (["--ray", "--workers", "0"], "Invalid value for '--workers': 0 is not in the range x>=1"),
    (["--ray", "--workers", "5"], "--workers 5 is more than the 4 images of this run; ask for at most 4"),
    (["--ray", "cluster.example"], "Invalid value for --ray: auto, local, HOST:PORT or ray://HOST:PORT"),
    (["--workers", "2"], "--workers applies to --ray runs only"),
    (["--ray", "--shard", "0/2"], "--shard and --ray do not combine"),
], ids=["unreachable", "unreachable-client", "no-workers", "more-workers-than-images", "not-an-address",
        "workers-without-ray", "shard-and-ray"])
def test_bad_ray_input_is_one_line_and_writes_nothing(args, message, uncond_onnx, tmp_path):
    closed = free_port()  # nothing listens there
    out = tmp_path / "o"
    r = CliRunner().invoke(main, [str(uncond_onnx), "-n", "4", "--out", str(out),
                                  *[a.format(closed=closed) for a in args]])
    assert message.format(closed=closed) in one_error_line(r)
    assert not out.exists()


DATASET = """
import json, sys
import numpy as np
import ray
import pyarrow.parquet as pq
import runtime
import runtime.ray

cond, uncond, out = sys.argv[1:4]
ray.init(address=sys.argv[4])
result = {}
ds = runtime.ray.images(cond, 10, seed=3, sampler="ddim", steps=5, batch_size=3, concurrency=2)
rows = sorted(ds.take_all(), key=lambda row: row["index"])
g = runtime.load(cond, "cpu")
result["indices"] = [int(r["index"]) for r in rows]
result["seeds"] = sorted({int(r["seed"]) for r in rows})
result["classes"] = [int(r["class"]) for r in rows]
result["equal"] = [bool(np.array_equal(r["image"], g.generate(1, seed=3, sampler="ddim", steps=5, start_index=k)[0]))
                   for k, r in enumerate(rows)]
result["shape"] = list(rows[0]["image"].shape) + [str(rows[0]["image"].dtype)]
# chained into a pipeline of the user's: filter, then parquet files
ds = runtime.ray.images(uncond, 6, seed=1, steps=4, concurrency=1, classes=None)
ds.filter(lambda row: row["index"] % 2 == 0).write_parquet(out)
table = pq.read_table(out).sort_by("index")
u = runtime.load(uncond, "cpu").generate(6, seed=1, steps=4)
result["parquet_indices"] = table.column("index").to_pylist()
result["parquet_classes"] = table.column("class").to_pylist()
images = [np.asarray(v).reshape(u.shape[1:]) for v in table.column("image").to_numpy(zero_copy_only=False)]
result["parquet_equal"] = [bool(np.array_equal(im, u[k])) for im, k in zip(images, result["parquet_indices"])]
print(json.dumps(result))
"""


def test_the_ray_data_source_gives_row_k_equal_to_image_k(cluster, cond_onnx, uncond_onnx, tmp_path):
    address, env = cluster
    out, _ = run_script(tmp_path / "dataset.py", DATASET, cond_onnx, uncond_onnx, tmp_path / "parquet", address,
                        env={**env, "RAY_AUTH_MODE": "token"})
    result = json.loads(out.strip().splitlines()[-1])
    assert result["indices"] == list(range(10)) and result["seeds"] == [3]
    assert result["classes"] == [k % 3 for k in range(10)]  # classes cycle over the indices
    assert all(result["equal"]) and result["shape"] == [16, 16, 3, "uint8"]
    assert result["parquet_indices"] == [0, 2, 4] and result["parquet_classes"] == [None] * 3
    assert all(result["parquet_equal"]) and len(result["parquet_equal"]) == 3


def test_the_ray_data_source_checks_its_settings_at_once(cond_onnx):
    import runtime.ray
    from runtime.errors import SettingsError

    with pytest.raises(SettingsError, match="steps must be between 1 and T = 100, got 500"):
        runtime.ray.images(cond_onnx, 4, steps=500)
    with pytest.raises(SettingsError, match="unknown class 'zebra'"):
        runtime.ray.images(cond_onnx, 4, classes="zebra")
    assert not ray.is_initialized()  # nothing was started for a call that fails


def own_ray_env(home: Path, tmp: Path) -> dict:
    """A driver's environment with Ray's files in ``tmp`` and no cluster named (no RAY_ADDRESS) and no token."""
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    return env


IMAGES_NO_ADDRESS = """
import json, sys
import numpy as np
import runtime, runtime.ray
rows = sorted(runtime.ray.images(sys.argv[1], 3, seed=1, steps=4, classes=None).take_all(), key=lambda r: r["index"])
u = runtime.load(sys.argv[1], "cpu").generate(3, seed=1, steps=4)
print(json.dumps([bool(np.array_equal(r["image"], u[k])) for k, r in enumerate(rows)]))
"""


def test_a_recorded_cluster_that_is_gone_counts_as_none(uncond_onnx, tmp_path):
    """A cluster killed without `ray stop` leaves its address in Ray's temp folder (ray_current_cluster): a bare
    --ray starts a local cluster and says so, and so does runtime.ray.images with no address."""
    closed = free_port()
    with ray_tmpdir() as tmp:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed}")
        env = own_ray_env(tmp_path, tmp)
        args = [uncond_onnx, "-n", 4, "--steps", 4, "--out", tmp_path / "o"]
        r = generate(env, *args, "--ray", "--workers", 2)
        assert r.returncode == 0, r.stderr
        assert (f"the Ray cluster recorded on this machine (127.0.0.1:{closed}) is gone; starting a local one"
                in r.stderr), r.stderr
        assert "4 images in" in r.stdout and "on Ray: 2 tasks of 1 CPU" in r.stdout, r.stdout
        assert_same_run(tmp_path / "o", one_process(tmp_path, *args[:-2]))

        out, err = run_script(tmp_path / "images.py", IMAGES_NO_ADDRESS, uncond_onnx, env=env, timeout=180)
        assert "is gone; starting a local one" in err
        assert json.loads(out.strip().splitlines()[-1]) == [True] * 3


@pytest.mark.parametrize("how", ["refused", "silent"])
def test_runtime_ray_images_at_an_address_that_does_not_answer_is_one_line(uncond_onnx, how):
    import runtime.ray
    from runtime.errors import ClusterError

    silent = listening_silently() if how == "silent" else None
    address = f"127.0.0.1:{silent.getsockname()[1] if silent else free_port()}"
    started = time.monotonic()
    try:
        with pytest.raises(ClusterError) as e:
            runtime.ray.images(uncond_onnx, 2, steps=4, address=address)
    finally:
        if silent is not None:
            silent.close()
    assert time.monotonic() - started < 30
    message = str(e.value)
    assert "\n" not in message and f"Ray cluster at {address}" in message, message
    assert ("connection refused" if how == "refused" else "does not answer as a Ray head") in message, message
    assert not ray.is_initialized()


def test_a_head_killed_mid_run_is_one_line_and_the_same_command_finishes_the_run(slow_onnx, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    out, head_log = tmp_path / "o", tmp_path / "head.log"
    with ray_tmpdir() as tmp:
        env = own_ray_env(tmp_path, tmp)
        head_env = {**env, "RAY_AUTH_MODE": "disabled"}
        head = start_head(head_env, 2, port, head_log)
        try:
            wait_for_head(head, address, head_env, head_log)
            args = [slow_onnx, *SLOW, "--out", out, "--ray", address, "--workers", 2]
            p, log = start_generate(env, *args)
            try:
                wait_until(lambda: recorded(out) >= 2 or p.poll() is not None, "two images are on disk")
                assert p.poll() is None, log.read_text()
                os.killpg(head.pid, signal.SIGKILL)  # the head and everything it started, at once
                head.wait()
                killed = time.monotonic()
                p.wait(timeout=120)
                took = time.monotonic() - killed
            finally:
                kill_group(p)
            text = log.read_text()
            errors = [line for line in text.splitlines() if line.startswith("Error")]
            assert p.returncode != 0 and "Traceback" not in text, text
            assert len(errors) == 1 and errors[0].endswith(f":{port} went away; rerun the same command to finish "
                                                           "the run"), text
            assert took < 60, f"it took {took:.0f} s to say so"
            made = recorded(out)
            assert 2 <= made < 12 and not (out / "manifest.jsonl").exists()

            head = start_head(head_env, 2, port, head_log)  # the cluster is back, at the same address
            wait_for_head(head, address, head_env, head_log)
            r = generate(env, *args)
            assert r.returncode == 0, r.stderr
            assert f"{12 - made} images in" in r.stdout and f"{made} already there" in r.stdout, r.stdout
        finally:
            stop(head)
    assert_same_run(out, one_process(tmp_path, slow_onnx, *SLOW))
