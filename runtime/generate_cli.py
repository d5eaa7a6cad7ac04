"""``ddpm-generate``: a thin click command over ``runtime.load`` and ``runtime.generation.run.generate_to_dir``."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import click

from runtime.backend_options import backend_options
from runtime.backends.registry import takes_option
from runtime.bundled import resolve
from runtime.errors import GenerationError, ModelError, OutputError
from runtime.generation.run import RunOptions, generate_to_dir
from runtime.pipeline import load
from runtime.sampling.settings import SETTINGS, RunSettings, help_text

FORMATS = {"png": ("png",), "npz": ("npz",), "both": ("png", "npz")}


def _shard(ctx, param, value: str | None) -> tuple[int, int]:
    if value is None:
        return (0, 1)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise click.BadParameter(f"expected I/N with 0 <= I < N (e.g. 0/4), got {value!r}")
    return int(m.group(1)), int(m.group(2))


RAY_OPTIONS = ("workers", "cpus_per_worker", "gpus_per_worker", "retries")


def _ray_address(ctx, param, value: str | None) -> str | None:
    from runtime.ray.cluster import check_address

    try:
        return None if value is None else check_address(value)
    except ValueError as e:
        raise click.BadParameter(str(e).removeprefix("--ray takes "), param_hint="--ray") from None


def _setting_option(f):
    """A click option for one ``RunSettings`` field, from its type and help (default None: not given)."""
    kind = typing.get_args(typing.get_type_hints(RunSettings)[f.name])[0]  # X of "X | None"
    name = "--" + f.name.replace("_", "-")
    common = dict(default=None, show_default=False, help=help_text(f.name))
    if typing.get_origin(kind) is typing.Literal:
        return click.option(name, type=click.Choice(typing.get_args(kind)), **common)
    if kind is bool:
        return click.option(f"{name}/--no-{name[2:]}", **common)
    if kind in (int, float):
        return click.option(name, type=kind, **common)

    def parse(ctx, param, value):
        try:
            return None if value is None else f.metadata["parse"](value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return click.option(name, callback=parse, metavar=f.metadata["metavar"], **common)


def settings_options(command):
    """Every run setting as an option of ``command``, in ``RunSettings`` order."""
    for f in reversed(SETTINGS):
        command = _setting_option(f)(command)
    return command


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", required=False, default=None)
@click.option("-n", "n", type=int, required=True, help="Number of images in the whole run (all shards together).")
@click.option("--out", type=click.Path(), required=True, help="Output folder: DIR/000000.png ..., manifest, run.json.")
@click.option("--batch-size", type=int, default=64, help="Images per predictor call (does not change the images).")
@click.option("--seed", type=click.IntRange(min=0), default=0,
              help="Image k depends only on (seed, k) and the settings.")
@click.option("--class", "cls", default=None,
              help="Class index or name (case-insensitive) from the model's contract. "
                   "Default: classes cycle over the images.")
@settings_options
@click.option("--model-defaults/--no-model-defaults", default=True,
              help="Take the run settings the model recommends (its contract's run_defaults) "
                   "where they are not given; --no-model-defaults uses the runtime's "
                   "(the paper's DDPM, all T steps, w = 1).")
@backend_options("Recorded in run.json and the manifest where it is not fp32.")
@click.option("--shard", callback=_shard, default=None,
              help="I/N: make only shard I of N (contiguous index blocks). "
                   "Shards may share one --out at the same time.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="png",
              help="png: one file per image; npz: DIR/samples.npz (uint8 NxHxWxC, arr_0); both.")
@click.option("--grid", is_flag=True, help="Also write DIR/grid.png (the first 100 images) when the run is complete.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run with other settings in --out.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of the backend (onnxruntime, OpenVINO; default: all cores).")
@click.option("--cpu-arena/--no-cpu-arena", default=True, help="onnxruntime's CPU memory arena (faster; holds memory).")
@click.option("--cudnn-algo-search", type=click.Choice(["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]), default=None,
              help="CUDA provider: how cuDNN picks convolution algorithms (default: onnxruntime's, EXHAUSTIVE).")
@click.option("--fused/--no-fused", default=None,
              help="Keep the sampler loop on the backend's device: each step one fused ONNX graph (update inside "
                   "onnxruntime), or the torch loop for .pt/.pt2 models; OpenVINO's device is the host, so it runs "
                   "the host loop (the step outside the predictor is under 1 % there). Default: on GPUs.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              callback=_ray_address,
              help="Run the shards as Ray tasks (the cluster extra): ADDRESS is auto (a running cluster), local (a new "
                   "local one), HOST:PORT or ray://HOST:PORT; --ray alone joins a running cluster, else starts a "
                   "local one. --out and MODEL must be at the same path on every node.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --ray: tasks (shards) to split the run into. Default: as many as the cluster holds.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0,
              help="With --ray: CPUs each worker asks Ray for; also its onnxruntime threads unless --threads.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0,
              help="With --ray: GPUs each worker asks Ray for (fractions share one).")
@click.option("--retries", type=click.IntRange(min=0), default=3,
              help="With --ray: times a task is run again after its worker died; it resumes its shard.")
def main(model, n, out, batch_size, seed, cls, model_defaults, provider, dtype, shard, fmt, grid, overwrite, threads,
         cpu_arena, cudnn_algo_search, fused, ray_address, workers, cpus_per_worker, gpus_per_worker, retries,
         **settings) -> None:
    """Generate N images from an exported MODEL (.onnx; TorchScript .pt or AOTInductor .pt2, which need torch) into
    --out.

    MODEL may also name a model bundled with the package (fashion-mnist); without MODEL the default bundled
    model is used.

    Rerunning the same command after an interruption makes only the missing images; the result equals an
    uninterrupted run. Progress goes to stderr; a one-line summary to stdout at the end. With --ray the shards
    run as Ray tasks on a cluster and the folder ends the same as a one-process run's.
    """
    if n < 1:
        raise click.BadParameter(f"must be positive, got {n}", param_hint="-n")
    if batch_size < 1:
        raise click.BadParameter(f"must be positive, got {batch_size}", param_hint="--batch-size")
    ctx = click.get_current_context()
    if ray_address is None:
        given = [f"--{name.replace('_', '-')}" for name in RAY_OPTIONS
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} applies to --ray runs only")
    try:
        gpu_options = {"cudnn_conv_algo_search": cudnn_algo_search} if cudnn_algo_search else None
        if gpu_options and not takes_option(provider, "cudnn_conv_algo_search"):
            raise click.UsageError("--cudnn-algo-search applies to the CUDA provider (--provider cuda or auto)")
        path, bundled = resolve(model)
        if bundled:
            click.echo(f"using the bundled model {bundled} ({path})", err=True)
        options = RunOptions(n=n, out=out, batch_size=batch_size, seed=seed, settings=RunSettings(**settings),
                             classes=cls, model_defaults=model_defaults, shard=shard, formats=FORMATS[fmt], grid=grid,
                             overwrite=overwrite, fused=fused)
        load_options = dict(provider=provider, dtype=dtype, threads=threads, cpu_arena=cpu_arena,
                            provider_options=gpu_options)
        if ray_address is None:
            g = load(path, **load_options)
            result, ran_on = generate_to_dir(g, options), g.runs_on
        else:
            from runtime.ray.cluster import Worker
            from runtime.ray.shards import RayRun, generate_on_ray

            options.out = Path(out).resolve()  # the workers' working folders are not this one
            run = RayRun(ray_address, workers, Worker(cpus_per_worker, gpus_per_worker), retries)
            result, ran_on = generate_on_ray(path.resolve(), options, run, load_options)
    except (ModelError, GenerationError, OutputError) as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; rerun the same command to make the remaining images") from None
    click.echo(result.summary(ran_on, options))
    for path in result.finalized:
        click.echo(f"wrote {path}", err=True)


if __name__ == "__main__":
    main()
