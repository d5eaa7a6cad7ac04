"""The ``ddpm-export`` entry point: one line naming the ``train`` extra where torch's side is not installed, instead
of an import traceback; otherwise ``ddpm_export.cli.main``."""

from __future__ import annotations

import sys

EXTRA = "train"  # pyproject's optional dependency that brings torch, Lightning and the ONNX exporter


def main() -> None:
    try:
        from ddpm_export.cli import main as cli
    except ImportError as e:
        missing = (e.name or "").split(".")[0] or "a module"
        print(f"Error: ddpm-export needs the {EXTRA} extra ({missing} is not installed here): "
              f"pip install 'ddpm-toolkit[{EXTRA}]'", file=sys.stderr)
        sys.exit(1)
    cli(prog_name="ddpm-export")
