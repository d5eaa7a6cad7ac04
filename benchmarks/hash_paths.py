"""Hash the images of every sampling path, so a refactor can show that it changes none of them.

    python -m benchmarks.hash_paths --models DIR [--make-models] [--only NAME,...]

prints one line per case: ``name  sha256-of-the-uint8-images`` (the CLI case hashes every file the run writes but
for the timings). ``DIR`` holds the TorchScript and .pt2 exports of the bundled checkpoint, made once with
``--make-models`` so that before and after hash the same files. Run it before a refactor and after, and diff.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "runtime" / "assets" / "fashion-mnist.onnx"
CKPT = ROOT / "runtime" / "assets" / "fashion-mnist.ckpt"

# name: (model, generate() settings); every case makes 4 images (DDPM at full T: 2) from seed 3, start index 5.
# Every case names its guidance (the bundled ONNX recommends w = 2 on [0, 400]; only "model-defaults" takes that).
# Each case's settings differ from every other's: the hash is of the uint8 images, and two paths that agree to within
# float32 rounding (host and fused, ONNX and TorchScript) give the same uint8 images for the same settings, so a
# shared hash would only say that. TWINS check it on purpose. Before issue 28, ddim-eta0-20 inherited w = 1.5 from a
# default and so had fused-ddim-guided's settings: the two hashed the same, as the paths agree.
CASES: dict[str, tuple[str, dict]] = {
    "ddpm-full": ("onnx", dict(n=2, sampler="ddpm", guidance=1.5)),
    "ddpm-respaced-50": ("onnx", dict(sampler="ddpm", steps=50, guidance=1.5)),
    "ddpm-respaced-beta": ("onnx", dict(sampler="ddpm", steps=50, variance="beta", guidance=1.5)),
    "ddim-eta0-20": ("onnx", dict(sampler="ddim", steps=20, eta=0.0, guidance=1.0)),
    "ddim-eta1-20": ("onnx", dict(sampler="ddim", steps=20, eta=1.0, guidance=1.5)),
    "ddpm-clipped-50": ("onnx", dict(sampler="ddpm", steps=50, clip_denoised=True, guidance=1.5)),
    "ddim-clipped-20": ("onnx", dict(sampler="ddim", steps=20, clip_denoised=True, eta=0.5, guidance=1.5)),
    "ddim-guided-20": ("onnx", dict(sampler="ddim", steps=20, guidance=1.5, classes=7)),
    "ddpm-guided-50": ("onnx", dict(sampler="ddpm", steps=50, guidance=2.0)),
    "model-defaults": ("onnx", dict()),
    "dpmpp-2m-15": ("onnx", dict(sampler="dpmpp-2m", steps=15, guidance=1.5)),
    "dpmpp-2m-clipped-12": ("onnx", dict(sampler="dpmpp-2m", steps=12, clip_denoised=True, guidance=3.0)),
    "dpmpp-2m-sde-20": ("onnx", dict(sampler="dpmpp-2m-sde", steps=20, guidance=1.5)),
    "interval-ddim-20": ("onnx", dict(sampler="ddim", steps=20, guidance=2.0, guidance_interval=(200, 700))),
    "interval-dpmpp-2m-10": ("onnx", dict(sampler="dpmpp-2m", steps=10, guidance=2.5, guidance_interval=(0, 400))),
    "fused-ddim-guided": ("onnx", dict(sampler="ddim", steps=20, guidance=1.5, classes=3, fused=True)),
    "fused-ddpm-clipped": ("onnx", dict(sampler="ddpm", steps=40, clip_denoised=True, guidance=1.5, fused=True)),
    "fused-ddim-eta1": ("onnx", dict(sampler="ddim", steps=20, eta=1.0, guidance=1.0, fused=True)),
    "fused-dpmpp-2m-15": ("onnx", dict(sampler="dpmpp-2m", steps=15, guidance=1.5, classes=1, fused=True)),
    "fused-dpmpp-2m-sde": ("onnx", dict(sampler="dpmpp-2m-sde", steps=12, guidance=1.0, fused=True)),
    "fused-interval": ("onnx", dict(sampler="dpmpp-2m", steps=10, guidance=2.0, guidance_interval=(300, 999),
                                    fused=True)),
    "torchscript-host": ("pt", dict(sampler="ddim", steps=20, guidance=1.5)),
    "torchscript-device": ("pt", dict(sampler="ddpm", steps=30, guidance=1.5, fused=True)),
    "torchscript-device-2m": ("pt", dict(sampler="dpmpp-2m", steps=10, guidance=2.0, fused=True)),
    "pt2-host": ("pt2", dict(sampler="ddim", steps=25, guidance=1.5, classes=4)),
    "pt2-device": ("pt2", dict(sampler="ddim", steps=20, eta=1.0, clip_denoised=True, guidance=1.0, fused=True)),
    "pt2-device-2m-sde": ("pt2", dict(sampler="dpmpp-2m-sde", steps=8, guidance=1.5, fused=True)),
}
# the same settings as a fused case, on the host: on the CPU each hashes as its twin (printed as a check)
TWINS: dict[str, tuple[str, tuple[str, dict]]] = {
    "fused-ddim-guided": ("host-twin-ddim", ("onnx", dict(sampler="ddim", steps=20, guidance=1.5, classes=3))),
    "fused-dpmpp-2m-15": ("host-twin-dpmpp-2m", ("onnx", dict(sampler="dpmpp-2m", steps=15, guidance=1.5, classes=1))),
}
# the server: requests submitted together share the batch (max_batch 5 < 13 images, so some sit out ticks and keep
# their state); each request names its guidance, so a new recommendation of the model changes none
_EVERY = dict(guidance=1.5, guidance_interval=(0, 999))
SERVER = [dict(n=3, sampler="ddpm", steps=50, **_EVERY), dict(n=2, sampler="ddim", steps=20, start_index=4, **_EVERY),
          dict(n=2, sampler="ddim", steps=20, eta=1.0, clip_denoised=True, seed=9, **_EVERY),
          dict(n=1, sampler="ddim", steps=50, **_EVERY),
          dict(n=2, sampler="dpmpp-2m", steps=12, seed=4, guidance=2.0, guidance_interval=(0, 500)),
          dict(n=2, sampler="dpmpp-2m-sde", steps=10, seed=5, classes=2, **_EVERY),
          dict(n=1, sampler="dpmpp-2m", steps=15, clip_denoised=True, seed=6, **_EVERY)]
# the samplers of issue 28 (skipped where the runtime does not know them)
NEW_CASES: dict[str, tuple[str, dict]] = {
    "dpmpp-3m-10": ("onnx", dict(sampler="dpmpp-3m", steps=10, guidance=1.5)),
    "unipc-10": ("onnx", dict(sampler="unipc", steps=10, guidance=1.5)),
    "ipndm-10": ("onnx", dict(sampler="ipndm", steps=10, guidance=1.5)),
    "fused-dpmpp-3m": ("onnx", dict(sampler="dpmpp-3m", steps=8, guidance=2.0, fused=True)),
    "fused-unipc": ("onnx", dict(sampler="unipc", steps=8, guidance=2.0, fused=True)),
    "fused-ipndm": ("onnx", dict(sampler="ipndm", steps=8, guidance=2.0, fused=True)),
    "pt2-device-unipc": ("pt2", dict(sampler="unipc", steps=6, guidance=1.5, fused=True)),
}


def digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def make_models(models: Path) -> None:
    models.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "ddpm-export"
    for fmt, name in (("torchscript", "model.pt"), ("pt2", "model.pt2")):
        subprocess.run([str(exe), str(CKPT), "--format", fmt, "--out", str(models / name), "--no-verify"], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_cases(models: Path, cases: dict, only: set[str] | None) -> dict[str, str]:
    """Print and return each case's hash (a case whose sampler the runtime does not know is skipped)."""
    import runtime

    paths = {"onnx": BUNDLED, "pt": models / "model.pt", "pt2": models / "model.pt2"}
    loaded: dict[str, object] = {}
    hashes = {}
    for name, (kind, settings) in cases.items():
        if only and name not in only:
            continue
        if kind not in loaded:
            loaded[kind] = runtime.load(paths[kind], "cpu", log=lambda m: None)
        # every case but "model-defaults" names its settings: a new recommendation of the bundled model changes none
        settings = {"n": 4, "seed": 3, "start_index": 5, "batch_size": 3, "model_defaults": name == "model-defaults",
                    **settings}
        try:
            images = loaded[kind].generate(**settings)
        except (TypeError, runtime.SettingsError) as e:
            print(f"{name:24s} skipped ({str(e).splitlines()[0]})")
            continue
        hashes[name] = digest(images)
        print(f"{name:24s} {hashes[name]}", flush=True)
    return hashes


def check_twins(hashes: dict[str, str], twins: dict[str, str]) -> None:
    """Each fused case equals its host twin; two other cases sharing a hash (their settings all differ) is reported."""
    for fused, host in twins.items():
        if fused in hashes and host in hashes:
            print(f"{'twin ' + fused:24s} {'equal' if hashes[fused] == hashes[host] else 'DIFFERENT'} to {host}")
    seen: dict[str, str] = {}
    for name, h in hashes.items():
        if h in seen and twins.get(seen[h]) != name:
            print(f"{'collision ' + name:24s} hashes as {seen[h]}: their settings differ, so a path ignores one")
        seen.setdefault(h, name)


def run_server(batching: bool) -> str:
    import runtime
    from serve.scheduler import Scheduler

    pipe = runtime.load(BUNDLED, "cpu", log=lambda m: None)
    sched = Scheduler(pipe, max_batch=5, batching=batching)
    jobs = [sched.submit(**r) for r in SERVER]
    sched.start()
    results = [job.result(timeout=600) for job in jobs]
    sched.stop()
    h = hashlib.sha256()
    for res in results:
        for r in res:
            h.update(json.dumps([r.index, r.seed, r.label]).encode())
            h.update(r.image.tobytes())
    return h.hexdigest()


def run_cli() -> str:
    """ddpm-generate into a folder twice (png and npz, a shard pair): the hash of every file but the timings."""
    exe = Path(sys.executable).parent / "ddpm-generate"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's code, also where another tree is installed
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        for shard in ("0/2", "1/2"):
            subprocess.run([str(exe), "-n", "6", "--out", str(out), "--sampler", "ddim", "--steps", "10",
                            "--guidance", "1.5", "--format", "both", "--grid", "--shard", shard, "--seed", "2",
                            "--provider", "cpu", "--no-model-defaults"], check=True, capture_output=True, env=env)
        for path in sorted(out.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                if path.suffix in (".json", ".jsonl"):
                    data = canonical(path.name, data)
                h.update(path.name.encode())
                h.update(data)
    return h.hexdigest()


def canonical(name: str, data: bytes) -> bytes:
    """JSON without what changes run to run (times, versions, absolute paths)."""
    volatile = {"created", "started", "finished", "seconds", "elapsed", "time", "path", "out", "package_version"}

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in sorted(obj.items()) if k not in volatile}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    lines = data.decode().splitlines() if name.endswith(".jsonl") else [data.decode()]
    return "\n".join(json.dumps(clean(json.loads(line)), sort_keys=True) for line in lines if line.strip()).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="folder with model.pt and model.pt2")
    parser.add_argument("--make-models", action="store_true", help="export them there first")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if args.make_models:
        make_models(args.models)
    only = set(args.only.split(",")) if args.only else None
    hashes = run_cases(args.models, CASES, only)
    hashes |= run_cases(args.models, NEW_CASES, only)
    hashes |= run_cases(args.models, {host: case for host, case in TWINS.values()}, only)
    check_twins(hashes, {fused: host for fused, (host, _) in TWINS.items()})
    if not only or "server" in only:
        print(f"{'server-batching':24s} {run_server(True)}", flush=True)
        print(f"{'server-alone':24s} {run_server(False)}", flush=True)
    if not only or "cli" in only:
        print(f"{'cli-run-folder':24s} {run_cli()}", flush=True)


if __name__ == "__main__":
    main()
