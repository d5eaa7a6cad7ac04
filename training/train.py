"""``train(options)``: one Lightning training run (new or resumed) from run settings; what ``ddpm-train`` calls.

Model settings are a ``ModelConfig`` (``TrainOptions.model``) whose data-dependent fields (image size, channels,
classes, data set name) are filled from the data; it becomes the ``DiffusionModel``'s hyperparameters and so
lives in every checkpoint. Paths, devices, workers and logging are run settings only. Errors a user can fix
raise ``TrainError`` (one line).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from runtime.errors import reason
from training.config import GRID_SAMPLER, ModelConfig
from training.errors import DatasetError, RankLost, TrainError, TrainInterrupted

# what a gloo collective raises when the rank at the other end has gone
PEER_GONE = re.compile(r"Connection (reset|closed) by peer|Broken pipe")


@dataclass
class TrainOptions:
    """Run settings of ``ddpm-train`` (see its --help for each), and the model to train.

    ``model``'s in_size, img_depth, num_classes, class_names and dataset are taken from the data (and the
    whole model from the checkpoint when resuming); ``num_classes``/``conditional`` choose the data's classes.
    """

    dataset: str
    data_root: str = "data"
    download: bool = False
    image_size: int = 32
    channels: int | None = None
    batch_size: int = 128
    max_steps: int | None = None
    max_epochs: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    num_classes: int | None = None
    conditional: bool = False
    precision: str = "32"
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    num_workers: int = 0
    threads: int | None = None
    seed: int = 0
    out_dir: str = "runs/ddpm"
    resume: str | None = None
    checkpoint_every: int = 500
    sample_every: int = 0
    sample_sampler: str = GRID_SAMPLER
    sample_steps: int | None = None
    guidance: float = 1.0


def _devices(value: str) -> str | int | list[int]:
    value = str(value).strip()
    if value == "auto":
        return value
    try:
        ids = [int(v) for v in value.split(",") if v]
    except ValueError:
        raise TrainError(f"--devices must be 'auto', a count or a list of ids, got {value!r}") from None
    return ids[0] if len(ids) == 1 and "," not in value else ids


def _build_model(o: TrainOptions, data):
    from training.model import DiffusionModel

    if o.resume:
        cfg = _checkpoint_config(o.resume)
        if cfg.image_size != data.size or cfg.img_depth != data.depth:
            raise TrainError(f"{o.resume} is a {cfg.img_depth}-channel {cfg.image_size}px model "
                             f"but the data is {data.depth}-channel {data.size}px")
        if o.model.run_defaults is not None:  # a recommendation, not the architecture: given ones replace
            try:
                cfg = replace(cfg, run_defaults={**(cfg.run_defaults or {}), **o.model.run_defaults})
            except ValueError as e:
                raise TrainError(str(e)) from None
    else:
        cfg = _config_for_data(o, data)
    if problem := cfg.run_defaults_problem():
        raise TrainError(problem)
    try:
        return DiffusionModel.from_config(cfg)
    except ValueError as e:
        raise TrainError(str(e)) from None


def _config_for_data(o: TrainOptions, data) -> ModelConfig:
    """``o.model`` with the data's image size, channels and (for a conditional run) classes."""
    if o.conditional and o.num_classes not in (None, data.num_classes):
        raise TrainError(f"--conditional uses the dataset's {data.num_classes} classes; "
                         f"drop --num-classes {o.num_classes}")
    num_classes = data.num_classes if o.conditional else (o.num_classes or 0)
    if o.conditional and num_classes == 0:
        raise TrainError(f"--conditional: the {data.name} dataset at {o.data_root} has no classes")
    class_names = data.classes if num_classes and num_classes == data.num_classes else None
    try:
        return replace(o.model, in_size=data.size * data.size, img_depth=data.depth, num_classes=num_classes,
                       class_names=class_names, dataset=data.name)
    except ValueError as e:
        raise TrainError(str(e)) from None


def _checkpoint_config(path: str) -> ModelConfig:
    """The model of a checkpoint to resume, read as data only (a file carrying pickled code is refused)."""
    from training.safe_load import explain_load_error, load_data

    try:
        ckpt = load_data(path)
    except Exception as e:  # noqa: BLE001 - explain_load_error classifies it
        raise TrainError(explain_load_error(Path(path), e)) from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict):
        raise TrainError(f"{path} is not a ddpm-train checkpoint (no hyper_parameters)")
    try:
        return ModelConfig.from_hparams(hparams)
    except (ValueError, TypeError) as e:
        raise TrainError(f"{path} has unusable hyperparameters: {reason(e)}") from None


def train(o: TrainOptions) -> Path:
    """Run (or resume) training; returns the path of the final ``last.ckpt``."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.utilities.exceptions import SIGTERMException
    from torch.utils.data import DataLoader

    from training.callbacks import SampleGrid
    from training.checkpoint_io import AtomicCheckpointIO
    from training.console import main_process, quiet_console
    from training.dataset import Diffset
    from training.interrupt import StopOnSignal
    from training.ranks import SeedPerRank

    if o.channels not in (None, 1, 3):
        raise TrainError(f"--channels must be 1 or 3, got {o.channels}")
    if o.precision == "16-mixed" and not torch.cuda.is_available():
        raise TrainError("--precision 16-mixed needs a CUDA GPU; use 32 or bf16-mixed on the CPU")
    if o.threads:
        torch.set_num_threads(o.threads)
    pl.seed_everything(o.seed, verbose=False)
    try:
        data = Diffset(True, o.dataset, root=o.data_root, image_size=o.image_size, download=o.download,
                       channels=o.channels)
    except DatasetError as e:
        raise TrainError(str(e)) from None
    model = _build_model(o, data)

    out = Path(o.out_dir)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    stop = StopOnSignal(last)
    loader = DataLoader(data, batch_size=o.batch_size, shuffle=True, drop_last=len(data) >= o.batch_size,
                        num_workers=o.num_workers, persistent_workers=o.num_workers > 0)
    with quiet_console():
        trainer = pl.Trainer(
            max_steps=o.max_steps or -1,
            max_epochs=o.max_epochs if o.max_epochs is not None else (None if o.max_steps else 1),
            precision=o.precision, accelerator=o.accelerator, devices=_devices(o.devices),
            strategy=o.strategy, num_nodes=o.num_nodes,
            logger=CSVLogger(out, name="logs"),
            callbacks=[
                ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                                every_n_train_steps=o.checkpoint_every, save_top_k=-1, save_last=True),
                SampleGrid(out / "samples", every_n_steps=o.sample_every, sampler=o.sample_sampler,
                           steps=o.sample_steps, guidance=o.guidance, seed=o.seed, stop=stop),
                stop,
                SeedPerRank(o.seed),
            ],
            plugins=[AtomicCheckpointIO()],
            log_every_n_steps=min(50, max(1, len(loader))),
            enable_model_summary=False,
        )
        if o.resume and main_process():
            print(f"resuming from {o.resume}", file=sys.stderr)
        stop.install()
        try:
            trainer.fit(model, loader, ckpt_path=o.resume)
        except SIGTERMException:  # Lightning's own SIGTERM flag, set if a SIGTERM came before on_train_start
            if stop.signum is None:
                raise
        except RuntimeError as e:  # a collective whose peer is gone: it ended at once, so does this rank
            if trainer.world_size < 2 or not PEER_GONE.search(str(e)):
                raise
            newest = (f"; the newest checkpoint is {last}: to go on, run the same command with --resume {last}"
                      if last.exists() else "")
            raise RankLost(f"another rank of this DDP run ended at once (a second signal, or a crash), so this one "
                           f"stopped at step {trainer.global_step} without a checkpoint of it{newest}") from None
        finally:
            stop.restore()
    if stop.saved_step is None:
        trainer.save_checkpoint(last, weights_only=False)  # the newest full state
    if stop.signum is not None:
        raise TrainInterrupted(f"stopped by {stop.signal_name} at step {stop.saved_step or trainer.global_step}; "
                               f"checkpoint: {last}; to go on, run the same command with --resume {last}")
    if main_process():
        print(f"trained to step {trainer.global_step}; last checkpoint: {last}", file=sys.stderr)
    return last
