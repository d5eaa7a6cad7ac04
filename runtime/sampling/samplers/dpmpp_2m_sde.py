"""SDE-DPM-Solver++(2M) (Lu et al. 2022, App. B): DPM-Solver++(2M) with noise injected at every step but the last."""

from __future__ import annotations

import functools

from runtime.sampling.samplers import Sampler, dpmpp_2m

SAMPLER = Sampler("dpmpp-2m-sde", "SDE-DPM-Solver++(2M): the stochastic variant of dpmpp-2m",
                  functools.partial(dpmpp_2m.coefficients, sde=True), default_steps=20,
                  settings=("clip_denoised", "clip_range"), history=1, stochastic=True)
