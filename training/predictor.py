"""Adapter from an eager (or TorchScript) U-Net to the samplers' ``predict_eps(x, t)`` callable."""

from __future__ import annotations

import torch

from runtime.sampling.samplers import PredictEps, guided_predictor


def eps_predictor(
    net: torch.nn.Module,
    y: torch.Tensor | None = None,
    *,
    null_class: int | None = None,
) -> PredictEps:
    """``predict_eps(x: (B,C,H,W) float32, t: int, w=1) -> ε (B,C,H,W)`` around ``net(x, t, y)``.

    ``y: (B,) int64`` are the labels of a class-conditional net (None for an unconditional one); with a
    guidance scale w ≠ 1 classifier-free guidance is applied (see ``runtime.sampling.samplers.guided_predictor``).
    """

    def call(x: torch.Tensor, t: int, labels: torch.Tensor | None) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return net(x, tt) if labels is None else net(x, tt, labels)

    return guided_predictor(call, y, null_class=null_class, concat=torch.cat)
