"""The diffusers source: a DDPM as Hugging Face diffusers saves it, read into a ``ModelSource``.

A folder is either a pipeline (``model_index.json``) or a bare ``UNet2DModel`` (``config.json`` and
``diffusion_pytorch_model.safetensors`` or ``.bin``, with ``--scheduler-config FILE`` or a ``scheduler_config.json``
beside it). A pipeline has a denoiser, ``unet/`` (a ``UNet2DModel``) or ``transformer/`` (a ``DiTTransformer2DModel``),
and ``scheduler/scheduler_config.json``; a latent pipeline also an autoencoder whose decoder turns the final latent
into the image: ``vae/`` (an ``AutoencoderKL``: DiTPipeline, or a UNet2DModel on latents) or ``vqvae/`` (a ``VQModel``:
LDMPipeline). google/ddpm-cifar10-32 also keeps pre-0.1 files at its root (``config.json`` of class ``UNetModel``,
``scheduler_config.json`` of ``GaussianDDPMScheduler``): ``model_index.json`` is followed, and a folder that holds
only those legacy files is refused with that said. Text-conditioned pipelines are refused.

The scheduler config (``DDPMScheduler`` or ``DDIMScheduler``; keys it omits take that class's defaults) becomes the
contract: ``beta_schedule`` (linear, scaled_linear, squaredcos_cap_v2 = our cosine, sigmoid) or ``trained_betas``
(explicit), ``num_train_timesteps``, ``prediction_type``, ``variance_type`` (fixed_small = β̃, fixed_large = β), and
as the model's recommended run settings ``clip_sample``/``clip_sample_range`` and ``timestep_spacing``/
``steps_offset`` (a DDIM config also recommends DDIM's 50 steps, DDIMPipeline's default). What the runtime cannot
reproduce is refused, never approximated: dynamic thresholding, zero-terminal-SNR rescaling, DDIM's
``set_alpha_to_one = false``, a UNet2DModel's learned variance, non-square or non-1/3-channel images. A DiT's learned
variance (its output's second half) is carried as channels the samplers ignore: they use ε with fixed variances (a
``learned``/``learned_range`` variance_type reads as fixed_small, β̃).

Weights load with ``torch.load(weights_only=True)`` (diffusers' own loader, after our check of a ``.bin``: one that
carries pickled code is refused as our checkpoints are) and must match the config exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from ddpm_export.errors import SourceError
from ddpm_export.source import ModelSource
from runtime.errors import ContractError, reason
from runtime.metadata import PREDICTION_TYPES, Provenance, RunDefaults, SamplingContract, ScheduleSpec, latent_stages
from runtime.sampling.schedule import SPACINGS, default_params

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
DENOISERS = {"unet": "UNet2DModel", "transformer": "DiTTransformer2DModel"}  # a pipeline's denoiser: its key, class
AUTOENCODERS = {"vae": "AutoencoderKL", "vqvae": "VQModel"}  # a latent pipeline's autoencoder: its key, usual class
TEXT = ("text_encoder", "tokenizer")  # keys (and prefixes of keys) of a text-conditioned pipeline
LEARNED_VARIANCES = ("learned", "learned_range")
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


class DiffusersDiT(torch.nn.Module):
    """A ``DiTTransformer2DModel`` as our network: ``forward(x, t, y)`` → its output (ε, then its learned variance)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]


class DiffusersDecoder(torch.nn.Module):
    """An autoencoder's decoder as our decoder stage: ``forward(z)`` → the image in [-1, 1] (a ``VQModel``
    quantizes z first, as LDMPipeline's decode does)."""

    def __init__(self, autoencoder: torch.nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z, return_dict=False)[0]


NETWORKS = {"UNet2DModel": DiffusersUNet, "DiTTransformer2DModel": DiffusersDiT}


@dataclass(frozen=True)
class Layout:
    """Where a diffusers folder keeps its parts: the denoiser's folder and class, the autoencoder's folder (None: a
    pixel-space model) and the scheduler config."""

    denoiser: Path
    denoiser_class: str
    autoencoder: Path | None
    scheduler: Path


def diffusers_source(folder: str | Path, *, scheduler_config: str | Path | None = None,
                     null_class: int | None = None) -> ModelSource:
    """The model in a diffusers ``folder`` (see the module docstring); ``SourceError`` names the file and the
    problem."""
    folder = Path(folder)
    layout = locate(folder, scheduler_config)
    where = layout.denoiser / "config.json"
    facts = denoiser_facts(read_config(where, (layout.denoiser_class,)), where)
    scheduler = read_config(layout.scheduler, SCHEDULERS)
    decoder = stage = None
    if layout.autoencoder is not None:
        decoder, stage = load_decoder(layout.autoencoder, facts, where)
    contract = diffusers_contract(facts, scheduler, null_class=null_class, where=where,
                                  scheduler_file=layout.scheduler, decoder=stage)
    net = NETWORKS[layout.denoiser_class](load_weights(layout.denoiser, layout.denoiser_class)).eval()
    parts = [layout.denoiser_class] + ([] if stage is None else [stage["class"]]) + [scheduler["_class_name"]]
    kind = f"diffusers {' + '.join(parts)}"
    contract = _with_provenance(contract, f"{kind} (diffusers {diffusers.__version__})")
    c = contract
    classes = f"{c.num_classes} classes, null class {c.null_class}" if c.conditional else "unconditional"
    shape = f"{c.channels}x{c.image_size}x{c.image_size}"
    if stage is not None:
        shape = f"latent {'x'.join(map(str, c.latent_shape))} -> image {shape}"
    details = {"source": kind, "folder": str(folder), layout.denoiser.name: str(layout.denoiser),
               "scheduler_config": str(layout.scheduler), "diffusers_version": diffusers.__version__}
    if layout.autoencoder is not None:
        details[layout.autoencoder.name] = str(layout.autoencoder)
    return ModelSource(
        net, contract, folder.resolve(),
        f"{folder}: {kind}, {shape}, {classes}, predicts {c.prediction}, {c.schedule.name} schedule, "
        f"T = {c.schedule.timesteps}", details, decoder)


def _text_conditioned(index: Path, entries: dict) -> SourceError:
    return SourceError(f"{index}: a text-conditioned pipeline ({entries.get('_class_name')}); text-conditioned models "
                       "are not supported (unconditional and class-conditional DDPMs are: a UNet2DModel or a "
                       "DiTTransformer2DModel, latent ones with an AutoencoderKL or VQModel)")


def locate(folder: Path, scheduler_config: str | Path | None) -> Layout:
    """Where ``folder`` keeps its denoiser, autoencoder and scheduler config (see ``Layout``)."""
    index = folder / "model_index.json"
    autoencoder = None
    if index.is_file():
        entries = read_json(index)
        named = {k: v[1] for k, v in entries.items() if isinstance(v, list) and len(v) == 2 and v[1]}
        if any(k.startswith(TEXT) for k in named) or any("Condition" in v for v in named.values()):
            raise _text_conditioned(index, entries)
        key = next((k for k in DENOISERS if k in named), None)
        if key is None:
            raise SourceError(f"{index}: names no unet or transformer (a DDPM pipeline has a denoiser and a "
                              "scheduler)")
        if named[key] != DENOISERS[key]:
            raise SourceError(f"{index}: its {key} is a {named[key]}; only {DENOISERS[key]} is supported as its "
                              f"{key} ({' or '.join(DENOISERS.values())}, unconditional or class-conditional)")
        unet_dir, sched = folder / key, entries.get("scheduler")
        if scheduler_config is None:
            if not isinstance(sched, list):
                raise SourceError(f"{index}: names no scheduler; pass --scheduler-config FILE")
            scheduler_config = folder / "scheduler" / "scheduler_config.json"
        if not (unet_dir / "config.json").is_file():
            raise SourceError(f"{folder}: model_index.json names a {key}, but {unet_dir / 'config.json'} does not "
                              "exist")
        found = [k for k in AUTOENCODERS if k in named]
        if found:
            autoencoder = folder / found[0]
            if not (autoencoder / "config.json").is_file():
                raise SourceError(f"{folder}: model_index.json names a {found[0]} ({named[found[0]]}), the autoencoder "
                                  f"whose decoder makes the images, but {autoencoder / 'config.json'} does not exist")
        elif key == "transformer":
            raise SourceError(f"{index}: a {named[key]} pipeline without an autoencoder (vae): a DiT denoises latents, "
                              "and the vae's decoder makes the images")
        return Layout(unet_dir, DENOISERS[key], autoencoder, _scheduler_file(scheduler_config))
    if (folder / "config.json").is_file():
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
        return Layout(unet_dir, "UNet2DModel", None, _scheduler_file(scheduler_config))
    raise SourceError(f"{folder} is not a diffusers model folder: it has neither model_index.json (a pipeline) "
                      "nor config.json (a UNet2DModel)")


def _scheduler_file(scheduler_config: str | Path) -> Path:
    path = Path(scheduler_config)
    if not path.is_file():
        raise SourceError(f"scheduler config {path} does not exist")
    return path


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


def denoiser_facts(config: dict, where: Path) -> dict:
    """What the contract needs of a denoiser's config (a ``UNet2DModel``'s or a ``DiTTransformer2DModel``'s, with
    defaults): ``size``, ``channels``, ``out_channels``, ``labels`` (its class embeddings: 0 unconditional) and
    ``null_class`` (a DiT's: the label after its classes, which DiTPipeline passes for "no class"; None: given by
    ``--null-class``)."""
    def refuse(problem: str) -> SourceError:
        return SourceError(f"{where}: {problem}")

    size = config["sample_size"]
    if size is None:
        raise refuse("no sample_size: the size the model was trained at is needed")
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise refuse(f"sample_size {size}: only square images are supported")
        size = size[0]
    channels = config["in_channels"]
    out = config["out_channels"] or channels
    if config["_class_name"] == "DiTTransformer2DModel":
        if out not in (channels, 2 * channels):
            raise refuse(f"out_channels {out}: expected in_channels {channels} (ε) or twice that (ε and a learned "
                         "variance)")
        if not config["num_embeds_ada_norm"] or config["norm_type"] != "ada_norm_zero":
            raise refuse("a DiT without class labels (num_embeds_ada_norm, norm_type ada_norm_zero) is not supported")
        labels = int(config["num_embeds_ada_norm"])
        return {"size": int(size), "channels": channels, "out_channels": out, "labels": labels, "null_class": labels}
    if out != channels:
        learned = out == 2 * channels
        raise refuse(f"out_channels {out} != in_channels {channels}"
                     + (" (a learned variance, which is not supported)" if learned else ""))
    if config.get("class_embed_type") is not None:
        raise refuse(f"class_embed_type {config['class_embed_type']!r}: only labels through num_class_embeds are "
                     "supported")
    return {"size": int(size), "channels": channels, "out_channels": out,
            "labels": int(config.get("num_class_embeds") or 0), "null_class": None}


def load_decoder(folder: Path, facts: dict, denoiser_config: Path) -> tuple[torch.nn.Module, dict]:
    """The autoencoder in ``folder`` as a decoder stage, and what the contract needs of it: ``class``,
    ``scaling_factor``, ``shift``, ``channels`` and ``size`` (of the image it makes from the denoiser's latent, found
    by decoding one)."""
    config_file = folder / "config.json"
    name = read_json(config_file).get("_class_name")
    if name not in AUTOENCODERS.values():
        raise SourceError(f"{config_file}: a {name or 'config without _class_name'} autoencoder, which is not "
                          f"supported (supported: {', '.join(AUTOENCODERS.values())})")
    config = read_config(config_file, (name,))
    latent = config.get("vq_embed_dim") or config["latent_channels"] if name == "VQModel" else config["latent_channels"]
    if latent != facts["channels"]:
        raise SourceError(f"{config_file}: its decoder takes latents of {latent} channels, but the denoiser "
                          f"({denoiser_config}) works on {facts['channels']}")
    decoder = DiffusersDecoder(load_weights(folder, name)).eval()
    with torch.no_grad():
        image = decoder(torch.zeros(1, latent, facts["size"], facts["size"])).shape
    if image[1] not in (1, 3) or image[2] != image[3]:
        raise SourceError(f"{config_file}: its decoder makes images of shape {list(image[1:])}; square images of 1 or "
                          "3 channels are supported")
    return decoder, {"class": name, "scaling_factor": float(config["scaling_factor"]),
                     "shift": float(config.get("shift_factor") or 0.0), "channels": image[1], "size": image[2]}


def diffusers_contract(facts: dict, scheduler: dict, *, null_class: int | None = None, where: Path,
                       scheduler_file: Path, decoder: dict | None = None) -> SamplingContract:
    """The sampling contract of a denoiser (``denoiser_facts``), a DDPM/DDIM scheduler config (with defaults) and,
    for a latent model, its decoder (``load_decoder``'s facts)."""
    def refuse(file: Path, problem: str) -> SourceError:
        return SourceError(f"{file}: {problem}")

    size, channels = facts["size"], facts["channels"]
    if decoder is None and channels not in (1, 3):
        raise refuse(where, f"in_channels {channels}: images of 1 or 3 channels are supported")
    num_classes = facts["labels"]
    if facts["null_class"] is not None:
        if null_class is not None:
            raise SourceError(f"--null-class: this denoiser's null label is {facts['null_class']}, the label after "
                              "its classes (the one its pipeline passes for 'no class')")
        null_class = facts["null_class"]
    elif null_class is not None:
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
    if variance in LEARNED_VARIANCES and facts["out_channels"] == 2 * channels and decoder is not None:
        variance = "fixed_small"  # a DiT's learned variance: the samplers use ε with fixed variances
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
    stages, image = [], (channels, size)
    if decoder is not None:
        stages = latent_stages(channels, size, channels=decoder["channels"], image_size=decoder["size"],
                               num_classes=num_classes, out_channels=facts["out_channels"],
                               scaling_factor=decoder["scaling_factor"], shift=decoder["shift"])
        image = (decoder["channels"], decoder["size"])
    try:
        return SamplingContract(image_size=int(image[1]), channels=image[0], schedule=schedule,
                                prediction=s["prediction_type"],
                                variance=VARIANCE_TYPES[variance], num_classes=num_classes,
                                null_class=null_class, run_defaults=recommended, stages=stages)
    except ContractError as e:
        field = str(e)
        file = scheduler_file if any(k in field for k in ("schedule", "run_defaults")) else where
        raise refuse(file, f"cannot be used ({field}): the betas cannot be built or a setting is out of "
                           "range") from None


def load_weights(unet_dir: Path, name: str) -> torch.nn.Module:
    """The diffusers model of class ``name`` in ``unet_dir``: weights read as data (``weights_only``) that match the
    config exactly."""
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
        unet, info = getattr(diffusers, name).from_pretrained(str(unet_dir), output_loading_info=True,
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
