"""The torch backends' arrays for the batch engine: x, the history, the noise and the labels as tensors on their device.

The noise is drawn on the host by the same per-image streams as every other backend (so images do not depend on the
backend) and uploaded once per step; only the finished images come back. On a GPU, x is copied to the host for the
NaN check only every ``runtime.sampling.engine.FINITE_CHECK_EVERY`` steps.
"""

from __future__ import annotations

import numpy as np

from runtime.sampling.engine import Engine, Ops
from runtime.sampling.finish import finisher


def torch_ops(device) -> Ops:
    """``Ops`` over torch tensors on ``device`` (a torch.device or its name)."""
    import torch

    def upload(a):
        if isinstance(a, torch.Tensor):
            return a.to(device)
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

    def index(rows):
        return torch.as_tensor(rows, dtype=torch.int64, device=device)

    def put(a, rows, values):
        a[index(rows)] = values

    return Ops(concat=torch.cat, take=lambda a, rows: a[index(rows)], put=put,
               ints=lambda values: torch.as_tensor(list(values), dtype=torch.int64, device=device),
               floats=upload, upload=upload, download=lambda a: a.float().cpu().numpy(),
               zeros_like=torch.zeros_like, context=torch.inference_mode, on_host=torch.device(device).type == "cpu")


def device_engine(net, device: str, contract, decoder=None) -> Engine:
    """An engine whose arrays live on ``device``, around ``net(x, t, y)`` (torch tensors there); a latent model's
    ``decoder(z)`` runs there too, on each finished batch."""
    ops = torch_ops(device)
    return Engine(net, ops, null_class=contract.null_class, finish=finisher(contract, decoder, ops.download))
