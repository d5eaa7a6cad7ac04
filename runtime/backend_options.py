"""The command-line options that choose what runs a model, shared by ``ddpm-generate`` and ``ddpm-serve``:
``--provider`` (the registry's choices) and ``--dtype`` (the precisions)."""

from __future__ import annotations

import click

from runtime.backends.precision import PRECISIONS
from runtime.backends.registry import CHOICES


def backend_options(recorded: str):
    """``--provider`` and ``--dtype`` for a command; ``recorded`` says where the command records the precision."""

    def add(command):
        command = click.option(
            "--dtype", type=click.Choice(PRECISIONS), default=None,
            help="The precision to compute in. Default: the backend's (openvino: bf16 where the CPU has it, else "
                 f"fp32; the others: what the model file was exported in). {recorded}")(command)
        return click.option(
            "--provider", type=click.Choice(CHOICES), default="auto",
            help="What runs the model: onnxruntime's cpu, cuda or tensorrt, or openvino (the openvino extra; CPU, "
                 "bf16 where the CPU has it). auto takes the best onnxruntime provider that starts here (the "
                 "device for .pt/.pt2 models) and says which ran; it never picks openvino.")(command)

    return add
