"""Files written whole or not at all (temporary sibling, then rename), appended whole lines, and their SHA-256;
used by every tool. Also finds the temporary siblings that killed writers left behind."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# .NAME.tmp-MACHINE-PID-RANDOM (MACHINE: 8 hex digits, see ``machine_id``); older versions wrote .NAME.tmp-PID-RANDOM
TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-(?:(?P<machine>[0-9a-f]{8})-)?(?P<pid>[0-9]+)-[0-9a-f]+")


@functools.cache
def machine_id() -> str:
    """8 hex digits naming this host and PID namespace: the processes that a temporary name's PID can be checked
    against. Shards on other hosts (a shared folder) or in other containers get other digits."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/etc/machine-id").read_text().strip(), lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            parts.append("")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def temporary_sibling(path: Path) -> Path:
    """A hidden, unique name next to ``path``: ``.NAME.tmp-MACHINE-PID-RANDOM``."""
    return path.with_name(f".{path.name}.tmp-{machine_id()}-{os.getpid()}-{os.urandom(3).hex()}")


def _running(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists; True when unsure."""
    if os.name != "posix" or pid <= 0:
        return True  # (os.kill(pid, 0) would end the process on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists, under another user
        return True
    return True


def abandoned_temporaries(folder: Path, ours: Callable[[str], bool]) -> Iterator[Path]:
    """Temporary siblings in ``folder`` of files NAME with ``ours(NAME)`` whose writer is gone: made on this machine
    (or by an older version, which did not name the machine) by a process that no longer runs.

    A temporary of a live writer (another shard writing into the folder at the same time) is never yielded, nor
    one from another machine, whose processes cannot be checked from here.
    """
    for entry in os.scandir(folder):
        m = TEMPORARY.fullmatch(entry.name) if entry.name.startswith(".") else None
        if (m and ours(m["name"]) and m["machine"] in (None, machine_id()) and not _running(int(m["pid"]))
                and entry.is_file(follow_symlinks=False)):
            yield Path(entry.path)


def check_writable(path: Path) -> None:
    """Create and remove a temporary sibling of ``path``; raises the OSError that writing ``path`` would raise
    (EROFS on a read-only mount, EACCES, ENOSPC, ...). ``os.access`` cannot tell a read-only mount from a
    missing permission."""
    tmp = temporary_sibling(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.unlink(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it becomes ``path`` when the block ends without an error.

    On any exception the temporary file is removed and ``path`` is untouched, so a reader never sees a partial
    file under the final name. OSError from the rename propagates as it is.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """``atomic_path`` for files that belong together in one folder (a model and the stage files it names): yield
    temporary paths of the same names in one temporary folder beside them, so that one can be loaded there as it
    will be in place; when the block ends without an error they replace ``paths``, the first one last. On any
    exception none of ``paths`` changes."""
    paths = [Path(p) for p in paths]
    if len({p.parent for p in paths}) != 1:
        raise ValueError(f"atomic_paths: {[str(p) for p in paths]} are not in one folder")
    folder = temporary_sibling(paths[0])
    folder.mkdir()
    try:
        tmps = [folder / p.name for p in paths]
        yield tmps
        for tmp, path in reversed(list(zip(tmps, paths))):
            os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def create_once(path: str | os.PathLike, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (atomic: of concurrent writers exactly one wins).

    Returns whether this call created it. The file appears complete or not at all.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def append_lines(path: str | os.PathLike, data: bytes) -> None:
    """Append ``data`` (whole lines, each ending in a newline) to ``path`` in one write, flushed to disk.

    If the file's last line was cut (a full disk, kill -9 or power loss during an earlier append), ``data`` starts
    on a new line: the cut line stays a line of its own, which readers skip, and never swallows the first new
    one. Nothing is truncated, so a concurrent appender to the same file loses nothing either.
    """
    with open(path, "a+b") as f:  # O_APPEND: every write lands at the end, whatever the position
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
