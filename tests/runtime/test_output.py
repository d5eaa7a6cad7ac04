"""The output folder: a cut manifest append, leftovers of killed writers, absurd sizes, read-only mounts.

Every test here drives ``ddpm-generate`` (in-process, or a writer in a subprocess) and looks only at the folder
and the messages, so each also runs against older versions of ``runtime/`` and shows what they got wrong.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import runtime
import runtime.generation.output
import runtime.pipeline
from runtime import files
from runtime.generate_cli import main

REPO = Path(runtime.__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *messages: str) -> str:
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert all(m in errors[0] for m in messages), r.output
    return errors[0]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_same_run(out: Path, whole: Path, n: int) -> None:
    """``out`` holds what the uninterrupted run ``whole`` holds: images, manifest.jsonl, samples.npz, grid.png."""
    assert (out / "manifest.jsonl").read_text() == (whole / "manifest.jsonl").read_text()
    assert len((out / "manifest.jsonl").read_text().splitlines()) == n
    for i in range(n):
        assert np.array_equal(pixels(out / f"{i:06d}.png"), pixels(whole / f"{i:06d}.png")), i
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], np.load(whole / "samples.npz")["arr_0"])
    assert np.array_equal(pixels(out / "grid.png"), pixels(whole / "grid.png"))
    assert not [p.name for p in out.glob(".*tmp*")]


SMALL = ["-n", 6, "--batch-size", 2, "--steps", 3, "--format", "both", "--grid"]


def test_disk_full_in_the_middle_of_a_manifest_append_then_resume(uncond_onnx, tmp_path, monkeypatch):
    """The 2nd append of manifest-0-of-1.jsonl stops halfway through its first line (ENOSPC): the rerun after
    space is freed must give the uninterrupted run's manifest.jsonl, samples.npz and grid.png."""
    assert cli(uncond_onnx, *SMALL, "--out", tmp_path / "whole").exit_code == 0
    real_open, appends = builtins.open, []

    class FullDisk:
        """A file whose write puts half of its first line on disk, then fails as a full disk does."""

        def __init__(self, f) -> None:
            self._f = f

        def __getattr__(self, name: str):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self._f.close()

        def write(self, data):
            self._f.write(data[:data.index("\n" if isinstance(data, str) else b"\n") // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "a" in mode and isinstance(file, (str, os.PathLike)) and re.fullmatch(r"manifest-\d+-of-\d+\.jsonl",
                                                                                  Path(file).name):
            appends.append(file)
            if len(appends) == 2:
                return FullDisk(f)
        return f

    out = tmp_path / "o"
    monkeypatch.setattr(builtins, "open", full_disk_open)
    r = cli(uncond_onnx, *SMALL, "--out", out)
    monkeypatch.setattr(builtins, "open", real_open)
    one_line_error(r, "disk full while writing", "manifest-0-of-1.jsonl", "rerun the same command")
    assert not (out / "manifest-0-of-1.jsonl").read_text().endswith("\n")  # its last line is cut
    assert not (out / "manifest.jsonl").exists()
    r = cli(uncond_onnx, *SMALL, "--out", out)
    assert r.exit_code == 0 and "4 images in" in r.output and "2 already there" in r.output, r.output
    assert_same_run(out, tmp_path / "whole", 6)


@pytest.mark.parametrize("damage", ["cut", "zeros"])
def test_a_cut_last_manifest_line_then_resume(damage, uncond_onnx, tmp_path):
    """kill -9 during an append cuts the last line; a power loss can leave zeros in its place. The rerun makes
    that image again and records it on a line of its own."""
    assert cli(uncond_onnx, *SMALL, "--out", tmp_path / "whole").exit_code == 0
    out = tmp_path / "o"
    assert cli(uncond_onnx, *SMALL, "--out", out).exit_code == 0
    manifest = out / "manifest-0-of-1.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    last = lines[-1][:len(lines[-1]) // 2] if damage == "cut" else bytes(len(lines[-1]))
    manifest.write_bytes(b"".join(lines[:-1]) + last)
    for name in ("manifest.jsonl", "samples.npz", "grid.png"):  # killed before the run was finished
        (out / name).unlink()
    r = cli(uncond_onnx, *SMALL, "--out", out)
    assert r.exit_code == 0 and "1 images in" in r.output and "5 already there" in r.output, r.output
    assert_same_run(out, tmp_path / "whole", 6)


def test_an_image_left_without_a_record_is_an_error_not_a_success(uncond_onnx, tmp_path, monkeypatch):
    """If an image's record is lost after it was written, the run must not exit 0 without its manifest.jsonl."""
    real_write = runtime.generation.output.OutputDir.write_images

    def losing_image_1(self, indices, images, records, manifest):
        real_write(self, indices, images, records, manifest)
        if 1 in indices:
            kept = [line for line in manifest.read_text().splitlines() if json.loads(line)["index"] != 1]
            manifest.write_text("".join(line + "\n" for line in kept))

    out = tmp_path / "o"
    args = [uncond_onnx, "-n", 3, "--batch-size", 1, "--steps", 2, "--out", out]
    monkeypatch.setattr(runtime.generation.output.OutputDir, "write_images", losing_image_1)
    one_line_error(cli(*args), "image 1", "rerun the same command")
    monkeypatch.undo()
    r = cli(*args)
    assert r.exit_code == 0 and "1 images in" in r.output and "2 already there" in r.output, r.output
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3


def test_a_shard_that_ends_before_the_others_says_the_run_is_not_finished(cond_onnx, tmp_path):
    out = tmp_path / "o"
    common = [cond_onnx, "-n", 5, "--steps", 2, "--format", "both", "--grid", "--out", out]
    r = cli(*common, "--shard", "0/2")
    assert r.exit_code == 0, r.output
    assert "2 images in" in r.output and "3 images of other shards still to come" in r.output, r.output
    assert "manifest.jsonl, samples.npz, grid.png" in r.output
    assert not (out / "manifest.jsonl").exists() and not (out / "samples.npz").exists()
    r = cli(*common, "--shard", "1/2")
    assert r.exit_code == 0 and "still to come" not in r.output, r.output
    assert np.load(out / "samples.npz")["arr_0"].shape == (5, 16, 16, 3) and (out / "grid.png").is_file()


WRITER = """
import sys
from pathlib import Path
from runtime.files import temporary_sibling
tmp = temporary_sibling(Path(sys.argv[1]))
tmp.write_bytes(b"the first half of a file")
print(tmp, flush=True)
sys.stdin.read()  # a live writer until the test closes stdin
"""


def writer(target: Path) -> tuple[Path, subprocess.Popen]:
    """A process that has written half of ``target`` under its temporary name and waits (running) on stdin."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    return Path(p.stdout.readline().strip()), p


def killed_writer(target: Path) -> Path:
    tmp, p = writer(target)
    p.kill()
    p.communicate()
    assert tmp.is_file()
    return tmp


def test_resume_removes_what_killed_writers_left_but_not_a_live_writers_file(uncond_onnx, tmp_path):
    out = tmp_path / "o"
    args = [uncond_onnx, "-n", 4, "--steps", 2, "--out", out]
    assert cli(*args).exit_code == 0
    dead = [killed_writer(out / name) for name in ("000001.png", "manifest-0-of-1.jsonl", "samples.npz", "grid.png")]
    not_ours = [killed_writer(out / name) for name in ("notes.txt", "000003.jpg")]
    live, p = writer(out / "000002.png")  # e.g. another shard, writing into this folder right now
    try:
        r = cli(*args)
        assert r.exit_code == 0 and "4 already there" in r.output, r.output
        assert [t.name for t in dead if t.exists()] == []
        assert live.is_file() and all(t.is_file() for t in not_ours)
    finally:
        p.communicate()  # closes its stdin: the writer ends, and its file is a leftover now
    assert cli(*args).exit_code == 0
    assert not live.exists() and all(t.is_file() for t in not_ours)


def test_only_temporaries_of_dead_writers_on_this_machine_are_abandoned(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    me, dead = files.machine_id(), ended.pid
    other = "0" * 8 if me != "0" * 8 else "1" * 8
    names = {  # name: abandoned?
        f".000001.png.tmp-{me}-{dead}-0a1b2c": True,
        f".000002.png.tmp-{dead}-0a1b2c": True,  # an older version's name (no machine): judged by its PID
        f".000003.png.tmp-{me}-{os.getpid()}-0a1b2c": False,  # a live writer
        f".000004.png.tmp-{other}-{dead}-0a1b2c": False,  # another machine's: its PID says nothing here
        f".notes.txt.tmp-{me}-{dead}-0a1b2c": False,  # not a file ddpm-generate writes
        f"000005.png.tmp-{me}-{dead}-0a1b2c": False,  # not a temporary name
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    found = {p.name for p in files.abandoned_temporaries(tmp_path, runtime.generation.output.is_run_file)}
    assert found == {name for name, abandoned in names.items() if abandoned}
    assert files.TEMPORARY.fullmatch(files.temporary_sibling(tmp_path / "000001.png").name)["machine"] == me


@pytest.mark.parametrize("model", ["cond", "uncond"])
def test_an_absurd_n_is_a_one_line_error_that_writes_nothing(model, cond_onnx, uncond_onnx, tmp_path):
    r = cli(cond_onnx if model == "cond" else uncond_onnx, "-n", 10**12, "--steps", 2, "--out", tmp_path / "d")
    one_line_error(r, "-n 1000000000000", "at most 10000000")
    assert not (tmp_path / "d").exists()


def test_one_shard_of_the_largest_run_needs_no_bookkeeping_for_the_others(cond_onnx, tmp_path):
    n = runtime.generation.output.MAX_IMAGES
    r = cli(cond_onnx, "-n", n, "--steps", 2, "--shard", f"{n - 1}/{n}", "--out", tmp_path / "d")
    assert r.exit_code == 0, r.output
    assert "1 images in" in r.output and f"{n - 1} images of other shards still to come" in r.output
    assert [p.name for p in (tmp_path / "d").glob("*.png")] == [f"{n - 1}.png"]


def test_out_of_memory_for_a_batch_is_a_one_line_error(uncond_onnx, tmp_path, monkeypatch):
    class NoMemory:
        def __init__(self, *args, **kwargs) -> None:
            raise MemoryError

    monkeypatch.setattr(runtime.pipeline, "NoiseStreams", NoMemory)
    one_line_error(cli(uncond_onnx, "-n", 3, "--steps", 2, "--out", tmp_path / "d"), "smaller --batch-size")


def read_only(monkeypatch, root: Path) -> None:
    """Make ``root`` behave like a read-only mount: what would write under it fails with EROFS, and
    ``os.access(..., W_OK)`` says no (as the kernel answers there)."""
    root = root.resolve()
    real = {name: getattr(os, name) for name in ("open", "mkdir", "link", "replace", "rename", "unlink", "access")}
    real_open = builtins.open

    def under(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and Path(os.fsdecode(path)).resolve().is_relative_to(root)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

    def os_open(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
            refuse(path)
        return real["open"](path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if under(path):
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fsdecode(path))
            refuse(path)
        return real["mkdir"](path, *args, **kwargs)

    def changing(name):
        def call(*paths, **kwargs):
            if any(under(p) for p in paths):
                refuse(paths[-1])
            return real[name](*paths, **kwargs)
        return call

    def access(path, mode, *args, **kwargs):
        return False if under(path) and mode & os.W_OK else real["access"](path, mode, *args, **kwargs)

    def open_file(file, mode="r", *args, **kwargs):
        if under(file) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for name in ("link", "replace", "rename", "unlink"):
        monkeypatch.setattr(os, name, changing(name))
    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(builtins, "open", open_file)
    monkeypatch.setattr(io, "open", open_file)


@pytest.mark.parametrize("where", ["existing-folder", "new-folder"])
def test_a_read_only_mount_is_called_read_only(where, uncond_onnx, tmp_path, monkeypatch):
    mount = tmp_path / "mnt"
    mount.mkdir()
    out = mount if where == "existing-folder" else mount / "samples"
    read_only(monkeypatch, mount)
    error = one_line_error(cli(uncond_onnx, "-n", 2, "--steps", 2, "--out", out)).lower()
    assert "read-only file system" in error and "permission denied" not in error
    monkeypatch.undo()
    assert list(mount.iterdir()) == []
