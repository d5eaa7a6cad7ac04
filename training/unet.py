"""The DDPM noise predictor: a U-Net ε_θ(x_t, t[, y]) as a plain ``nn.Module`` (no Lightning).

Residual blocks conditioned on a sinusoidal timestep embedding (followed by an MLP), self-attention at
configurable resolutions, GroupNorm throughout, skip connections from encoder to decoder, and optional
class conditioning with a learned embedding whose last row is the null class for classifier-free
guidance. There is no data-dependent Python control flow, so tracing and ONNX export capture it with a
dynamic batch dimension. This is the only module that is exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines the network's shape; stored with the weights so they rebuild it."""

    image_size: int = 32
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 1
    dropout: float = 0.1
    num_classes: int = 0  # 0 = unconditional; else labels 0..num_classes-1, num_classes = null label
    norm_groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        if self.in_channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.in_channels}")
        if self.base_channels < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError("base channels and channel multipliers must be positive")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size < factor or self.image_size % factor:
            raise ValueError(
                f"image size {self.image_size} is not divisible by {factor} "
                f"(the U-Net halves it {len(self.channel_mult) - 1} times for channel_mult {list(self.channel_mult)})"
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be at least 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        for mult in self.channel_mult:
            ch = self.base_channels * mult
            if ch % self.num_heads:
                raise ValueError(f"{ch} channels cannot be split into {self.num_heads} attention heads")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al.) of ``t: (B,) int64`` -> (B, dim) float32: [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` calling the aten op directly.

    ``F.group_norm`` first runs a Python-side batch-size check that converts a traced size to a bool, which
    the TorchScript tracer reports as a TracerWarning (and export treats tracer warnings as errors).
    The check is irrelevant here: every group holds at least one channel and H×W > 1.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """GN → SiLU → conv, + projected embedding, GN → SiLU → dropout → conv, plus a (1×1) skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H×W positions, with a residual connection."""

    def __init__(self, ch: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        # Channels-first throughout: (B, 3, heads, C/heads, H·W) is a view of the qkv conv's output, and the
        # transposes below are absorbed by the matmuls (onnxruntime fuses them into FusedMatMul); moving the
        # channels last instead costs two full copies per block (28 % of CPU time at batch 64, benchmarks/README.md).
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, ch // self.num_heads, h * w).unbind(1)
        scale = (ch // self.num_heads) ** -0.5
        attn = torch.softmax((q * scale).transpose(-1, -2) @ k, dim=-1)  # (B, heads, HW, HW)
        out = v @ attn.transpose(-1, -2)  # (B, heads, C/heads, HW)
        return x + self.proj(out.reshape(b, ch, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: a residual block, optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """ε_θ(x_t, t, y).

    forward(x: (B, C, H, W) float32, t: (B,) int64 in [0, T), y: (B,) int64 | None) -> ε: (B, C, H, W) float32.
    ``y`` is required exactly when the model is class-conditional; label ``num_classes`` is the null class.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = config if config is not None else UNetConfig(**kwargs)
        self.config = cfg
        ch0, groups = cfg.base_channels, cfg.norm_groups
        emb_dim = 4 * ch0
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None

        def block(cin: int, cout: int, res: int) -> Level:
            attn = AttentionBlock(cout, cfg.num_heads, groups) if res in cfg.attention_resolutions else None
            return Level(ResBlock(cin, cout, emb_dim, cfg.dropout, groups), attn)

        self.stem = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, res = [ch0], ch0, cfg.image_size
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, ch0 * mult, res))
                ch = ch0 * mult
                skips.append(ch)
            if i < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([  # residual, attention, residual (always, as in DDPM)
            Level(ResBlock(ch, ch, emb_dim, cfg.dropout, groups), AttentionBlock(ch, cfg.num_heads, groups)),
            Level(ResBlock(ch, ch, emb_dim, cfg.dropout, groups), None),
        ])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), ch0 * mult, res))
                ch = ch0 * mult
            if i > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        if self.class_emb is not None:
            if y is None:
                raise ValueError("this U-Net is class-conditional: pass y (use num_classes for the null class)")
            emb = emb + self.class_emb(y)
        elif y is not None:
            raise ValueError("this U-Net is unconditional: y must be None")
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, emb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(h) if isinstance(layer, Upsample) else layer(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
