"""One backend's measurements, run in a process of its own: ``python -m benchmarks.worker --backend ... ``.

Per batch size: the noise predictor alone (image-steps/s), and the runtime's sampling loop around it for a fixed
number of steps (image-steps/s, and the share of each step spent outside the predictor). Warm-up excluded;
median, min and max of the repeats. Prints one JSON list of records on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


class Timed:
    """Wraps a predictor ``net(x, t, y)`` and adds up the seconds spent inside it."""

    def __init__(self, net, sync=None) -> None:
        self.net, self.sync, self.seconds = net, sync, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.net(*args)
        if self.sync is not None:
            self.sync()
        self.seconds += time.perf_counter() - start
        return out


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


PT2_FILES = {"pt2-cpu": "model.pt2", "pt2-cpu-bf16": "model.bf16.pt2", "pt2-cuda": "model.cuda.pt2",
             "pt2-cuda-bf16": "model.cuda.bf16.pt2"}  # backend -> file in the model folder


def torch_backend(name: str, model_dir: Path, threads: int):
    import torch

    from ddpm_export.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    device = "cuda" if "cuda" in name else "cpu"
    if name == "torchscript":
        from runtime.backends.torchscript_model import TorchScriptModel

        net = TorchScriptModel(model_dir / "model.pt").module
    elif name in PT2_FILES:
        from runtime.backends.pt2_model import Pt2Model

        net = Pt2Model(model_dir / PT2_FILES[name]).net
    else:
        net, _ = load_checkpoint(model_dir / "model.ckpt").build_unet()
        net = net.to(device)
    if name.startswith("compile"):  # what a PyTorch user gets: torch.compile, bf16 autocast, channels_last
        net = torch.compile(net.to(memory_format=torch.channels_last),
                            mode="reduce-overhead" if device == "cuda" else None)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=name.startswith("compile"))
    sync = torch.cuda.synchronize if device == "cuda" else None

    def call(x, t, y=None):
        with torch.inference_mode(), autocast:
            eps = net(x, t) if y is None else net(x, t, y)
        return eps.float()

    def native(a: np.ndarray):
        return torch.from_numpy(a).to(device)

    return call, native, sync


def onnx_row(name: str) -> tuple[str, str | None, bool]:
    """``onnx-PROVIDER[-PRECISION][-fused]`` → (provider, precision or None, fused): the exported ONNX file on any
    provider of the backend registry (``runtime.backends.registry``)."""
    from runtime.backends.precision import PRECISIONS

    parts = name.split("-")[1:]
    fused = parts[-1] == "fused"
    parts = parts[:-1] if fused else parts
    dtype = parts.pop() if len(parts) > 1 and parts[-1] in PRECISIONS else None
    return "-".join(parts), dtype, fused


def onnx_backend(name: str, model_dir: Path, threads: int):
    import runtime

    provider, dtype, _ = onnx_row(name)
    return runtime.load(model_dir / "model.onnx", provider, dtype=dtype, threads=threads, log=lambda m: None).backend


def measure(name: str, model_dir: Path, batch_sizes: list[int], threads: int, repeats: int, loop_steps: int,
            e2e_n: int) -> list[dict]:
    import runtime
    from runtime.sampling.engine import sample
    from runtime.sampling.noise import NoiseStreams

    contract_model = runtime.load(model_dir / "model.onnx", "cpu", threads=threads)
    c = contract_model.contract
    plan = contract_model.plan(sampler="ddpm", steps=loop_steps, model_defaults=False)  # as the predictor: w = 1
    is_onnx = name.startswith("onnx")
    fused = is_onnx and onnx_row(name)[2]
    if is_onnx:
        model = onnx_backend(name, model_dir, threads)
        call, native, sync = model.predict_eps, (lambda a: a), None
    else:
        call, native, sync = torch_backend(name, model_dir, threads)
    from benchmarks.ceiling import cpu_matmul_gflops, cpu_matmul_gflops_bf16

    on_cpu = not is_onnx or model.device == "cpu"
    bf16 = is_onnx and model.precision == "bf16"
    records = []
    for b in batch_sizes:
        # This VM's speed drifts by ~10 % over minutes: the ceiling is measured right before each row, in the
        # precision the row computes in.
        ceiling = None
        if on_cpu and "cuda" not in name:
            ceiling = ({"gflops_median": cpu_matmul_gflops_bf16(threads), "library": "torch.mm bf16"} if bf16
                       else cpu_matmul_gflops(threads, repeats=5))
        rng = np.random.default_rng(0)
        x = native(rng.standard_normal((b, c.channels, c.image_size, c.image_size)).astype(np.float32))
        t = native(rng.integers(0, c.schedule.timesteps, b).astype(np.int64))
        y = native((np.arange(b) % c.num_classes).astype(np.int64)) if c.conditional else None
        args = (x, t) if y is None else (x, t, y)
        # the predictor alone
        for _ in range(2):
            call(*args)
        if sync:
            sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call(*args)
            if sync:
                sync()
            times.append(time.perf_counter() - start)
        pred = stats([b / s for s in times])
        # the runtime's sampling loop around it, loop_steps steps
        indices = list(range(b))
        labels = None if not c.conditional else (np.arange(b) % c.num_classes).astype(np.int64)
        loop_rates, shares = [], []
        for rep in range(repeats + 1):
            timed = Timed(call, sync)
            if fused:
                g = runtime.Pipeline(model, log=lambda m: None)
                start = time.perf_counter()
                for _ in g.generate_batches(indices, plan, seed=rep, batch_size=b, labels=labels, fused=True):
                    pass
            elif is_onnx:
                backend = copy.copy(model)  # the same session, with its predictor timed
                backend.predict_eps = timed
                g = runtime.Pipeline(backend, log=lambda m: None)
                start = time.perf_counter()
                for _ in g.generate_batches(indices, plan, seed=rep, batch_size=b, labels=labels, fused=False):
                    pass
            else:
                from runtime.backends.torch_loop import torch_ops

                streams = NoiseStreams(rep, indices, (c.channels, c.image_size, c.image_size))
                start = time.perf_counter()
                x0 = sample(lambda *a: timed(*a), native(streams.next()), plan.coefs, lambda i: native(streams.next()),
                            labels=None if labels is None else labels.tolist(), null_class=c.null_class,
                            ops=torch_ops("cuda" if "cuda" in name else "cpu"))
                _ = x0.cpu().numpy() if hasattr(x0, "cpu") else x0
            elapsed = time.perf_counter() - start
            if rep == 0:
                continue  # warm-up
            loop_rates.append(b * loop_steps / elapsed)
            if not fused:
                shares.append(1.0 - timed.seconds / elapsed)
        records.append({
            "backend": name, "batch_size": b, "threads": threads, "precision": model.precision if is_onnx else None,
            "img_steps_per_s": pred["median"], "predictor": pred,
            "loop": stats(loop_rates), "loop_steps": loop_steps,
            "sampler_share": stats(shares) if shares else None,
            "cpu_ceiling_gflops": None if ceiling is None else ceiling["gflops_median"],
            "cpu_ceiling_library": None if ceiling is None else ceiling["library"],
        })
        print(f"  {name} batch {b}: predictor {pred['median']:.1f} img-steps/s, "
              f"loop {statistics.median(loop_rates):.1f}",
              file=sys.stderr)
    if name == "onnx-cpu" and e2e_n:
        records.append(end_to_end(model_dir, threads, e2e_n, loop_steps))
    return records


def end_to_end(model_dir: Path, threads: int, n: int, steps: int) -> dict:
    """A ddpm-generate-equivalent run (PNG files, manifest) of n images, DDIM ``steps`` steps, batch n."""
    import tempfile

    import runtime
    from runtime.generation.run import RunOptions, generate_to_dir
    from runtime.sampling.settings import RunSettings

    g = runtime.load(model_dir / "model.onnx", "cpu", threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_to_dir(g, RunOptions(n=n, out=tmp, batch_size=n,
                                      settings=RunSettings(sampler="ddim", steps=steps, guidance=1.0)))
        seconds = time.perf_counter() - start
    return {"backend": "onnx-cpu", "end_to_end": True, "n": n, "batch_size": n, "sampler": "ddim", "steps": steps,
            "seconds": seconds, "images_per_s": n / seconds, "threads": threads}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", required=True)
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--batch-sizes", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loop-steps", type=int, default=10)
    p.add_argument("--e2e-n", type=int, default=0, help="images (one batch) of the end-to-end run; 0: none")
    a = p.parse_args()
    records = measure(a.backend, a.model_dir, [int(b) for b in a.batch_sizes.split(",")], a.threads, a.repeats,
                      a.loop_steps, a.e2e_n)
    json.dump(records, sys.stdout)


if __name__ == "__main__":
    main()
