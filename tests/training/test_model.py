"""DiffusionModel: Algorithm 1 training, checkpoints that rebuild themselves, EMA, Algorithm 2 sampling."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from runtime.backends.torch_loop import torch_ops
from runtime.errors import SettingsError
from runtime.sampling.engine import sample
from runtime.sampling.plan import make_plan
from runtime.sampling.samplers import SAMPLERS, ddpm
from training.dataset import Diffset
from training.eval_mode import eval_mode
from training.model import DiffusionModel
from training.predictor import eps_predictor

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)


def fit(model: DiffusionModel, loader: DataLoader, steps: int, tmp_path=None) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    return trainer


def random_loader(n: int, channels: int, size: int, num_classes: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, channels, size, size, generator=g) * 2 - 1
    y = torch.randint(0, max(num_classes, 1), (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


@pytest.mark.parametrize("channels, size", [(1, 32), (3, 32), (3, 64)])
def test_trains_a_few_steps_on_cpu(channels, size):
    torch.manual_seed(0)
    model = DiffusionModel(size * size, 1000, channels, **TINY)
    before = [p.detach().clone() for p in model.unet.parameters()]
    trainer = fit(model, random_loader(8, channels, size), steps=3)
    assert trainer.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.unet.parameters()))


def test_seed_usage_with_diffset(fashion_root):
    """The classic usage: Diffset + DiffusionModel(size*size, 1000, depth) + pl.Trainer().fit."""
    train_dataset = Diffset(True, "FashionMNIST", root=fashion_root)
    model = DiffusionModel(train_dataset.size * train_dataset.size, 1000, train_dataset.depth, **TINY)
    loader = DataLoader(train_dataset, batch_size=16, shuffle=True)
    fit(model, loader, steps=2)
    out = model.sample(n_samples=4, steps=5)
    assert out.shape == (4, 1, 32, 32)


def test_overfits_a_fixed_batch():
    """The loss on a fixed batch of 8 images falls by at least half within 200 steps on a tiny U-Net."""
    torch.manual_seed(0)
    x0 = torch.zeros(8, 1, 32, 32) - 1
    for i in range(8):  # simple structured images: a bright bar at a per-image position
        x0[i, :, 4 * i:4 * i + 4, :] = 1
    model = DiffusionModel(32 * 32, 1000, 1, lr=1e-3, **TINY)
    opt = model.configure_optimizers()
    batch = (x0, torch.zeros(8, dtype=torch.long))

    def fixed_loss() -> float:  # the same t and ε every time, so the numbers are comparable
        with torch.random.fork_rng():
            torch.manual_seed(123)
            with torch.no_grad():
                return sum(model.diffusion_loss(batch).item() for _ in range(8)) / 8

    start = fixed_loss()
    for _ in range(200):
        opt.zero_grad()
        model.diffusion_loss(batch).backward()
        opt.step()
    end = fixed_loss()
    assert end <= 0.5 * start, (start, end)


def test_checkpoint_reloads_alone_with_ema(tmp_path):
    torch.manual_seed(0)
    model = DiffusionModel(32 * 32, 100, 1, num_classes=3, class_names=["a", "b", "c"], ema_decay=0.9, **TINY)
    trainer = fit(model, random_loader(16, 1, 32, num_classes=3), steps=6, tmp_path=tmp_path)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)

    loaded = DiffusionModel.load_from_checkpoint(path)
    assert loaded.hparams.num_classes == 3 and loaded.hparams.class_names == ["a", "b", "c"]
    assert loaded.hparams.t_range == 100 and len(loaded.schedule) == 100
    for a, b in zip(loaded.unet.state_dict().values(), model.unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(loaded.ema_unet.state_dict().values(), model.ema_unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(loaded.ema.n_averaged) == 6
    differs = [not torch.equal(a, b) for a, b in zip(loaded.ema_unet.parameters(), loaded.unet.parameters())]
    assert any(differs), "EMA weights should differ from the raw weights after training"


def test_sample_shape_range_and_mode():
    torch.manual_seed(0)
    model = DiffusionModel(32 * 32, 1000, 3, num_classes=2, **TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = model.sample(n_samples=3, steps=10, guidance=3.0, generator=g)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    assert model.training and model.ema_unet.training  # sampling leaves the mode as it was
    again = model.sample(n_samples=3, steps=10, guidance=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, again, rtol=0, atol=0)
    with pytest.raises(ValueError, match="class indices"):
        model.sample(2, labels=[0, 5], steps=2)


def test_full_algorithm_2_uses_every_timestep():
    model = DiffusionModel(16 * 16, 50, 1, ema_decay=0.0, **TINY)
    seen = []
    model.unet.register_forward_hook(lambda m, args, out: seen.append(int(args[1][0])))
    x = model.sample(n_samples=2)
    assert x.shape == (2, 1, 16, 16) and seen == list(range(49, -1, -1))


def perturbed(model: DiffusionModel) -> DiffusionModel:
    """The model with random weights (a new U-Net predicts ε = 0: its output layers start at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize(
    "steps, variance, expected_variance",
    [(None, None, "beta"), (100, None, "beta"), (10, None, "beta_tilde"), (10, "beta", "beta"),
     (None, "beta_tilde", "beta_tilde")],
)
def test_sample_is_algorithm_2_with_beta_at_full_T_and_beta_tilde_when_respaced(steps, variance, expected_variance):
    """Against the loop run by hand on the coefficients each setting should give, with the same noise."""
    torch.manual_seed(0)
    model = perturbed(DiffusionModel(16 * 16, 100, 1, ema_decay=0.0, **TINY))
    schedule = model.schedule if steps in (None, 100) else model.schedule.respace(steps)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 1, 16, 16, generator=g)
    with torch.no_grad(), eval_mode(model.unet):
        expected = sample(eps_predictor(model.unet), x_T, ddpm.coefficients(schedule, variance=expected_variance),
                          lambda i: torch.randn(x_T.shape, generator=g), ops=torch_ops("cpu")).clamp(-1, 1)
    got = model.sample(2, steps=steps, variance=variance, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)
    if steps == 10 and variance is None:  # the default really is β̃ here: β gives other images
        assert not torch.equal(got, model.sample(2, steps=10, variance="beta",
                                                 generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("sampler", [name for name, s in SAMPLERS.items() if s.history])
def test_sample_takes_every_sampler_with_the_runtime_plan(sampler):
    """DiffusionModel.sample runs the runtime's plan and loop for the multistep samplers too (same noise)."""
    torch.manual_seed(0)
    model = perturbed(DiffusionModel(16 * 16, 100, 1, ema_decay=0.0, **TINY))
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 1, 16, 16, generator=g)
    plan = make_plan(model.config.contract(ema=False), sampler=sampler, steps=6, model_defaults=False)
    with torch.no_grad(), eval_mode(model.unet):
        expected = sample(eps_predictor(model.unet), x_T, plan.coefs,
                          lambda i: torch.randn(x_T.shape, generator=g), ops=torch_ops("cpu")).clamp(-1, 1)
    got = model.sample(2, sampler=sampler, steps=6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs, message", [(dict(guidance=2.0), "class-conditional"),
                                             (dict(steps=11), "between 1 and T"),
                                             (dict(guidance_interval=(0, 5)), "class-conditional"),
                                             (dict(sampler="dpmpp-2m", eta=0.5), "ddim sampler only")])
def test_bad_sampler_settings_are_refused(kwargs, message):
    model = DiffusionModel(16 * 16, 10, 1, **TINY)
    with pytest.raises(SettingsError, match=message):
        model.sample(1, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(in_size=1000), "square"), (dict(num_classes=2, class_names=["a"]), "class names"),
     (dict(ema_decay=1.0), "ema_decay"), (dict(schedule="laplace"), "unknown schedule")],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionModel(**{**TINY, **kwargs})


def test_ema_decay_ramps_up():
    from training.model import ema_with_warmup

    update = ema_with_warmup(0.999)
    avg, cur = [torch.zeros(2)], [torch.ones(2)]
    update(avg, cur, torch.tensor(1))  # d = min(0.999, 2/11)
    torch.testing.assert_close(avg[0], torch.full((2,), 9 / 11))
    avg = [torch.zeros(2)]
    update(avg, cur, torch.tensor(100_000))  # the ramp has passed: d = 0.999
    torch.testing.assert_close(avg[0], torch.full((2,), 0.001))
