"""Which timesteps a run visits: an explicit ``timesteps`` list (every sampler, every loop, the server), the
``logsnr`` spacing, and run.json recording the timesteps of every run (folders of earlier versions still resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import runtime
from runtime.errors import SettingsError
from runtime.generate_cli import main
from runtime.metadata import SamplingContract
from runtime.sampling.plan import make_plan
from runtime.sampling.settings import SAMPLERS, RunSettings

COND = SamplingContract(image_size=4, channels=1, num_classes=3)


def test_logsnr_spacing_is_even_in_log_snr():
    ab = COND.schedule.build().alphas_cumprod
    lam = np.log(ab) - np.log1p(-ab)
    for K in (5, 10, 20):
        t = make_plan(COND, sampler="dpmpp-2m", steps=K, spacing="logsnr").coefs.timesteps
        assert t[0] == 0 and t[-1] == 999 and np.all(np.diff(t) > 0)
        gaps = np.diff(lam[t])
        assert np.allclose(gaps, gaps.mean(), rtol=0.25), (K, gaps)  # nearest integer timesteps: nearly even
    t = make_plan(COND, sampler="ddim", steps=200, spacing="logsnr").coefs.timesteps  # where λ is steep, t + 1
    assert len(np.unique(t)) == 200 and list(t[:3]) == [0, 1, 2]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_explicit_list_is_what_the_run_visits(sampler, cond_onnx):
    """The same timesteps given as a list or chosen by a spacing: the same images, on the host and fused."""
    g = runtime.load(cond_onnx, "cpu")
    spaced = g.plan(sampler=sampler, steps=6, spacing="trailing", guidance=2.0)
    listed = g.plan(sampler=sampler, timesteps=spaced.timesteps, guidance=2.0)
    assert listed.steps == 6 and np.array_equal(listed.coefs.timesteps, spaced.coefs.timesteps)
    for fused in (False, True):
        a = g.generate(3, seed=1, sampler=sampler, steps=6, spacing="trailing", guidance=2.0, fused=fused)
        b = g.generate(3, seed=1, sampler=sampler, timesteps=list(spaced.timesteps), guidance=2.0, fused=fused)
        assert np.array_equal(a, b)


def test_bad_lists_are_one_line():
    T = COND.schedule.timesteps
    for settings, message in ((dict(timesteps=(5, 9)), "strictly decreasing"),
                              (dict(timesteps=(T, 5)), f"must lie in [0, T) = [0, {T})"),
                              (dict(timesteps=(900, 5), steps=3), "timesteps lists 2 timesteps but steps is 3"),
                              (dict(timesteps=(900, 5), spacing="leading"), "give either a list or a spacing"),
                              (dict(timesteps=(), sampler="ddim"), "a list of model timesteps"),
                              (dict(timesteps=(900, 500), sampler="ipndm"), "ipndm needs at least 4 steps")):
        with pytest.raises(SettingsError) as e:
            make_plan(COND, **settings)
        assert message in str(e.value) and "\n" not in str(e.value), (settings, str(e.value))
    assert RunSettings.parse("timesteps=999:500:0").timesteps == (999, 500, 0)  # --run-defaults


def test_run_json_records_the_timesteps_and_old_folders_resume(cond_onnx, tmp_path):
    out = tmp_path / "run"
    args = [str(cond_onnx), "-n", "4", "--out", str(out), "--sampler", "ddim", "--steps", "5", "--guidance", "1.5",
            "--batch-size", "2", "--no-model-defaults"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    assert run["timesteps"] == [99, 74, 50, 25, 0] and run["steps"] == 5
    # a folder written before run.json recorded timesteps: half done, without the key; the same command finishes it
    for name in ("000002.png", "000003.png"):
        (out / name).unlink()
    lines = (out / "manifest.jsonl").read_text().splitlines()[:2]
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (out / "run.json").write_text(json.dumps({k: v for k, v in run.items() if k != "timesteps"}, indent=2))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and (out / "000003.png").is_file(), r.output
    six = [("6" if args[i - 1] == "--steps" else a) for i, a in enumerate(args)]
    r = CliRunner().invoke(main, six)
    assert r.exit_code != 0 and "other settings (steps differ)" in r.output  # what was given, not what it implies
    bad = CliRunner().invoke(main, [str(cond_onnx), "-n", "2", "--out", str(tmp_path / "bad"), "--timesteps", "5,50"])
    assert bad.exit_code != 0 and "strictly decreasing" in bad.output and not (tmp_path / "bad" / "run.json").exists()
