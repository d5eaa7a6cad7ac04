"""The sampler loop of the torch backends (TorchScript, .pt2) on their device: ``samplers.sample`` over tensors.

x, the update and the noise live on the device; the noise is drawn on the host by the same per-image streams as
every other backend (so images do not depend on the backend) and uploaded once per step; only the final images
come back. On a GPU, x is copied to the host for the finiteness check only every ``FINITE_CHECK_EVERY`` steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from runtime.backends.fused import FINITE_CHECK_EVERY
from runtime.sampling.plan import SamplingPlan, StepCoefficients
from runtime.sampling.samplers import NoiseFn, OnStep, guided_predictor, sample

DeviceLoop = Callable[..., np.ndarray]  # (x_T, coefs, noise, *, on_step) -> x_0, like samplers.sample minus predict


def device_loop(net, device: str, plan: SamplingPlan, y: np.ndarray | None, null_class: int | None) -> DeviceLoop:
    """A loop with ``samplers.sample``'s signature (less the predictor) around ``net(x, t, y)`` on ``device``."""
    import torch

    labels = None if y is None else torch.from_numpy(np.ascontiguousarray(y, np.int64)).to(device)

    def call(x, t: int, lab):
        return net(x, torch.full((x.shape[0],), t, dtype=torch.int64, device=device), lab)

    predict = guided_predictor(call, labels, null_class=null_class, concat=torch.cat)
    on_host = device == "cpu"

    def upload(a: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

    def loop(x_T: np.ndarray, coefs: StepCoefficients, noise: NoiseFn, *, on_step: OnStep | None = None) -> np.ndarray:
        def step_done(i: int, x) -> None:
            if on_step is not None:
                on_step(i, x.cpu().numpy() if on_host or i % FINITE_CHECK_EVERY == 0 else None)

        with torch.inference_mode():
            x0 = sample(predict, upload(x_T), coefs, lambda i: upload(noise(i)), on_step=step_done)
            return x0.float().cpu().numpy()

    return loop
