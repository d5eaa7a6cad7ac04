"""Run settings a model recommends (the contract's ``run_defaults``): parsing ``sampler=ddim,steps=50,guidance=1.5``,
and ``python -m ddpm_export.run_defaults MODEL.onnx SETTINGS`` to set them in an exported ONNX model.

Only the contract in ``metadata_props`` changes; the graph, and so every image made with explicit settings, stays
the same. The model is rewritten atomically.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import click
import onnx

from runtime.errors import ContractError, reason
from runtime.files import atomic_path
from runtime.metadata import CONTRACT_KEY, RunDefaults, SamplingContract


def parse_run_defaults(text: str | None) -> RunDefaults | None:
    """``"sampler=ddim,steps=50,guidance=1.5"`` → ``RunDefaults``; ``""``/``"none"`` → None. ValueError if malformed.

    Keys: the run settings (``runtime.sampling.settings.RunSettings``); the interval is ``guidance_interval=LO:HI``.
    """
    return RunDefaults.parse(text)


def set_contract(path: str | Path, change: Callable[[SamplingContract], SamplingContract]) -> SamplingContract:
    """Rewrite the contract of the ONNX model at ``path`` as ``change(contract)`` (atomically); returns the new one."""
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    if CONTRACT_KEY not in props:
        raise ContractError(f"{path} carries no sampling contract; export it with ddpm-export")
    contract = change(SamplingContract.from_json(props[CONTRACT_KEY]))
    props[CONTRACT_KEY] = contract.to_json()
    onnx.helper.set_model_props(model, props)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return contract


def set_run_defaults(path: str | Path, run_defaults: RunDefaults | None) -> SamplingContract:
    """Rewrite the contract of the ONNX model at ``path`` with ``run_defaults``; returns the new contract.

    Raises ``ContractError`` when the settings do not suit the model (e.g. guidance on an unconditional one).
    """
    return set_contract(path, lambda c: dataclasses.replace(c, run_defaults=run_defaults))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("settings")
def main(model: str, settings: str) -> None:
    """Set the run settings MODEL (.onnx) recommends, e.g. SETTINGS = sampler=dpmpp-2m,steps=15,guidance=1.5
    (keys: the run settings, as ddpm-generate's options with _ for -: sampler, steps, eta, guidance,
    guidance_interval=LO:HI, clip_denoised, variance; 'none' removes them). ddpm-generate uses them where options
    are absent."""
    try:
        contract = set_run_defaults(model, parse_run_defaults(settings))
    except (ValueError, OSError) as e:
        raise click.ClickException(reason(e)) from None
    click.echo(f"{model}: run_defaults = {contract.run_defaults}")


if __name__ == "__main__":
    main()
