"""The yardsticks: the model's FLOPs per image-step and this machine's measured fp32 matrix-multiply rate."""

from __future__ import annotations

import statistics
import time


def flops_per_image_step(net, channels: int, image_size: int, conditional: bool) -> float:
    """FLOPs of one ε prediction for one image, counted by ``torch.utils.flop_counter`` (batch 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    args = [torch.randn(1, channels, image_size, image_size), torch.tensor([500])]
    if conditional:
        args.append(torch.tensor([0]))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(*args)
    return float(counter.get_total_flops())


NUMPY_GEMM = """
import sys, time, numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
a @ b; a @ b
times = []
for _ in range(repeats):
    s = time.perf_counter(); a @ b; times.append(time.perf_counter() - s)
print(" ".join(str(2 * n**3 / t / 1e9) for t in times))
"""


def cpu_matmul_gflops(threads: int, n: int = 2048, repeats: int = 7) -> dict:
    """fp32 GEMM GFLOP/s on n×n matrices with ``threads`` threads: the better of ``torch.mm`` and NumPy's BLAS.

    NumPy runs in a subprocess so that its BLAS thread count can be set before it loads, and without the
    OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE overrides this workplace sets (they pin OpenBLAS to Haswell AVX2
    kernels; on the AVX-512 benchmark machine that halves the measured rate: 254 vs 460 GFLOP/s).
    """
    import os
    import subprocess
    import sys

    import torch

    torch.set_num_threads(threads)
    torch_rates = _torch_mm_gflops(torch.randn(n, n), repeats)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    out = subprocess.run([sys.executable, "-c", NUMPY_GEMM, str(n), str(repeats)], capture_output=True, text=True,
                         env=env, check=True).stdout
    numpy_rates = [float(v) for v in out.split()]
    libraries = {"torch.mm": torch_rates, "numpy.matmul": numpy_rates}
    best = max(libraries, key=lambda k: statistics.median(libraries[k]))
    return {"gflops_median": statistics.median(libraries[best]), "gflops_max": max(libraries[best]), "n": n,
            "threads": threads, "library": best, "repeats": repeats,
            "all": {k: {"median": statistics.median(v), "max": max(v)} for k, v in libraries.items()}}


def cpu_matmul_gflops_bf16(threads: int, n: int = 4096, repeats: int = 5) -> float:
    """bf16 GEMM GFLOP/s (median) of ``torch.mm`` on n×n matrices with ``threads`` threads: the machine's bf16 rate
    as torch's oneDNN reaches it (AMX or AVX-512 BF16 where the CPU has them)."""
    import torch

    torch.set_num_threads(threads)
    return statistics.median(_torch_mm_gflops(torch.randn(n, n).bfloat16(), repeats))


def _torch_mm_gflops(a, repeats: int) -> list[float]:
    """GFLOP/s of ``torch.mm(a, a)`` (a: n×n), each of ``repeats`` timed calls after two warm-up calls."""
    import torch

    n = a.shape[0]
    for _ in range(2):
        torch.mm(a, a)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, a)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return rates


def gpu_ceiling(repeats: int = 20) -> dict | None:
    """On a CUDA device: fp32 (TF32 off) GEMM GFLOP/s and device-to-device copy bandwidth (GB/s); None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    n = 8192
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    gemm = timed(lambda: torch.mm(a, b))
    copy = timed(lambda: dst.copy_(src))
    return {"device": torch.cuda.get_device_name(), "fp32_gemm_gflops": 2 * n**3 / gemm / 1e9,
            "copy_bandwidth_gbs": 2 * src.numel() / copy / 1e9}
