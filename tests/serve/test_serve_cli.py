"""ddpm-serve: no API key, no listening beyond loopback; the app it builds checks the key; SIGTERM drains, exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.serve.helpers import SERVE_MODULES

for _module in SERVE_MODULES:
    pytest.importorskip(_module, reason="needs the serve extra: pip install -e '.[serve,dev]'")

import httpx  # noqa: E402

import runtime  # noqa: E402
from serve.cli import API_KEY_ENV, is_loopback, main  # noqa: E402
from tests.serve.helpers import client_class, wait_until  # noqa: E402

REPO = Path(runtime.__file__).resolve().parents[1]  # this checkout, for the subprocess


def serve(*args, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env={API_KEY_ENV: None, **(env or {})})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_a_non_loopback_address_needs_an_api_key(uncond_onnx, host):
    r = serve(uncond_onnx, "--host", host)
    assert r.exit_code == 2 and "is not a loopback address: give an API key" in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: --host")  # one line, no traceback


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com", ""]))


def test_bad_options_are_one_line_errors(uncond_onnx, tmp_path):
    empty = tmp_path / "empty.key"
    empty.write_text("  \n")
    for args, message in (((uncond_onnx, "--host", "0.0.0.0", "--api-key-file", empty), f"{empty} is empty"),
                          ((uncond_onnx, "--api-key-file", tmp_path / "missing"), "cannot read"),
                          ((uncond_onnx, "--max-images", 10, "--queue-limit", 5), "must be at least --max-images"),
                          ((tmp_path / "missing.onnx",), "does not exist"),
                          ((tmp_path,), f"{tmp_path} is a directory, not a model file")):
        r = serve(*args)
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, (args, r.output)


def test_a_port_in_use_fails_at_once_before_the_model_loads(uncond_onnx, monkeypatch):
    import socket

    import runtime.pipeline

    loads = []
    monkeypatch.setattr(runtime.pipeline, "load", lambda *a, **k: loads.append(a))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = serve(uncond_onnx, "--port", port)
    assert r.exit_code == 1 and loads == [], r.output
    assert r.output.strip() == f"Error: cannot listen on 127.0.0.1:{port}: the address is already in use"


def test_with_a_key_it_serves_beyond_loopback_and_the_app_checks_the_key(uncond_onnx, tmp_path, monkeypatch):
    """The key from --api-key-file (or the environment) lets --host 0.0.0.0 start; uvicorn's run is replaced, and
    the app it would have served answers 401 without the key or with a wrong one, 200 with it."""
    import uvicorn

    configs = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: configs.append(self.config))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main() sets handlers for the real run
    key = tmp_path / "api.key"
    key.write_text("file-key\n")
    assert serve(uncond_onnx, "--host", "0.0.0.0", "--port", 9, "--api-key-file", key, "--grace", 7).exit_code == 0
    assert serve(uncond_onnx, "--host", "::", env={API_KEY_ENV: "env-key"}).exit_code == 0
    (config, env_config) = configs
    assert (config.host, config.port, config.timeout_graceful_shutdown) == ("0.0.0.0", 9, 7)
    for cfg, good in ((config, "file-key"), (env_config, "env-key")):
        with client_class()(cfg.app) as client:
            body = {"n": 1, "sampler": "ddim", "steps": 3}
            assert client.post("/v1/images", json=body).status_code == 401
            assert client.post("/v1/images", json=body, headers={"X-API-Key": good + "x"}).status_code == 401
            assert client.post("/v1/images", json=body, headers={"Authorization": f"Bearer {good}"}).status_code == 200
            assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("grace, n, status, options", [
    (20, 32, 200, ("--max-batch", 64)), (0.3, 64, 503, ("--max-batch", 64)),
    (0.3, 256, 503, ("--max-batch", 256, "--max-images", 256, "--no-batching"))],
    ids=["drained", "grace-over", "grace-over-no-batching"])
def test_sigterm_finishes_the_request_in_flight_then_exits_0(slow_onnx, grace, n, status, options):
    """SIGTERM: the request in flight completes (200) within --grace; one that would outlast it gets 503 when the
    grace period ends. Either way the process exits 0, also --no-batching while a predictor call runs (one batch of
    256 DDPM-1000 images takes about 8 s: it stops at its next step, not after the batch)."""
    key = {"X-API-Key": "k"}
    env = {**os.environ, API_KEY_ENV: "k", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", slow_onnx, "--port", "0", "--threads", "1",
                             *map(str, options), "--grace", str(grace)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []

    def read_stderr() -> None:  # keeps the pipe drained; the lines arrive one by one
        for line in proc.stderr:
            err_lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        def address() -> str | None:
            assert proc.poll() is None, "".join(err_lines)
            found = [m for line in list(err_lines) if (m := re.search(r"running on (http://127\.0\.0\.1:\d+)", line))]
            return found[0].group(1) if found else None

        wait_until(address, timeout=30, what="ddpm-serve to start")
        base = address()
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{base}/healthz?api_key=topsecret").status_code == 200  # a key in the URL: not logged
        result = {}
        request = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{base}/v1/images", json={"n": n, "sampler": "ddpm"}, headers=key, timeout=60)))
        request.start()  # DDPM-1000: 32 images take about 1 s here, 64 about 2 s
        wait_until(lambda: f"ddpm_serve_images_in_flight {n}.0" in httpx.get(f"{base}/metrics", headers=key).text,
                   what="the request in the batch")
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        request.join(30)
        r = result["r"]
        assert r.status_code == status, r.text
        if status == 200:
            assert len(r.json()["images"]) == n
        else:
            assert r.headers["Retry-After"] and "grace period over" in r.json()["detail"]
        proc.wait(timeout=30)
        reader.join(10)
        out, err = proc.stdout.read(), "".join(err_lines)
        assert proc.returncode == 0, err
        assert time.monotonic() - sent < 15  # drained or cut at the grace period, not waited out
        assert out == "" and "Shutting down" in err and "ddpm-serve stopped" in err and "Traceback" not in err
        assert f'"POST /v1/images HTTP/1.1" {status}' in err  # the access log is on stderr too
        assert '"GET /healthz HTTP/1.1" 200' in err and "topsecret" not in err and "?" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
