"""Reaching a Ray cluster for a run: the optional import, the ``--ray`` address, the connection and its resources.

``--ray`` takes what ``ray.init(address=...)`` takes, checked first so that a bad one is one line and nothing is
written: nothing (a running cluster if there is one — ``RAY_ADDRESS`` or this machine's latest — else a new local
one), ``auto`` (a running one, or an error), ``local`` (always a new local one), ``HOST:PORT`` (a cluster's GCS) or
``ray://HOST:PORT`` (Ray Client). The cluster's head is probed before Ray is asked, with a TCP connection and then
one request to its GCS, because ``ray.init`` retries for minutes an address that nothing answers or that wants
another token; the request also tells whether the cluster uses token authentication, and this driver does as
the cluster does (see ``_match_authentication``).

A cluster recorded on this machine (``ray start`` writes its address to ``ray_current_cluster`` in Ray's temp
folder) whose head no longer answers counts as no cluster: a bare ``--ray`` starts a local one and says so, where
Ray itself would wait on it. A head that goes away in the middle of a run ends the run with one line
(``ClusterGone``); what was made stays, and the same command finishes it once a cluster is back.
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


def driver_pipeline(model: Path, log: Callable[[str], None], provider: str = "auto", dtype: str | None = None):
    """The model as a driver loads it to check a run's settings before any worker starts, with one thread: with the
    workers' backend and precision, on the CPU (a provider off the CPU is replaced by the backend's ``host``)."""
    from runtime.backends.registry import kind_for, model_format
    from runtime.pipeline import load

    kind = kind_for(model_format(model), provider)
    on_host = provider if provider != "auto" and not kind.provider(provider).on_gpu else kind.host
    return load(model, on_host, dtype=dtype, threads=1, log=log)


def require_ray(what: str = "--ray"):
    """The ``ray`` module, or a one-line ``ClusterError`` naming the extra that brings it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"{what} needs Ray, which is not installed here: "
                           f"pip install 'ddpm-toolkit[{EXTRA}]'") from None
    return ray


def check_address(address: str) -> str:
    """``address`` as given when it is one of ``ADDRESS_FORMS`` (or empty: find or start one), else ``ValueError``."""
    if address in ("", "auto", "local") or _ADDRESS.fullmatch(address) and 0 < int(address.rsplit(":", 1)[1]) < 65536:
        return address
    raise ValueError(f"--ray takes {ADDRESS_FORMS} (or nothing: a running cluster, else a local one); got "
                     f"{address!r} (to name the model after --ray, write --ray=ADDRESS or put --ray later)")


def _unreachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why a TCP connection to a HOST:PORT address fails ("connection refused", "timed out", ...), or None when it
    opens (or the address is not HOST:PORT)."""
    m = _ADDRESS.fullmatch(address)
    if m is None:
        return None
    host, port = m["host"].strip("[]"), int(m["port"])
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e)).lower()
    return None


def _probe(address: str) -> None:
    """``ClusterError`` in one line when a TCP connection to a HOST:PORT address fails."""
    if (why := _unreachable(address)) is not None:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {why} (is `ray start --head` running "
                           "there, and is the port open?)")


class ClusterGone(ClusterError):
    """The head of the cluster a run was using went away in the middle of it."""

    def __init__(self, ray) -> None:
        super().__init__(f"the Ray cluster at {ray.get_runtime_context().gcs_address} went away; rerun the same "
                         "command to finish the run")


def head_answers(ray) -> bool:
    """Whether the head of the cluster this process is connected to still takes TCP connections (a head that went
    away refuses them at once; 2 s for one that hangs)."""
    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # not connected, or a Ray that cannot say: nothing to tell
        return True
    return _unreachable(gcs, timeout=2.0) is None


def _recorded_cluster_is_gone(address: str) -> str | None:
    """For a bare ``--ray`` (no ``RAY_ADDRESS``): the address of the cluster recorded on this machine when its head
    no longer answers, else None (none recorded, or it answers)."""
    if address != "" or os.environ.get("RAY_ADDRESS"):
        return None
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:
        return None
    recorded = find_bootstrap_address(None)
    return recorded if recorded and _unreachable(recorded) is not None else None


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


def _send_token_if_there_is_one() -> bool:
    """Turn on token authentication for this process when this machine has a Ray token (``ray get-auth-token
    --generate``, or the one a local cluster made) and ``RAY_AUTH_MODE`` is unset; whether it is on."""
    try:
        from ray._private.authentication import authentication_token_setup as tokens
    except ImportError:  # a Ray without token authentication
        return False
    quiet = logging.getLogger(tokens.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notice that token authentication is on
    try:
        return tokens.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def _head(address: str) -> str | None:
    """The GCS address (HOST:PORT) that ``ray.init(address)`` would join, or None when it would start a local
    cluster (or this Ray cannot say: then Ray decides alone). ``ClusterError`` for ``auto`` with no cluster."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address(address or None)
    except ConnectionError as e:  # auto, and no cluster is running
        raise ClusterError(f"cannot connect to a Ray cluster ({address or 'none given'}): {reason(e)}") from None
    except Exception:  # a form this Ray parses otherwise: ray.init decides
        return None


def _gcs_answer(head: str) -> str:
    """One request to the GCS at ``head`` with this process's authentication: "ok", "token" (refused: a token is
    missing or wrong), "silent" (no answer in time) or "unknown" (this Ray cannot ask)."""
    try:
        from ray._raylet import InnerGcsClient
        from ray.exceptions import AuthenticationError, RpcError
    except ImportError:
        return "unknown"
    timeout_ms = int(CONNECT_TIMEOUT_S * 1000)
    try:
        InnerGcsClient.standalone(head, None, timeout_ms).internal_kv_get(b"ddpm-toolkit-probe", None, timeout_ms)
    except AuthenticationError:
        return "token"
    except RpcError:
        return "silent"
    except Exception:  # anything else: ray.init will say what it is
        return "unknown"
    return "ok"


def _match_authentication(head: str, address: str) -> None:
    """Authenticate as the cluster at ``head`` does, or ``ClusterError`` in one line.

    Ray turns token authentication on for a cluster it finds itself whenever this machine has a token, and never
    for an explicit address. Both go wrong: with a token on for a cluster that runs without one, the cluster's
    calls back to this driver are refused and the run's actors die; with it off for a cluster that wants one,
    ``ray.init`` retries for minutes. So the GCS is asked first, without a token: a refusal means the cluster
    wants this machine's token (sent, and checked with a second request); an answer means it wants none, and
    ``RAY_AUTH_MODE=disabled`` keeps Ray from turning the token on. A ``RAY_AUTH_MODE`` set by the user is kept.
    """
    chosen = os.environ.get("RAY_AUTH_MODE")
    answer = _gcs_answer(head)
    where = f"the Ray cluster at {address or head}"
    if answer == "silent":
        raise ClusterError(f"{where} does not answer as a Ray head (no reply from its GCS in {CONNECT_TIMEOUT_S:g} s); "
                           "is that the port `ray start --head` printed?")
    if answer == "ok" and chosen is None:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    if answer != "token":
        return
    if chosen is not None and chosen.lower() != "token":
        raise ClusterError(f"{where} uses token authentication, and RAY_AUTH_MODE={chosen} here sends no token: "
                           "unset it, or set it to token")
    if chosen is None and not _send_token_if_there_is_one():
        raise ClusterError(f"{where} uses token authentication and this machine has no Ray token: copy the "
                           "cluster's ~/.ray/auth_token here, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    if chosen is not None or _gcs_answer(head) == "token":
        mode = f" (RAY_AUTH_MODE={chosen})" if chosen is not None else ""
        raise ClusterError(f"{where} refused this machine's Ray token{mode}: use the cluster's ~/.ray/auth_token, or "
                           "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")


def join(address: str, log: Callable[[str], None], what: str = "--ray"):
    """Connect this process to the cluster at ``address`` (see ``ADDRESS_FORMS``), or start a local one; returns
    the ``ray`` module and whether this call made the connection (False: the process was already connected, by a
    user's own ``ray.init``, and that connection is used). Any failure is a one-line ``ClusterError``."""
    ray = require_ray(what)
    if ray.is_initialized():
        return ray, False
    address = check_address(address)
    if (gone := _recorded_cluster_is_gone(address)) is not None:
        log(f"the Ray cluster recorded on this machine ({gone}) is gone; starting a local one")
        address = "local"
    explicit, head = address not in ("", "auto", "local"), None
    if explicit:
        _probe(address)
    if address.startswith("ray://"):  # Ray Client: its server speaks for the cluster
        _send_token_if_there_is_one()
    elif address != "local" and (head := _head(address)) is not None:
        if not explicit:
            _probe(head)
        _match_authentication(head, address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a run reports nothing to anyone unless asked
    if address != "local" and (explicit or head is not None):  # joining: the driver's core logs nothing of its own
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # (a head that goes away is one line, below)
    try:
        context = ray.init(address=address or None, include_dashboard=False, logging_level=logging.ERROR,
                           configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot connect to a Ray cluster ({address or 'none given'}): {reason(e)}") from None
    alive = [n for n in ray.nodes() if n.get("Alive")]
    resources = ray.cluster_resources()
    log(f"Ray cluster at {context.address_info.get('gcs_address') or address}: {len(alive)} node(s), "
        f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
    return ray, True


@contextmanager
def connected(address: str, log: Callable[[str], None]) -> Iterator[tuple[object, bool]]:
    """``join`` for the length of the block; yields the ``ray`` module and whether this block owns the connection.

    A cluster that ``ray.init`` started stops when the block ends; one that was running stays (this driver leaves,
    and Ray ends the tasks it left running). A connection the process had before is kept (not owned).
    """
    ray, owned = join(address, log)
    try:
        yield ray, owned
    finally:
        if owned:
            ray.shutdown()
