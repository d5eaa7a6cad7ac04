"""dpmpp-3m and unipc against diffusers' own schedulers on a tiny random UNet2DModel (made here, never downloaded):
the same timesteps (trailing spacing, which both libraries compute alike), the same x_T, float32 both; the final
images within ``TOLERANCES["fp32-same-math"].max_levels`` (1) uint8 level."""

from __future__ import annotations

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers", reason="the interop extra (diffusers) is not installed")
import torch  # noqa: E402

from runtime.backends.torch_loop import torch_ops  # noqa: E402
from runtime.metadata import SamplingContract  # noqa: E402
from runtime.sampling.engine import sample  # noqa: E402
from runtime.sampling.finish import to_uint8  # noqa: E402
from runtime.sampling.plan import make_plan  # noqa: E402
from runtime.tolerances import TOLERANCES  # noqa: E402

SIZE, CHANNELS = 8, 3
SCHEDULERS = {
    "dpmpp-3m": lambda: diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=3, lower_order_final=True, final_sigmas_type="zero",
        timestep_spacing="trailing"),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
        timestep_spacing="trailing"),
}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4).eval()


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("steps", [6, 10, 16])
def test_matches_the_diffusers_scheduler(unet, sampler, steps):
    # linear β 1e-4 … 0.02, T = 1000: diffusers' default
    contract = SamplingContract(image_size=SIZE, channels=CHANNELS)
    plan = make_plan(contract, sampler=sampler, steps=steps, spacing="trailing", model_defaults=False)
    scheduler = SCHEDULERS[sampler]()
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == plan.coefs.timesteps[::-1].tolist()
    x_T = torch.randn(2, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(steps))

    with torch.inference_mode():
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        theirs = to_uint8(x.numpy())
        ours = to_uint8(sample(lambda x, t, y: unet(x, t).sample, x_T.clone(), plan.coefs, lambda i: None,
                               ops=torch_ops("cpu")).numpy())
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= TOLERANCES["fp32-same-math"].max_levels, (sampler, steps, diff.max(), (diff > 0).mean())
    assert theirs.std() > 10  # real images, not saturated
