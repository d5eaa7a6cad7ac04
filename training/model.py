"""``DiffusionModel``: the Lightning wrapper that trains the U-Net with Algorithm 1 and samples with Algorithm 2.

The network (``training.unet.UNet``) knows nothing about Lightning; this module owns the optimizer, the EMA
copy of the weights (``torch.optim.swa_utils.AveragedModel``, kept as the ``ema`` submodule so it is part of
every checkpoint) and the diffusion tables, which come from ``runtime.sampling.schedule``.
What defines the model is a ``training.config.ModelConfig``; ``save_hyperparameters`` stores it, so a
checkpoint rebuilds the model with ``load_from_checkpoint(path)`` alone. Sampling runs the runtime's plan
(``runtime.sampling.plan.make_plan``) and batch engine (``runtime.sampling.engine.sample``) on the eager U-Net.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from runtime.backends.torch_loop import torch_ops
from runtime.sampling import engine
from runtime.sampling.plan import make_plan
from runtime.sampling.settings import RunSettings
from training.config import ModelConfig
from training.eval_mode import eval_mode
from training.predictor import eps_predictor
from training.unet import UNet


def ema_with_warmup(decay: float):
    """``AveragedModel``'s ``multi_avg_fn`` for an EMA whose decay ramps up: d_n = min(decay, (1 + n)/(10 + n)).

    With a fixed decay the average keeps the random initial weights for thousands of steps (at 0.999, 37 %
    of them after 1000 steps); the ramp (as in TensorFlow's ExponentialMovingAverage ``num_updates``) lets
    short CPU runs sample from a useful average early.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


class DiffusionModel(pl.LightningModule):
    """DDPM (Ho et al. 2020) over ``img_depth``-channel square images of ``in_size`` pixels.

    ``DiffusionModel(in_size=32*32, t_range=1000, img_depth=1)`` is the classic 32×32 grayscale model; the
    keyword options choose the schedule, the U-Net's size, class conditioning (``num_classes`` > 0, with
    labels replaced by the null class with probability ``p_uncond`` for classifier-free guidance), the
    learning rate and the EMA decay (0 disables EMA). The arguments are ``ModelConfig``'s fields (same
    defaults); ``DiffusionModel.from_config(cfg)`` builds the model from one.
    """

    def __init__(
        self,
        in_size: int = 32 * 32,
        t_range: int = 1000,
        img_depth: int = 1,
        *,
        schedule: Literal["linear", "cosine"] = "linear",
        schedule_params: dict[str, float] | None = None,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 1,
        dropout: float = 0.1,
        num_classes: int = 0,
        class_names: Sequence[str] | None = None,
        p_uncond: float = 0.1,
        lr: float = 2e-4,
        ema_decay: float = 0.999,
        dataset: str | None = None,
        run_defaults: dict | None = None,
    ) -> None:
        super().__init__()
        self.config = ModelConfig(
            in_size=in_size, t_range=t_range, img_depth=img_depth, schedule=schedule,
            schedule_params=schedule_params, base_channels=base_channels, channel_mult=channel_mult,
            num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, num_heads=num_heads,
            dropout=dropout, num_classes=num_classes, class_names=class_names, p_uncond=p_uncond, lr=lr,
            ema_decay=ema_decay, dataset=dataset, run_defaults=run_defaults,
        )
        self.save_hyperparameters(self.config.to_hparams())
        self.unet_config = self.config.unet_config()
        self.unet = UNet(self.unet_config)
        self.ema: AveragedModel | None = None
        if self.config.ema_decay > 0:
            self.ema = AveragedModel(self.unet, multi_avg_fn=ema_with_warmup(self.config.ema_decay))
            self.ema.requires_grad_(False)
        self.schedule = self.config.schedule_spec().build()
        # Algorithm 1 needs √ᾱ_t and √(1−ᾱ_t); float64 tables cast once, at the point of use.
        self.register_buffer("sqrt_ac", torch.tensor(self.schedule.sqrt_alphas_cumprod, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("sqrt_1m_ac",
                             torch.tensor(self.schedule.sqrt_one_minus_alphas_cumprod, dtype=torch.float32),
                             persistent=False)

    @classmethod
    def from_config(cls, config: ModelConfig) -> DiffusionModel:
        """A new (untrained) model defined by ``config``."""
        return cls(**config.to_hparams())

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.num_classes > 0 else None

    @property
    def ema_unet(self) -> UNet | None:
        """The EMA copy of the U-Net (a plain ``UNet``), or None when EMA is off."""
        return self.ema.module if self.ema is not None else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """ε prediction of the trained (raw) U-Net: x (B,C,H,W) float32, t (B,) int64, y (B,) int64 | None."""
        return self.unet(x, t, y)

    def diffusion_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Algorithm 1: t ~ U{0..T−1}, x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, loss = ‖ε − ε_θ(x_t, t)‖² (mean)."""
        x0, labels = batch
        b = x0.shape[0]
        t = torch.randint(0, self.config.t_range, (b,), device=x0.device)
        eps = torch.randn_like(x0)
        x_t = self.sqrt_ac[t].view(b, 1, 1, 1) * x0 + self.sqrt_1m_ac[t].view(b, 1, 1, 1) * eps
        y = None
        if self.num_classes > 0:
            y = labels.to(device=x0.device, dtype=torch.long)
            if self.training and self.config.p_uncond > 0:
                drop = torch.rand(b, device=x0.device) < self.config.p_uncond
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return F.mse_loss(self.unet(x_t, t, y), eps)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.unet)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.unet.parameters(), lr=self.config.lr)

    @torch.no_grad()
    def sample(
        self,
        n_samples: int = 16,
        *,
        labels: Sequence[int] | torch.Tensor | None = None,
        use_ema: bool = True,
        generator: torch.Generator | None = None,
        settings: RunSettings | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
        **run_settings,
    ) -> torch.Tensor:
        """Sample on the model's device with the runtime's plan and loop -> (n_samples, C, H, W) float32 in [−1, 1].

        Run settings (``settings`` and/or keywords: ``sampler``, ``steps``, ``eta``, ``guidance``,
        ``guidance_interval``, ``clip_denoised``, ``variance``, the fields of ``runtime.sampling.settings.RunSettings``)
        are those of ``ddpm-generate``; unset ones take the runtime's defaults (Algorithm 2 at all T steps, w = 1).
        ``labels`` (conditional models; default: classes cycle over the images) and guidance w give
        ε = ε_uncond + w·(ε_cond − ε_uncond); w ≠ 1 needs a conditional model. The EMA weights are used when
        present unless ``use_ema=False``. The model's train/eval mode is left as it was. Bad settings raise
        ValueError (``runtime.errors.SettingsError``), a NaN in x ``runtime.errors.GenerationError``. ``on_step(i, x)``
        is called after each sampler step (as by ``runtime.sampling.engine.sample``); what it raises ends the sampling.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be positive, got {n_samples}")
        ema = use_ema and self.ema is not None
        plan = make_plan(self.config.contract(ema=ema), settings, model_defaults=False, schedule=self.schedule,
                         **run_settings)
        unet = self.ema_unet if ema else self.unet
        y = None
        if self.num_classes > 0:
            y = torch.arange(n_samples) % self.num_classes if labels is None else torch.as_tensor(labels)
            if y.shape != (n_samples,) or int(y.min()) < 0 or int(y.max()) > self.num_classes:
                raise ValueError(f"labels must be {n_samples} class indices in [0, {self.num_classes}]")
            y = y.to(self.device, torch.long)
        elif labels is not None:
            raise ValueError("this model is unconditional: labels must be None")
        c, s = self.unet_config.in_channels, self.unet_config.image_size
        x_T = torch.randn(n_samples, c, s, s, device=self.device, generator=generator)

        def noise(i: int) -> torch.Tensor:
            return torch.randn(x_T.shape, device=self.device, generator=generator)

        with eval_mode(unet):
            x0 = engine.sample(eps_predictor(unet), x_T, plan.coefs, noise, labels=None if y is None else y.tolist(),
                               null_class=self.null_class, ops=torch_ops(self.device), on_step=on_step)
        return x0.clamp(-1.0, 1.0)
