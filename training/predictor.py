"""Adapter from an eager (or TorchScript) U-Net to the batch engine's ``net(x, t, y)``."""

from __future__ import annotations

import torch

from runtime.sampling.engine import Net


def eps_predictor(net: torch.nn.Module) -> Net:
    """``net(x: (B,C,H,W) float32, t: (B,) int64, y: (B,) int64 | None) -> output`` around the U-Net (which takes no
    ``y`` when it is unconditional). Classifier-free guidance is the engine's (``runtime.sampling.engine``)."""

    def call(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return net(x, t) if y is None else net(x, t, y)

    return call
