"""Latent models in the runtime, torch-free: a toy predictor on latents with its decoder stage beside it
(``tests.toy_onnx.make_toy_latent``). The decoder runs once per finished image, in every loop (host, the fused ONNX
step, OpenVINO), and a latent model keeps every promise a pixel model makes: batch-invariant images, every sampler,
guidance and its interval, resumable and sharded runs, progress (the decode counted as a step). A missing, swapped or
misplaced stage file is one line at load."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import runtime
from runtime.errors import ModelError
from runtime.generate_cli import main
from runtime.metadata import CONTRACT_KEY, SamplingContract
from runtime.sampling.samplers import SAMPLERS
from tests.toy_onnx import make_toy_latent


def test_the_decoder_makes_the_images_in_every_loop(latent_onnx):
    model = runtime.load(latent_onnx, "cpu")
    c = model.contract
    assert (c.latent_shape, c.prediction_channels, c.channels, c.image_size) == ((2, 4, 4), 2, 3, 8)
    settings = dict(sampler="dpmpp-2m", steps=8, guidance=2.0, guidance_interval=(10, 80))
    host = model.generate(6, seed=3, batch_size=6, **settings)
    assert host.shape == (6, 8, 8, 3) and host.std() > 10
    assert np.array_equal(host, model.generate(6, seed=3, batch_size=6, fused=True, **settings))
    parts = [model.generate(1, seed=3, batch_size=1, **settings), model.generate(5, seed=3, start_index=1,
                                                                                 batch_size=2, **settings)]
    assert np.array_equal(host, np.concatenate(parts))  # batch-invariant, the decoder included
    if importlib.util.find_spec("openvino") is not None:  # the openvino extra
        ov = runtime.load(latent_onnx, "openvino", dtype="fp32").generate(6, seed=3, batch_size=4, **settings)
        assert np.abs(ov.astype(int) - host).max() <= 1


def test_the_decoder_gets_the_scaled_latent_and_the_prediction_channels_drive_the_step(latent_onnx):
    """What ``generate`` makes is ``decode(x_0 / scaling_factor + shift)`` of the run on ε, the denoiser's first
    channels (its variance channels are ignored)."""
    from runtime.sampling.engine import sample
    from runtime.sampling.finish import to_uint8

    model = runtime.load(latent_onnx, "cpu")
    backend, c = model.backend, model.contract
    import onnxruntime as ort

    raw = ort.InferenceSession(str(latent_onnx))
    x = np.random.default_rng(0).standard_normal((2, 2, 4, 4)).astype(np.float32)
    full = raw.run(None, {"x": x, "t": np.array([5, 50]), "y": np.array([0, 3])})[0]
    assert full.shape == (2, 4, 4, 4)
    assert np.array_equal(backend.predict_eps(x, np.array([5, 50]), np.array([0, 3])), full[:, :2])
    plan = model.plan(sampler="ddim", steps=5)
    from runtime.sampling.noise import NoiseStreams

    with NoiseStreams(0, [0, 1], c.latent_shape) as streams:
        x_T = streams.next()
    x0 = sample(backend.predict_eps, x_T, plan.coefs, lambda i: None, labels=np.array([0, 1]),
                null_class=c.null_class)
    decoder = ort.InferenceSession(str(latent_onnx.with_name("latent.decoder.onnx")))
    want = to_uint8(decoder.run(None, {"z": x0 / np.float32(0.5) + np.float32(0.25)})[0])
    assert np.array_equal(model.generate(2, steps=5, sampler="ddim", classes=[0, 1]), want)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_a_latent_model(latent_onnx, sampler):
    model = runtime.load(latent_onnx, "cpu")
    images = model.generate(2, steps=SAMPLERS[sampler].min_steps + 2, sampler=sampler, guidance=1.5)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8


def test_progress_counts_the_decode_as_a_step(latent_onnx):
    model = runtime.load(latent_onnx, "cpu")
    plan = model.plan(sampler="ddim", steps=4)
    calls = []
    list(model.generate_batches([0, 1, 2], plan, seed=0, batch_size=2, labels=model.labels([0, 1, 2], None),
                                progress=calls.append))
    assert model.progress_steps(plan) == 5 and calls == [2] * 5 + [1] * 5


def test_a_sharded_run_folder_equals_one_run(latent_onnx, tmp_path):
    args = [str(latent_onnx), "-n", "6", "--steps", "4", "--sampler", "ddim", "--guidance", "1.5", "--batch-size",
            "2", "--provider", "cpu", "--format", "npz"]
    whole = tmp_path / "whole"
    assert CliRunner().invoke(main, [*args, "--out", str(whole)]).exit_code == 0
    sharded = tmp_path / "sharded"
    for i in (0, 1):
        r = CliRunner().invoke(main, [*args, "--out", str(sharded), "--shard", f"{i}/2"])
        assert r.exit_code == 0, r.output
    want = np.load(whole / "samples.npz")["arr_0"]
    assert want.shape == (6, 8, 8, 3)
    assert np.array_equal(np.load(sharded / "samples.npz")["arr_0"], want)
    run = json.loads((whole / "run.json").read_text())
    assert run["model_sha256"] and "precision" not in run


@pytest.mark.parametrize("damage, message", [
    ("missing", "its decoder stage .*latent.decoder.onnx is missing"),
    ("swapped", "is not the decoder latent.onnx was exported with"),
])
def test_a_missing_or_swapped_stage_is_one_line_and_writes_nothing(latent_onnx, tmp_path, damage, message):
    shutil.copy(latent_onnx, tmp_path / "latent.onnx")
    if damage == "swapped":  # another model's decoder under this one's name
        (tmp_path / "other").mkdir()
        other = make_toy_latent(tmp_path / "other" / "m.onnx", seed=7)
        shutil.copy(other.with_name("m.decoder.onnx"), tmp_path / "latent.decoder.onnx")
    with pytest.raises(ModelError, match=message):
        runtime.load(tmp_path / "latent.onnx", "cpu")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(tmp_path / "latent.onnx"), "-n", "2", "--out", str(out)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_a_stage_file_passed_as_the_model_says_which_file_to_pass(latent_onnx, tmp_path):
    r = CliRunner().invoke(main, [str(latent_onnx.with_name("latent.decoder.onnx")), "-n", "1",
                                  "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "is the decoder stage of a latent model, not a model" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_a_decoder_graph_that_disagrees_with_the_contract_is_refused(latent_onnx, tmp_path):
    """A contract whose decoder says another image size than its graph makes (its sha256 updated to match)."""
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(latent_onnx.with_name("latent.decoder.onnx"), folder / "latent.decoder.onnx")
    model = onnx.load(str(latent_onnx))
    props = {p.key: p.value for p in model.metadata_props}
    data = json.loads(props[CONTRACT_KEY])
    data["image_size"] = 16
    data["stages"][1]["outputs"][0]["shape"] = ["batch", 3, 16, 16]
    SamplingContract.from_dict(data)  # valid in itself
    props[CONTRACT_KEY] = json.dumps(data)
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(folder / "latent.onnx"))
    with pytest.raises(ModelError, match="latent.decoder.onnx: its contract says image is float32"):
        runtime.load(folder / "latent.onnx", "cpu")
