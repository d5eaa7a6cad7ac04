"""``ddpm-serve``: a thin click command: load one model, build ``create_app`` over a ``Scheduler``, run uvicorn."""

from __future__ import annotations

import copy
import errno
import ipaddress
import logging
import os
import signal
import socket

import click

from runtime.backend_options import backend_options
from runtime.bundled import resolve
from runtime.errors import ModelError

API_KEY_ENV = "DDPM_SERVE_API_KEY"
CPU_MAX_BATCH = 8  # images per call on the CPU provider: the best of the load test on a 2-core CPU (docs/benchmarks.md)
GPU_MAX_BATCH = 256  # elsewhere: not measured here (no GPU was available)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1 or localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to any interface
        return False


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything slow happens (a port in use fails at once, in one line); bound as
    uvicorn binds (IPv6 for an address with a colon, SO_REUSEADDR). uvicorn listens on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        why = "the address is already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise click.ClickException(f"cannot listen on {host}:{port}: {why}") from None
    return sock


class StripQuery(logging.Filter):
    """Drops the query string from uvicorn's access-log lines: no endpoint takes one, and a client that puts a key or
    token in the URL must not find it in the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:  # (client, method, path?query, http, status)
            client, method, path, http, status = record.args
            record.args = (client, method, str(path).split("?", 1)[0], http, status)
        return True


def log_config() -> dict:
    """uvicorn's logging, with the access log on stderr (results go nowhere else) and without query strings."""
    import uvicorn

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config.setdefault("filters", {})["strip_query"] = {"()": StripQuery}
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["handlers"]["access"]["filters"] = ["strip_query"]
    return config


def read_api_key(path: str | None) -> str | None:
    """The key from ``--api-key-file`` (surrounding whitespace stripped), else ``$DDPM_SERVE_API_KEY``, else None."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"cannot read {path}: {getattr(e, 'strerror', None) or e}",
                                     param_hint="--api-key-file") from None
        if not key:
            raise click.BadParameter(f"{path} is empty", param_hint="--api-key-file")
        return key
    return os.environ.get(API_KEY_ENV, "").strip() or None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", required=False, default=None)
@click.option("--host", default="127.0.0.1",
              help="Address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) needs an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="TCP port (0: any free port).")
@backend_options("/v1/model and every answer say it.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of the backend (default: all cores).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Images per predictor call, over all requests (a guided image makes two rows). Default: 8 on the "
                   "CPU (onnxruntime's best batch on a small CPU; see docs/benchmarks.md), 256 on a GPU.")
@click.option("--max-images", type=click.IntRange(min=1), default=64, help="Most images one request may ask for.")
@click.option("--queue-limit", type=click.IntRange(min=1), default=1024,
              help="Most images queued or in flight; beyond it requests get 429 with Retry-After.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=600.0,
              help="Seconds a request may take, queueing included; then it is cancelled (504).")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0,
              help="On SIGTERM/Ctrl-C: seconds to finish the requests in flight (new ones get 503); then exit.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help=f"File holding the API key (else ${API_KEY_ENV}). Clients send 'Authorization: Bearer KEY' or "
                   "'X-API-Key: KEY'; every endpoint but /healthz needs it.")
@click.option("--no-batching", is_flag=True,
              help="One request at a time through the offline pipeline (the naive server, for comparison).")
def main(model, host, port, provider, dtype, threads, max_batch, max_images, queue_limit, deadline, grace, api_key_file,
         no_batching) -> None:
    """Serve images from an exported MODEL over HTTP (POST /v1/images, GET /v1/model, /healthz, /metrics).

    MODEL is an .onnx file (TorchScript .pt or .pt2 need torch) or the name of a bundled model; without MODEL the
    default bundled model is used. The model is fixed at startup: no request names a file. Requests share the
    predictor calls (continuous batching): every image in flight advances one step per call, each at its own
    step. API docs: /docs. Logs go to stderr.
    """
    import uvicorn

    from runtime.pipeline import load
    from serve.app import begin_shutdown, create_app
    from serve.scheduler import Scheduler

    if queue_limit < max_images:
        raise click.BadParameter(f"must be at least --max-images ({max_images}), got {queue_limit}",
                                 param_hint="--queue-limit")
    api_key = read_api_key(api_key_file)
    if api_key is None and not is_loopback(host):
        raise click.UsageError(f"--host {host} is not a loopback address: give an API key (--api-key-file or "
                               f"${API_KEY_ENV}), or listen on 127.0.0.1")
    sock = listen(host, port)  # before the model loads: a port in use fails in a moment, not after the load
    try:
        path, bundled = resolve(model)
        if bundled:
            click.echo(f"using the bundled model {bundled} ({path})", err=True)
        pipeline = load(path, provider, dtype=dtype, threads=threads)
        sha256 = pipeline.sha256
    except ModelError as e:
        sock.close()
        raise click.ClickException(str(e)) from None
    if max_batch is None:
        max_batch = CPU_MAX_BATCH if pipeline.backend.device == "cpu" else GPU_MAX_BATCH
    scheduler = Scheduler(pipeline, max_batch=max_batch, queue_limit=queue_limit, batching=not no_batching)
    app = create_app(scheduler, pipeline, api_key=api_key, max_images=max_images, deadline_s=deadline, grace_s=grace)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM / SIGINT: stop admitting at once, then drain
            begin_shutdown(app)
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:  # uvicorn says where it listens only on sockets it bound
            await super().startup(sockets=sockets)
            if not self.should_exit:
                bound = sock.getsockname()[1]
                address = f"[{host.strip('[]')}]" if ":" in host else host
                logging.getLogger("uvicorn.error").info(f"Uvicorn running on http://{address}:{bound} "
                                                        "(Press CTRL+C to quit)")

    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=grace, log_config=log_config(),
                            lifespan="on")
    click.echo(f"serving {path.name} (sha256 {sha256[:12]}, provider {pipeline.runs_on}, "
               f"{'continuous batching up to ' + str(max_batch) if not no_batching else 'no batching'}, "
               f"{'no API key' if api_key is None else 'API key required'})", err=True)
    # uvicorn re-raises the signal that stopped it once it is done; a drained server then exits 0, not killed by it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    Server(config).run(sockets=[sock])
    click.echo("ddpm-serve stopped", err=True)


if __name__ == "__main__":
    main()
