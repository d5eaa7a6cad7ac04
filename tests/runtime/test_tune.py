"""ddpm-tune: the dynamic programme finds the cheapest path (against brute force), and the command writes a copy of
the model whose contract recommends the tuned timesteps, which a plain run then uses."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import runtime
from runtime.errors import SettingsError
from runtime.generate_cli import main as generate
from runtime.tuning.cli import main as tune
from runtime.tuning.gits import best_path


@pytest.mark.parametrize("K", [2, 3, 4, 5, 7])
def test_the_dynamic_programme_finds_the_cheapest_path(K):
    rng = np.random.default_rng(K)
    G = 7
    cost = np.triu(rng.uniform(0, 1, (G, G)), 1)
    cost[np.tril_indices(G)] = np.inf
    path, total = best_path(cost, K)
    best = min((sum(cost[a, b] for a, b in zip(p, p[1:])), p)
               for inner in itertools.combinations(range(1, G - 1), K - 2) for p in [(0, *inner, G - 1)])
    assert tuple(path) == best[1] and total == pytest.approx(best[0])
    with pytest.raises(ValueError, match="cannot choose 1 of 7 grid timesteps with both ends"):
        best_path(cost, 1)


def test_tune_writes_a_model_whose_runs_use_the_tuned_timesteps(cond_onnx, tmp_path):
    out = tmp_path / "tuned.onnx"
    r = CliRunner().invoke(tune, [str(cond_onnx), "--steps", "3,5", "--images", "4", "--reference-steps", "20",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "K = 3: " in r.stderr and f"wrote {out}" in r.stdout
    before, after = onnx.load(str(cond_onnx)), onnx.load(str(out))
    assert before.graph == after.graph  # only the contract changed
    model = runtime.load(out, "cpu")
    tuned = model.contract.tuned_timesteps
    assert set(tuned) == {"3", "5"} and model.contract.tuning["source_sha256"] == runtime.load(cond_onnx).sha256
    assert all(len(v) == int(k) and v[0] == 99 and v[-1] == 0 for k, v in tuned.items())  # T − 1 to 0
    plan = model.plan(sampler="unipc", steps=5)
    assert plan.coefs.timesteps[::-1].tolist() == tuned["5"] and "timesteps" in plan.from_model
    assert model.plan(sampler="ddim", steps=5, spacing="linspace").coefs.timesteps[-1] == 99  # asked: linspace
    with pytest.raises(SettingsError, match="tuned timesteps for 3, 5 steps, not for 4; pass --spacing linspace"):
        model.plan(steps=4)
    run = tmp_path / "run"
    r = CliRunner().invoke(generate, [str(out), "-n", "2", "--steps", "3", "--out", str(run)])
    assert r.exit_code == 0 and "timesteps" in r.output, r.output
    assert json.loads((run / "run.json").read_text())["timesteps"] == tuned["3"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cond_onnx):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    for args, message in (([str(junk), "--steps", "5"], "cannot load"),
                          ([str(tmp_path / "missing.onnx"), "--steps", "5"], "does not exist"),
                          ([str(cond_onnx), "--steps", "1"], "step counts must be at least 2"),
                          ([str(cond_onnx), "--steps", "a,b"], "expected step counts"),
                          ([str(cond_onnx), "--steps", "30", "--reference-steps", "20"], "below --reference-steps")):
        r = CliRunner().invoke(tune, [*args, "--out", str(tmp_path / "t.onnx")])
        errors = [line for line in r.output.splitlines() if line.startswith("Error")]
        assert r.exit_code != 0 and len(errors) == 1 and message in errors[0], (args, r.output)
        assert not (tmp_path / "t.onnx").exists() and "Traceback" not in r.output
