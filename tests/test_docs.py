"""The docs cannot drift from the code: every shell block of README.md and docs/*.md marked ``<!-- runnable -->``
(the quick ones; ``<!-- runnable: needs torch -->`` or ``needs ray`` for those that need the train or the cluster
extra, skipped without it) runs, as written, with this checkout's environment as ``.venv``, in a fresh folder,
and must exit 0 without a traceback."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = re.compile(r"^<!-- runnable(?:: needs (?P<needs>torch|ray))? -->\n```bash\n(?P<code>.*?)^```", re.M | re.S)
EXTRAS = {"torch": "the train extra", "ray": "the cluster extra"}
TIMEOUT_S = 240


def blocks() -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in MARK.finditer(text):
            line = text[:m.start()].count("\n") + 1
            marks = [pytest.mark.needs_torch] if m.group("needs") == "torch" else []
            found.append(pytest.param(m.group("code"), m.group("needs"), marks=marks,
                                      id=f"{page.relative_to(REPO)}:{line}"))
    return found


def test_the_pages_have_runnable_blocks():
    assert len(blocks()) >= 4
    assert any("README.md" in b.id for b in blocks())


@pytest.mark.parametrize("code, needs", blocks())
def test_a_runnable_block_runs(code: str, needs: str | None, tmp_path: Path):
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"needs {needs} ({EXTRAS[needs]})")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the commands say .venv/bin/...
    (tmp_path / "runtime").symlink_to(REPO / "runtime")  # and name the bundled files by their paths
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ray_files = None
    if needs == "ray":
        env["HOME"] = str(tmp_path)  # a local cluster writes its token to ~/.ray/: the test's own, not the user's
        # and its session files to RAY_TMPDIR (not /tmp/ray), short because Ray puts Unix sockets there
        ray_files = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        env["RAY_TMPDIR"] = str(ray_files)
    before = set(os.listdir("/tmp/ray")) if os.path.isdir("/tmp/ray") else set()
    proc = subprocess.Popen(["bash", "-eu", "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the block and whatever it started
        out, _ = proc.communicate()
        pytest.fail(f"still running after {TIMEOUT_S} s:\n{out[-3000:]}")
    finally:  # what the block left running in the background (a server, say) goes too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if ray_files is not None:
            shutil.rmtree(ray_files, ignore_errors=True)
    assert proc.returncode == 0 and "Traceback" not in out, f"exit {proc.returncode}:\n{out[-3000:]}"
    after = set(os.listdir("/tmp/ray")) if os.path.isdir("/tmp/ray") else set()
    assert after <= before, f"the block left {sorted(after - before)} in /tmp/ray"


def test_the_sampler_table_is_the_registry():
    """docs/generate.md's sampler table is ``runtime.sampling.samplers.markdown_table()``: paste it there when a
    sampler is added or changed."""
    from runtime.sampling.samplers import markdown_table

    text = (REPO / "docs" / "generate.md").read_text()
    start = text.index("<!-- samplers: runtime.sampling.samplers.markdown_table() -->\n")
    table = text[text.index("\n", start) + 1:text.index("\n<!-- /samplers -->")]
    assert table == markdown_table(), f"docs/generate.md's sampler table should read:\n{markdown_table()}"
