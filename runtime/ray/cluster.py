"""Reaching a Ray cluster for a run: the optional import, the ``--ray`` address, the connection and its resources.

``--ray`` takes what ``ray.init(address=...)`` takes, checked first so that a bad one is one line and nothing is
written: nothing (a running cluster if there is one — ``RAY_ADDRESS`` or this machine's latest — else a new local
one), ``auto`` (a running one, or an error), ``local`` (always a new local one), ``HOST:PORT`` (a cluster's GCS) or
``ray://HOST:PORT`` (Ray Client). An explicit address is probed with a TCP connection before Ray is asked, because
``ray.init`` retries an unreachable address for minutes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ClusterError, reason

EXTRA = "cluster"  # pyproject's optional dependency that brings Ray
ADDRESS_FORMS = "auto, local, HOST:PORT or ray://HOST:PORT"
CONNECT_TIMEOUT_S = 5.0
_ADDRESS = re.compile(r"(?P<client>ray://)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


def driver_pipeline(model: Path, log: Callable[[str], None]):
    """The model as a driver loads it to check a run's settings before any worker starts: on the CPU with one
    thread (a .pt2 package where it was compiled for)."""
    from runtime.backends.backend import model_format
    from runtime.pipeline import load

    return load(model, "auto" if model_format(model) == "pt2" else "cpu", threads=1, log=log)


def require_ray(what: str = "--ray"):
    """The ``ray`` module, or a one-line ``ClusterError`` naming the extra that brings it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"{what} needs Ray, which is not installed here: pip install 'ddpm-toolkit[{EXTRA}]'") from None
    return ray


def check_address(address: str) -> str:
    """``address`` as given when it is one of ``ADDRESS_FORMS`` (or empty: find or start one), else ``ValueError``."""
    if address in ("", "auto", "local") or _ADDRESS.fullmatch(address) and 0 < int(address.rsplit(":", 1)[1]) < 65536:
        return address
    raise ValueError(f"--ray takes {ADDRESS_FORMS} (or nothing: a running cluster, else a local one); got "
                     f"{address!r} (to name the model after --ray, write --ray=ADDRESS or put --ray later)")


def _probe(address: str) -> None:
    """Open and close a TCP connection to an explicit address; ``ClusterError`` in one line when that fails."""
    m = _ADDRESS.fullmatch(address)
    if m is None:
        return
    host, port = m["host"].strip("[]"), int(m["port"])
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e)).lower()
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {why} (is `ray start --head` running "
                           "there, and is the port open?)") from None


@dataclass(frozen=True)
class Worker:
    """What one worker (one Ray task or actor) asks the cluster for."""

    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def threads(self) -> int:
        """onnxruntime intra-op threads that fit the CPUs asked for."""
        return max(1, math.floor(self.cpus))

    def describe(self) -> str:
        return f"{self.cpus:g} CPU{'s' if self.cpus != 1 else ''}" + (f", {self.gpus:g} GPU" if self.gpus else "")


def _largest_node(ray) -> tuple[float, float]:
    """(CPUs, GPUs) of the alive node with the most CPUs."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return max(((r.get("CPU", 0.0), r.get("GPU", 0.0)) for r in nodes), default=(0.0, 0.0))


def check_fits(ray, worker: Worker) -> None:
    """``ClusterError`` unless some node of the cluster can hold one worker (Ray would wait for one forever)."""
    fits = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0.0) >= worker.cpus
            and n["Resources"].get("GPU", 0.0) >= worker.gpus]
    if not fits:
        cpus, gpus = _largest_node(ray)
        raise ClusterError(f"no node of the Ray cluster can hold a worker of {worker.describe()} (the largest has "
                           f"{cpus:g} CPUs, {gpus:g} GPUs); ask for less with --cpus-per-worker/--gpus-per-worker")


def _send_token_if_there_is_one() -> None:
    """Use this machine's Ray token (``ray get-auth-token --generate`` or a local cluster makes one) for an explicit
    address (given, or in ``RAY_ADDRESS``) too, as Ray does for a cluster it finds itself; ``RAY_AUTH_MODE`` set by
    the user is left as it is. Without this, Ray retries such an address with no token for minutes."""
    try:
        from ray._private.authentication import authentication_token_setup as tokens
    except ImportError:  # a Ray without token authentication
        return
    quiet = logging.getLogger(tokens.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notice that token authentication is on
    try:
        tokens.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


@contextmanager
def connected(address: str, log: Callable[[str], None]) -> Iterator[tuple[object, bool]]:
    """Connect to (or start) the cluster for the length of the block; yields the ``ray`` module and whether this
    block owns the connection.

    A cluster that ``ray.init`` started stops when the block ends; one that was running stays (this driver leaves,
    and Ray ends the tasks it left running). When this process is already connected (a user's own ``ray.init``),
    that connection is used and kept (not owned).
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray, False
        return
    address = check_address(address)
    if address not in ("", "local", "auto"):
        _probe(address)
    _send_token_if_there_is_one()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a run reports nothing to anyone unless asked
    try:
        context = ray.init(address=address or None, include_dashboard=False, logging_level=logging.ERROR,
                           configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot connect to a Ray cluster ({address or 'none given'}): {reason(e)}") from None
    alive = [n for n in ray.nodes() if n.get("Alive")]
    resources = ray.cluster_resources()
    log(f"Ray cluster at {context.address_info.get('gcs_address') or address}: {len(alive)} node(s), "
        f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
    try:
        yield ray, True
    finally:
        ray.shutdown()
