"""The runtime imports and samples with torch unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    """
)

SCRIPT = BLOCK_TORCH + textwrap.dedent(
    """
    import numpy as np
    import runtime, runtime.sampling.schedule, runtime.metadata, runtime.sampling.engine, runtime.sampling.plan
    from runtime.metadata import SamplingContract
    contract = SamplingContract(image_size=8, channels=1)
    plan = runtime.sampling.plan.make_plan(contract, sampler="ddpm", steps=20)
    rng = np.random.default_rng(0)
    x = runtime.sampling.engine.sample(lambda x, t, y: 0.1 * x, rng.standard_normal((2, 1, 8, 8)).astype(np.float32),
                                       plan.coefs, lambda i: rng.standard_normal((2, 1, 8, 8)).astype(np.float32))
    assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    print("ok")
    """
)


def test_runtime_works_without_torch():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


GENERATE = BLOCK_TORCH + textwrap.dedent(
    """
    import runtime
    g = runtime.load(sys.argv[1], "cpu")
    images = g.generate(3, sampler="ddim", steps=4)
    assert images.shape == (3, 16, 16, 1), images.shape
    from runtime.generate_cli import main
    main([sys.argv[1], "-n", "2", "--steps", "3", "--out", sys.argv[2], "--provider", "cpu"], standalone_mode=False)
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    print("ok")
    """
)


def test_cpu_generation_works_without_torch(uncond_onnx, tmp_path):
    r = subprocess.run([sys.executable, "-c", GENERATE, str(uncond_onnx), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["000000.png", "000001.png"]
