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


def cpu_matmul_gflops(threads: int, n: int = 2048, repeats: int = 7) -> dict:
    """Median / max fp32 GEMM GFLOP/s of ``torch.mm`` on n×n matrices with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return {"gflops_median": statistics.median(rates), "gflops_max": max(rates), "n": n, "threads": threads,
            "library": "torch.mm"}


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
