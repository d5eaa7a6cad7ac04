"""``ddpm-tune``: a thin click command over ``runtime.tuning.gits``, writing a copy of the model with the tuned
timesteps in its contract."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

from runtime.errors import ContractError, GenerationError, ModelError, reason


def _counts(ctx, param, value: str) -> list[int]:
    try:
        counts = sorted({int(v) for v in value.split(",")})
    except ValueError:
        raise click.BadParameter(f"expected step counts K1,K2,..., got {value!r}") from None
    if not counts or counts[0] < 2:
        raise click.BadParameter(f"step counts must be at least 2 (a tuned schedule runs from T - 1 to 0), got "
                                 f"{value!r}")
    return counts


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model")
@click.option("--steps", "counts", required=True, callback=_counts, metavar="K1,K2,...",
              help="The step counts to tune timesteps for, e.g. 5,6,8,10.")
@click.option("--sampler", default=None, help="The sampler the tuned model recommends (default: the model's "
                                               "recommendation). The timesteps are tuned for every sampler alike.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The tuned model file (default: MODEL's name with .tuned.onnx, in the current folder for a "
                   "bundled model).")
@click.option("--images", default=128, type=click.IntRange(min=2), help="Images of the fine reference trajectory.")
@click.option("--reference-steps", default=100, type=click.IntRange(min=10),
              help="Steps of the fine reference trajectory (DPM-Solver++(2M), linspace); the tuned timesteps are "
                   "chosen among its timesteps.")
@click.option("--seed", default=0, type=click.IntRange(min=0), help="Seed of the reference noise.")
@click.option("--provider", default="cpu", help="onnxruntime provider of the reference run.")
def main(model: str, counts: list[int], sampler: str | None, out: str | None, images: int, reference_steps: int,
         seed: int, provider: str) -> None:
    """Tune the timesteps of few-step runs of MODEL (a .onnx file or a bundled model's name) to the model itself:
    one fine reference trajectory of the model (its recommended guidance), then for each K the K of its timesteps
    whose coarse steps stay closest to it (GITS: Chen et al. 2024, dynamic programming). Writes a copy of the model
    whose contract recommends those timesteps for those K; `ddpm-generate TUNED.onnx --steps K` then uses them."""
    import onnx
    from tqdm import tqdm

    import runtime
    from runtime.backends.registry import model_format
    from runtime.bundled import resolve
    from runtime.files import atomic_path, sha256_file
    from runtime.metadata import CONTRACT_KEY
    from runtime.sampling.settings import SAMPLERS
    from runtime.tuning.gits import reference, tune

    try:
        path, bundled = resolve(model)
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        if model_format(path) != "onnx":
            raise ModelError(f"{path} is not an ONNX model; ddpm-tune writes ONNX models (ddpm-export --format onnx)")
        if sampler is not None and sampler not in SAMPLERS:
            raise GenerationError(f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")
        pipeline = runtime.load(path, provider, log=lambda m: click.echo(m, err=True))
        T = pipeline.contract.schedule.timesteps
        recommended_steps = pipeline.plan().steps  # the model's own recommendation works on the tuned file too
        if recommended_steps < min(reference_steps, T) and recommended_steps not in counts:
            counts = sorted([*counts, recommended_steps])
            click.echo(f"also tuning {recommended_steps} steps, the model's recommendation", err=True)
        if counts[-1] >= reference_steps:
            raise GenerationError(f"step counts must be below --reference-steps ({reference_steps}), got {counts[-1]}")
        target = Path(out) if out else (Path.cwd() if bundled else path.parent) / f"{path.stem}.tuned.onnx"
        started = time.monotonic()
        with tqdm(total=reference_steps, desc="reference trajectory", unit="step", file=sys.stderr) as bar:
            ref = reference(pipeline, steps=min(reference_steps, T), images=images, seed=seed,
                            progress=bar.update)
        tuned = tune(ref, counts)
        for K, (timesteps, cost) in tuned.items():
            click.echo(f"K = {K}: {','.join(map(str, timesteps))} (cost {cost:.4g})", err=True)
        contract = pipeline.contract
        recommended = contract.run_defaults
        if sampler is not None:
            recommended = dataclasses.replace(recommended or runtime.RunSettings(), sampler=sampler, steps=None)
        contract = dataclasses.replace(
            contract, run_defaults=recommended,
            tuned_timesteps={str(K): timesteps for K, (timesteps, _) in tuned.items()},
            tuning={"method": "GITS (Chen et al. 2024): dynamic programming over a fine reference trajectory",
                    "source_sha256": sha256_file(path), "reference_sampler": "dpmpp-2m",
                    "reference_steps": int(min(reference_steps, T)), "images": images, "seed": seed,
                    "guidance": ref_guidance(pipeline), "costs": {str(K): float(c) for K, (_, c) in tuned.items()},
                    "seconds": round(time.monotonic() - started, 1)})
        graph = onnx.load(str(path))
        props = {p.key: p.value for p in graph.metadata_props}
        props[CONTRACT_KEY] = contract.to_json()
        onnx.helper.set_model_props(graph, props)
        with atomic_path(target) as tmp:
            onnx.save_model(graph, str(tmp))
    except (ModelError, ContractError, GenerationError, OSError) as e:
        raise click.ClickException(reason(e)) from None
    click.echo(f"wrote {target}: tuned timesteps for {', '.join(map(str, counts))} steps "
               f"({time.monotonic() - started:.0f} s)")


def ref_guidance(pipeline) -> dict:
    """The guidance the reference ran with (the model's recommendation)."""
    plan = pipeline.plan(sampler="dpmpp-2m", steps=10, spacing="linspace")
    return {"guidance": plan.guidance, "guidance_interval": None if plan.guidance_interval is None
            else list(plan.guidance_interval)}


if __name__ == "__main__":
    main()
