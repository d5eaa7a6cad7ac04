"""Hash the images of every sampling path, so a refactor can show that it changes none of them.

    python -m benchmarks.hash_paths --models DIR [--only NAME,...]

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

# name: (model, generate() settings); every case makes 4 images (DDPM at full T: 2) from seed 3, start index 5
CASES: dict[str, tuple[str, dict]] = {
    "ddpm-full": ("onnx", dict(n=2, sampler="ddpm")),
    "ddpm-respaced-50": ("onnx", dict(sampler="ddpm", steps=50)),
    "ddpm-respaced-beta": ("onnx", dict(sampler="ddpm", steps=50, variance="beta")),
    "ddim-eta0-20": ("onnx", dict(sampler="ddim", steps=20, eta=0.0)),
    "ddim-eta1-20": ("onnx", dict(sampler="ddim", steps=20, eta=1.0)),
    "ddpm-clipped-50": ("onnx", dict(sampler="ddpm", steps=50, clip_denoised=True)),
    "ddim-clipped-20": ("onnx", dict(sampler="ddim", steps=20, clip_denoised=True, eta=0.5)),
    "ddim-guided-20": ("onnx", dict(sampler="ddim", steps=20, guidance=1.5, classes=7)),
    "ddpm-guided-50": ("onnx", dict(sampler="ddpm", steps=50, guidance=2.0)),
    "model-defaults": ("onnx", dict()),
    "fused-ddim-guided": ("onnx", dict(sampler="ddim", steps=20, guidance=1.5, fused=True)),
    "fused-ddpm-clipped": ("onnx", dict(sampler="ddpm", steps=50, clip_denoised=True, fused=True)),
    "fused-ddim-eta1": ("onnx", dict(sampler="ddim", steps=20, eta=1.0, guidance=1.0, fused=True)),
    "torchscript-host": ("pt", dict(sampler="ddim", steps=20, guidance=1.5)),
    "torchscript-device": ("pt", dict(sampler="ddpm", steps=50, guidance=1.5, fused=True)),
    "pt2-host": ("pt2", dict(sampler="ddim", steps=20, guidance=1.5)),
    "pt2-device": ("pt2", dict(sampler="ddim", steps=20, eta=1.0, clip_denoised=True, fused=True)),
}
# the server: requests submitted together share the batch
# (the server takes the model's recommendations for what a request leaves out: these name guidance and its interval)
_EVERY = dict(guidance=1.5, guidance_interval=(0, 999))
SERVER = [dict(n=3, sampler="ddpm", steps=50, **_EVERY), dict(n=2, sampler="ddim", steps=20, start_index=4, **_EVERY),
          dict(n=2, sampler="ddim", steps=20, eta=1.0, clip_denoised=True, seed=9, **_EVERY),
          dict(n=1, sampler="ddim", steps=50, **_EVERY)]
# extra cases, once the samplers exist (skipped where the runtime does not know them)
NEW_CASES: dict[str, tuple[str, dict]] = {
    "dpmpp-2m-15": ("onnx", dict(sampler="dpmpp-2m", steps=15, guidance=1.5)),
    "dpmpp-2m-sde-20": ("onnx", dict(sampler="dpmpp-2m-sde", steps=20, guidance=1.5)),
    "fused-dpmpp-2m-15": ("onnx", dict(sampler="dpmpp-2m", steps=15, guidance=1.5, fused=True)),
    "interval-ddim-20": ("onnx", dict(sampler="ddim", steps=20, guidance=2.0, guidance_interval=(200, 700))),
}


for _name, (_kind, _settings) in CASES.items():  # what each model recommended when the cases were written: the
    if _name not in ("ddpm-full", "model-defaults"):  # bundled ONNX w = 1.5; the .pt/.pt2 exports nothing (w = 1)
        _settings.setdefault("guidance", 1.5 if _kind == "onnx" else 1.0)


def digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def make_models(models: Path) -> None:
    models.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "ddpm-export"
    for fmt, name in (("torchscript", "model.pt"), ("pt2", "model.pt2")):
        subprocess.run([str(exe), str(CKPT), "--format", fmt, "--out", str(models / name), "--no-verify"], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_cases(models: Path, cases: dict, only: set[str] | None) -> None:
    import runtime

    paths = {"onnx": BUNDLED, "pt": models / "model.pt", "pt2": models / "model.pt2"}
    loaded: dict[str, object] = {}
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
        print(f"{name:24s} {digest(images)}", flush=True)


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
    parser.add_argument("--new", action="store_true", help="also the cases of the new samplers")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if args.make_models:
        make_models(args.models)
    only = set(args.only.split(",")) if args.only else None
    run_cases(args.models, CASES, only)
    if args.new:
        run_cases(args.models, NEW_CASES, only)
    if not only or "server" in only:
        print(f"{'server-batching':24s} {run_server(True)}", flush=True)
        print(f"{'server-alone':24s} {run_server(False)}", flush=True)
    if not only or "cli" in only:
        print(f"{'cli-run-folder':24s} {run_cli()}", flush=True)


if __name__ == "__main__":
    main()
