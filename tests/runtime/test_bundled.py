"""The bundled default model: its contract and recommended settings, generation with no model argument, its classes."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

import runtime
from runtime.bundled import resolve
from runtime.generate_cli import main
from runtime.metadata import RunDefaults


def test_bundled_model_contract():
    path, name = resolve(None)
    assert name == "fashion-mnist"
    c = runtime.load(path, "cpu").contract
    assert (c.image_size, c.channels, c.num_classes) == (32, 1, 10)
    assert c.class_names[7] == "Sneaker" and c.null_class == 10 and c.ema
    assert (c.schedule.name, c.schedule.timesteps, c.variance) == ("linear", 1000, "beta")
    assert c.provenance.dataset == "fashion-mnist" and c.provenance.training_steps >= 4000
    assert c.run_defaults == RunDefaults(sampler="dpmpp-2m", steps=10, spacing="logsnr",  # README's recommendation
                                         guidance=2.0, guidance_interval=(0, 400))


def test_a_plain_run_takes_the_models_recommendations_and_says_so(tmp_path):
    r = CliRunner().invoke(main, ["-n", "2", "--out", str(tmp_path / "s"), "--provider", "cpu", "--steps", "3"])
    assert r.exit_code == 0, r.output
    assert ("settings recommended by the model: sampler, guidance, guidance_interval, spacing -> dpmpp-2m 3 steps "
            "(logsnr), guidance 2 on t in [0, 400]") in r.output
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert (run["sampler"], run["steps"], run["guidance"], run["guidance_interval"]) == ("dpmpp-2m", 3, 2.0, [0, 400])
    r = CliRunner().invoke(main, ["-n", "2", "--out", str(tmp_path / "p"), "--provider", "cpu", "--steps", "3",
                                  "--no-model-defaults"])
    assert r.exit_code == 0, r.output
    assert "recommended" not in r.output
    run = json.loads((tmp_path / "p" / "run.json").read_text())
    assert (run["sampler"], run["steps"], run["guidance"]) == ("ddpm", 3, 1.0)


def test_the_api_takes_the_recommendations_too():
    model = runtime.load("fashion-mnist", "cpu")  # a bundled name, as on the command line
    assert model.plan().describe() == "dpmpp-2m 10 steps (logsnr), guidance 2 on t in [0, 400]"
    assert model.plan(model_defaults=False).describe() == "ddpm 1000 steps, guidance 1"
    explicit = model.generate(2, sampler="dpmpp-2m", steps=3, spacing="logsnr", guidance=2.0,
                              guidance_interval=(0, 400), batch_size=2)
    assert np.array_equal(model.generate(2, steps=3, batch_size=2), explicit)


def test_generate_with_no_model_argument_and_a_class_name(tmp_path):
    r = CliRunner().invoke(main, ["-n", "3", "--sampler", "ddim", "--steps", "4", "--class", "sneaker",
                                  "--guidance", "2", "--out", str(tmp_path / "s"), "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    assert "using the bundled model fashion-mnist" in r.output
    records = [json.loads(line) for line in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert [(x["class"], x["class_name"]) for x in records] == [(7, "Sneaker")] * 3


def test_bundled_model_draws_the_requested_classes():
    """Two images per class at DDIM-10, guidance 2: the shipped classifier must recognise the requested class."""
    from runtime.evaluate.score import FeatureExtractor

    images = runtime.load(resolve(None)[0], "cpu").generate(20, sampler="ddim", steps=10, guidance=2.0, batch_size=20)
    requested = np.arange(20) % 10  # classes cycle over the images by default
    predicted = FeatureExtractor()(images)[0].argmax(1)
    assert (predicted == requested).mean() >= 0.8, list(zip(requested, predicted))


def test_the_api_accepts_bundled_names_like_the_cli():
    model = runtime.load("fashion-mnist", "cpu")
    assert model.path == resolve("fashion-mnist")[0] and model.contract.num_classes == 10
    assert runtime.load("Fashion-MNIST", "cpu").path == model.path  # names are case-insensitive, as on the CLI
