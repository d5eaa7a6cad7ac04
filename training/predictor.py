"""Adapter from an eager (or TorchScript) U-Net to the samplers' ``predict_eps(x, t)`` callable."""

from __future__ import annotations

import torch

from runtime.samplers import PredictEps, guided_eps


def eps_predictor(
    net: torch.nn.Module,
    y: torch.Tensor | None = None,
    *,
    guidance: float = 1.0,
    null_class: int | None = None,
) -> PredictEps:
    """``predict_eps(x: (B,C,H,W) float32, t: int) -> ε (B,C,H,W)`` around ``net(x, t, y)``.

    For a class-conditional net, ``y: (B,) int64`` are the labels; with ``guidance`` ≠ 1 the conditional
    and null-class predictions come from one batched call and are combined by ``guided_eps``.
    """
    if y is None:
        return lambda x, t: net(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    if guidance == 1.0:
        return lambda x, t: net(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), y)
    if null_class is None:
        raise ValueError("classifier-free guidance needs the null class label")
    y2 = torch.cat([y, torch.full_like(y, null_class)])

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        b = x.shape[0]
        eps = net(torch.cat([x, x]), torch.full((2 * b,), t, dtype=torch.long, device=x.device), y2)
        return guided_eps(eps[:b], eps[b:], guidance)

    return predict
