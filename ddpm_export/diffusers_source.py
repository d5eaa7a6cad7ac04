"""The diffusers source: a pixel-space DDPM as Hugging Face diffusers saves it, read into a ``ModelSource``.

A folder is either a pipeline (``model_index.json`` naming ``unet`` → ``unet/`` and ``scheduler`` →
``scheduler/scheduler_config.json``) or a bare ``UNet2DModel`` (``config.json`` and
``diffusion_pytorch_model.safetensors`` or ``.bin``, with ``--scheduler-config FILE`` or a ``scheduler_config.json``
beside it). google/ddpm-cifar10-32 also keeps pre-0.1 files at its root (``config.json`` of class ``UNetModel``,
``scheduler_config.json`` of ``GaussianDDPMScheduler``): ``model_index.json`` is followed, and a folder that holds
only those legacy files is refused with that said.

The scheduler config (``DDPMScheduler`` or ``DDIMScheduler``; keys it omits take that class's defaults) becomes the
contract: ``beta_schedule`` (linear, scaled_linear, squaredcos_cap_v2 = our cosine, sigmoid) or ``trained_betas``
(explicit), ``num_train_timesteps``, ``prediction_type``, ``variance_type`` (fixed_small = β̃, fixed_large = β), and
as the model's recommended run settings ``clip_sample``/``clip_sample_range`` and ``timestep_spacing``/
``steps_offset`` (a DDIM config also recommends DDIM's 50 steps, DDIMPipeline's default). What the runtime cannot
reproduce is refused, never approximated: dynamic thresholding, zero-terminal-SNR rescaling, DDIM's
``set_alpha_to_one = false``, learned variances, non-square or non-1/3-channel images.

Weights load with ``torch.load(weights_only=True)`` (diffusers' own loader, after our check of a ``.bin``: one that
carries pickled code is refused as our checkpoints are) and must match the config exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path

import diffusers
import torch

from ddpm_export.errors import SourceError
from ddpm_export.source import ModelSource
from runtime.errors import ContractError, reason
from runtime.metadata import PREDICTION_TYPES, Provenance, RunDefaults, SamplingContract, ScheduleSpec
from runtime.sampling.schedule import SPACINGS, default_params

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
VARIANCE_TYPES = {"fixed_small": "beta_tilde", "fixed_large": "beta"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LEGACY = {"UNetModel", "GaussianDDPMScheduler"}  # diffusers < 0.1 class names
DDIM_PIPELINE_STEPS = 50  # DDIMPipeline's default num_inference_steps


class DiffusersUNet(torch.nn.Module):
    """A ``UNet2DModel`` as our network: ``forward(x, t[, y])`` → its output tensor (per-row timesteps)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=y, return_dict=False)[0]


def diffusers_source(folder: str | Path, *, scheduler_config: str | Path | None = None,
                     null_class: int | None = None) -> ModelSource:
    """The model in a diffusers ``folder`` (see the module docstring); ``SourceError`` names the file and the
    problem."""
    folder = Path(folder)
    unet_dir, scheduler_file = locate(folder, scheduler_config)
    unet_config = read_config(unet_dir / "config.json", ("UNet2DModel",))
    scheduler = read_config(scheduler_file, SCHEDULERS)
    contract = diffusers_contract(unet_config, scheduler, null_class=null_class, where=unet_dir / "config.json",
                                  scheduler_file=scheduler_file)
    net = DiffusersUNet(load_unet(unet_dir)).eval()
    kind = f"diffusers UNet2DModel + {scheduler['_class_name']}"
    contract = _with_provenance(contract, f"{kind} (diffusers {diffusers.__version__})")
    c = contract
    classes = f"{c.num_classes} classes, null class {c.null_class}" if c.conditional else "unconditional"
    return ModelSource(
        net, contract, folder.resolve(),
        f"{folder}: {kind}, {c.channels}x{c.image_size}x{c.image_size}, {classes}, predicts {c.prediction}, "
        f"{c.schedule.name} schedule, T = {c.schedule.timesteps}",
        {"source": kind, "folder": str(folder), "unet": str(unet_dir), "scheduler_config": str(scheduler_file),
         "diffusers_version": diffusers.__version__})


def locate(folder: Path, scheduler_config: str | Path | None) -> tuple[Path, Path]:
    """(the UNet2DModel folder, the scheduler config file) of ``folder``."""
    index = folder / "model_index.json"
    if index.is_file():
        entries = read_json(index)
        unet, sched = entries.get("unet"), entries.get("scheduler")
        if not isinstance(unet, list) or len(unet) != 2:
            raise SourceError(f"{index}: names no unet (a pixel-space DDPM pipeline has a unet and a scheduler)")
        if any(k in entries for k in ("vae", "vqvae", "text_encoder")):
            raise SourceError(f"{index}: a latent or text-conditioned pipeline ({entries.get('_class_name')}); "
                              "only pixel-space DDPM pipelines (a UNet2DModel on the images) are supported")
        if unet[1] != "UNet2DModel":
            raise SourceError(f"{index}: its unet is a {unet[1]}; only UNet2DModel (pixel space, unconditional or "
                              "class-conditional) is supported")
        unet_dir = folder / "unet"
        if scheduler_config is None:
            if not isinstance(sched, list):
                raise SourceError(f"{index}: names no scheduler; pass --scheduler-config FILE")
            scheduler_config = folder / "scheduler" / "scheduler_config.json"
        if not (unet_dir / "config.json").is_file():
            raise SourceError(f"{folder}: model_index.json names a unet, but {unet_dir / 'config.json'} does not exist")
    elif (folder / "config.json").is_file():
        unet_dir = folder
        config = read_json(folder / "config.json")
        if config.get("_class_name") in LEGACY:
            raise SourceError(f"{folder} holds only the legacy diffusers files (config.json of class "
                              f"{config.get('_class_name')}, from diffusers < 0.1) and no model_index.json: use the "
                              "pipeline folder (model_index.json, unet/, scheduler/) or re-save it with a current "
                              "diffusers")
        if scheduler_config is None:
            scheduler_config = folder / "scheduler_config.json"
            if not scheduler_config.is_file():
                raise SourceError(f"{folder}: a bare UNet2DModel folder needs its scheduler: pass --scheduler-config "
                                  "FILE or put scheduler_config.json beside config.json")
    else:
        raise SourceError(f"{folder} is not a diffusers model folder: it has neither model_index.json (a pipeline) "
                          "nor config.json (a UNet2DModel)")
    scheduler_config = Path(scheduler_config)
    if not scheduler_config.is_file():
        raise SourceError(f"scheduler config {scheduler_config} does not exist")
    return unet_dir, scheduler_config


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not a readable JSON file ({reason(e)})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


def read_config(path: Path, classes: tuple[str, ...]) -> dict:
    """A diffusers config of one of ``classes``, with that class's defaults for the keys it omits."""
    data = read_json(path)
    name = data.get("_class_name")
    if name in LEGACY:
        raise SourceError(f"{path}: {name} is a legacy (diffusers < 0.1) class; use the folder's model_index.json, "
                          "unet/ and scheduler/")
    if name not in classes:
        raise SourceError(f"{path}: a {name or 'config without _class_name'}; expected {' or '.join(classes)}")
    cls = getattr(diffusers, name)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **data}


def diffusers_contract(unet: dict, scheduler: dict, *, null_class: int | None = None, where: Path,
                       scheduler_file: Path) -> SamplingContract:
    """The sampling contract of a ``UNet2DModel`` config and a DDPM/DDIM scheduler config (both with defaults)."""
    def refuse(file: Path, problem: str) -> SourceError:
        return SourceError(f"{file}: {problem}")

    size = unet["sample_size"]
    if size is None:
        raise refuse(where, "no sample_size: the image size the model was trained at is needed")
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise refuse(where, f"sample_size {size}: only square images are supported")
        size = size[0]
    channels = unet["in_channels"]
    if unet["out_channels"] != channels:
        learned = unet["out_channels"] == 2 * channels
        raise refuse(where, f"out_channels {unet['out_channels']} != in_channels {channels}"
                            + (" (a learned variance, which is not supported)" if learned else ""))
    if channels not in (1, 3):
        raise refuse(where, f"in_channels {channels}: images of 1 or 3 channels are supported")
    embeds = unet.get("num_class_embeds")
    if unet.get("class_embed_type") is not None:
        raise refuse(where, f"class_embed_type {unet['class_embed_type']!r}: only labels through num_class_embeds "
                            "are supported")
    num_classes = int(embeds or 0)
    if null_class is not None:
        if not num_classes:
            raise SourceError("--null-class: the model is unconditional (its config has no num_class_embeds)")
        if null_class != num_classes - 1:
            raise SourceError(f"--null-class {null_class}: the null label must be the last of the model's "
                              f"{num_classes} labels ({num_classes - 1}); the classes are the ones before it")
        num_classes -= 1
    s = scheduler
    for key, problem in (("thresholding", "dynamic thresholding"), ("rescale_betas_zero_snr", "zero-terminal-SNR "
                                                                    "rescaling (rescale_betas_zero_snr)")):
        if s.get(key):
            raise refuse(scheduler_file, f"{problem} is not supported")
    if s["_class_name"] == "DDIMScheduler" and not s.get("set_alpha_to_one", True):
        raise refuse(scheduler_file, "set_alpha_to_one = false (DDIM's last step to alphabar_0) is not supported")
    if s["prediction_type"] not in PREDICTION_TYPES:
        raise refuse(scheduler_file, f"unknown prediction_type {s['prediction_type']!r} (expected one of "
                                     f"{', '.join(PREDICTION_TYPES)})")
    variance = s.get("variance_type", "fixed_small")
    if variance not in VARIANCE_TYPES:
        raise refuse(scheduler_file, f"variance_type {variance!r} is not supported (expected "
                                     f"{' or '.join(VARIANCE_TYPES)})")
    spacing = s.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise refuse(scheduler_file, f"unknown timestep_spacing {spacing!r} (expected one of {', '.join(SPACINGS)})")
    T = s["num_train_timesteps"]
    if s.get("trained_betas") is not None:
        schedule = ScheduleSpec("explicit", T, {}, [float(b) for b in s["trained_betas"]])
    elif s["beta_schedule"] in SCHEDULES:
        name = SCHEDULES[s["beta_schedule"]]
        params = (default_params(name) if name == "cosine"
                  else {"beta_start": s["beta_start"], "beta_end": s["beta_end"]})
        schedule = ScheduleSpec(name, T, params)
    else:
        raise refuse(scheduler_file, f"unknown beta_schedule {s['beta_schedule']!r} (expected one of "
                                     f"{', '.join(SCHEDULES)}, or trained_betas)")
    offset = int(s.get("steps_offset") or 0)
    recommended = RunDefaults(
        sampler="ddim" if s["_class_name"] == "DDIMScheduler" else None,
        steps=min(DDIM_PIPELINE_STEPS, T) if s["_class_name"] == "DDIMScheduler" else None,
        clip_denoised=bool(s["clip_sample"]),
        clip_range=float(s["clip_sample_range"]) if s["clip_sample"] and s["clip_sample_range"] != 1 else None,
        spacing=spacing, steps_offset=offset if spacing == "leading" and offset else None)
    try:
        return SamplingContract(image_size=int(size), channels=channels, schedule=schedule,
                                prediction=s["prediction_type"],
                                variance=VARIANCE_TYPES[variance], num_classes=num_classes,
                                null_class=null_class, run_defaults=recommended)
    except ContractError as e:
        field = str(e)
        file = scheduler_file if any(k in field for k in ("schedule", "run_defaults")) else where
        raise refuse(file, f"cannot be used ({field}): the betas cannot be built or a setting is out of "
                           "range") from None


def load_unet(unet_dir: Path) -> torch.nn.Module:
    """The ``UNet2DModel`` in ``unet_dir``: weights read as data (``weights_only``) that match the config exactly."""
    present = [unet_dir / f for f in WEIGHT_FILES if (unet_dir / f).is_file()]
    if not present:
        raise SourceError(f"{unet_dir}: no weights ({' or '.join(WEIGHT_FILES)})")
    if present[0].suffix == ".bin":
        from training.safe_load import explain_load_error, load_data

        try:
            load_data(present[0])
        except Exception as e:  # noqa: BLE001 - explain_load_error classifies it
            raise SourceError(explain_load_error(present[0], e)) from None
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder: never the network
    try:
        unet, info = diffusers.UNet2DModel.from_pretrained(str(unet_dir), output_loading_info=True,
                                                           low_cpu_mem_usage=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; one line names the first problem
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "mismatch" in ln or "missing" in ln.lower()), lines[0] if lines else "")
        raise SourceError(f"{present[0]}: the weights do not fit {unet_dir / 'config.json'} ({type(e).__name__}: "
                          f"{detail[:300]})") from None
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(key):
            names = [k[0] if isinstance(k, tuple) else k for k in info[key]]
            raise SourceError(f"{present[0]}: the weights do not fit {unet_dir / 'config.json'} ({len(names)} "
                              f"{key.replace('_', ' ')}, e.g. {names[0]})")
    return unet.float().eval()


def _with_provenance(contract: SamplingContract, source: str) -> SamplingContract:
    import ddpm_export

    return dataclasses.replace(contract, provenance=Provenance(
        package="ddpm-toolkit", package_version=ddpm_export.__version__, torch_version=torch.__version__,
        source=source))
