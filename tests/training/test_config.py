"""ModelConfig: the checkpoint's hyperparameters round-trip, old checkpoints read, and the contract matches export."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from ddpm_export.checkpoint import load_checkpoint
from ddpm_export.errors import CheckpointError
from runtime.metadata import CONTRACT_KEY, SamplingContract
from training.config import REQUIRED_HPARAMS, ModelConfig
from training.model import DiffusionModel
from training.unet import UNetConfig

ASSETS = Path(__file__).resolve().parents[2] / "runtime" / "assets"
TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)
CONFIGS = [
    ModelConfig(),
    ModelConfig(16 * 16, 100, 3, schedule="cosine", schedule_params={"s": 0.01}, num_classes=2,
                class_names=("a", "b"), p_uncond=0.2, lr=1e-3, ema_decay=0.0, dataset="folder", **TINY),
    ModelConfig(num_classes=3, attention_resolutions=(), num_heads=2, schedule_params={}),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_hparams_round_trip(cfg):
    hp = cfg.to_hparams()
    assert ModelConfig.from_hparams(hp) == cfg
    assert list(hp) == [f.name for f in dataclasses.fields(ModelConfig)]
    for key in ("channel_mult", "attention_resolutions"):  # plain data, as Lightning has always saved it
        assert isinstance(hp[key], list)
    assert hp["class_names"] is None or isinstance(hp["class_names"], list)


def test_schedule_params_are_filled_with_the_schedules_defaults():
    assert ModelConfig().schedule_params == {"beta_start": 1e-4, "beta_end": 0.02}
    assert ModelConfig(schedule="cosine", schedule_params={"s": 0.01}).schedule_params == {"s": 0.01, "max_beta": 0.999}


def test_diffusion_model_takes_the_configs_fields_and_defaults():
    params = list(inspect.signature(DiffusionModel.__init__).parameters.values())[1:]
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert {p.name: p.default for p in params} == defaults
    assert DiffusionModel(**TINY).config == ModelConfig(**TINY)


def test_model_saves_its_config_and_from_config_rebuilds_it():
    cfg = CONFIGS[1]
    model = DiffusionModel.from_config(cfg)
    assert model.config == cfg and dict(model.hparams) == cfg.to_hparams()
    assert model.unet_config == cfg.unet_config() and model.ema is None
    assert len(model.schedule) == 100


def test_a_checkpoints_hparams_read_into_the_models_config(cond_rgb_ckpt):
    expected = ModelConfig(16 * 16, 100, 3, num_classes=3, ema_decay=0.9, lr=5e-3, **TINY)  # conftest's model
    saved = torch.load(cond_rgb_ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert saved == expected.to_hparams()
    assert ModelConfig.from_hparams(saved) == expected
    assert load_checkpoint(cond_rgb_ckpt).config == expected
    assert DiffusionModel.load_from_checkpoint(cond_rgb_ckpt).config == expected


def test_old_checkpoints_without_the_later_fields_read_with_defaults():
    old = {"in_size": 28 * 28, "t_range": 1000, "img_depth": 1, "schedule": "linear", "base_channels": 32,
           "channel_mult": [1, 2], "num_res_blocks": 2, "attention_resolutions": [7], "num_classes": 0}
    assert set(old) == set(REQUIRED_HPARAMS)
    cfg = ModelConfig.from_hparams(old)
    assert cfg.schedule_params == {"beta_start": 1e-4, "beta_end": 0.02} and cfg.class_names is None
    assert (cfg.num_heads, cfg.p_uncond, cfg.lr, cfg.ema_decay, cfg.dataset) == (1, 0.1, 2e-4, 0.999, None)
    # Such checkpoints were always exported with dropout 0, a constant of the traced TorchScript graph.
    assert cfg.dropout == 0.0
    assert cfg.unet_config() == UNetConfig(image_size=28, in_channels=1, base_channels=32, channel_mult=(1, 2),
                                           num_res_blocks=2, attention_resolutions=(7,), num_heads=1, dropout=0.0)


@pytest.mark.parametrize(
    "change, message",
    [({"extra": 1, "more": 2}, "unknown hyperparameters: extra, more"), ({"in_size": None}, "lack in_size")],
)
def test_unknown_or_missing_hparams_are_named(change, message):
    hp = {k: v for k, v in {**ModelConfig().to_hparams(), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hparams(hp)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(in_size=1000), "in_size must be a square number of pixels"),
     (dict(num_classes=2, class_names=["a"]), "1 class names given for 2 classes"),
     (dict(p_uncond=1.0), r"p_uncond must be in \[0, 1\)"), (dict(ema_decay=-0.1), r"ema_decay must be in \[0, 1\)"),
     (dict(schedule="laplace"), "unknown schedule"), (dict(schedule="explicit"), "unknown schedule")],
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_checkpoint_with_unusable_hparams_is_a_one_line_error(tmp_path, uncond_ckpt):
    data = torch.load(uncond_ckpt, map_location="cpu", weights_only=True)
    data["hyper_parameters"]["in_size"] = 1000
    torch.save(data, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="unusable hyperparameters: in_size must be a square"):
        load_checkpoint(tmp_path / "bad.ckpt")


def test_contract_of_the_shipped_checkpoint_is_the_shipped_onnx_contract():
    import onnx

    hparams = torch.load(ASSETS / "fashion-mnist.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    cfg = ModelConfig.from_hparams(hparams)
    meta = {p.key: p.value for p in onnx.load(str(ASSETS / "fashion-mnist.onnx")).metadata_props}
    shipped = SamplingContract.from_json(meta[CONTRACT_KEY])
    ours = cfg.contract(ema=True)
    assert (ours.image_size, ours.channels, ours.schedule, ours.num_classes, ours.class_names, ours.variance) == (
        shipped.image_size, shipped.channels, shipped.schedule, shipped.num_classes, shipped.class_names,
        shipped.variance)
    # Everything else too (the recommended run settings included: the checkpoint carries them), but where it came
    # from and the schema it was written in.
    assert dataclasses.replace(ours, provenance=shipped.provenance, schema_version=shipped.schema_version) == shipped
    assert ours.provenance.dataset == shipped.provenance.dataset == "fashion-mnist"
    ckpt = load_checkpoint(ASSETS / "fashion-mnist.ckpt")
    assert ckpt.config == cfg
    assert ckpt.contract(ema=True).provenance.training_steps == shipped.provenance.training_steps
