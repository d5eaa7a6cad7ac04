"""``ddpm-eval``: a thin click command over ``runtime.evaluate.score.evaluate``."""

from __future__ import annotations

import json

import click

from runtime.errors import EvalError, IdxError
from runtime.evaluate.score import REFERENCES, evaluate, table


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("folder", type=click.Path())
@click.option("--reference", type=click.Choice(REFERENCES), default="fashion-mnist",
              help="The real data set the images are compared with (its test set).")
@click.option("--data-root", type=click.Path(file_okay=False), default="/usr/share/datasets/fashion-mnist",
              help="Where the reference IDX files are (Debian's dataset-fashion-mnist puts them here).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@click.option("--seed", type=int, default=0, help="Seed of the real-image and noise reference samples.")
@click.option("--allow-incomplete", is_flag=True,
              help="Score an unfinished run (fewer images than its run.json's n) instead of refusing it; the table "
                   "and the JSON say how many images are missing.")
def main(folder: str, reference: str, data_root: str, as_json: bool, seed: int, allow_incomplete: bool) -> None:
    """Score a ddpm-generate FOLDER: FCD, FD∞ (the FCD of infinitely many images, extrapolated from subsets, with its
    standard error) and KID (± its sd over subsets) on the classifier's features, the predicted-class histogram and,
    for conditional runs, how often the classifier agrees with the requested class (with its 95 % interval) —
    beside the floor (real train vs real test, mean ± sd over resampled subsets) and the ceiling (Gaussian noise) at
    the same sample count. Fewer than 5000 images get a warning: their numbers cannot tell settings apart. An
    unfinished run is refused (see --allow-incomplete)."""
    from pathlib import Path

    try:
        result = evaluate(Path(folder), Path(data_root), seed=seed, allow_incomplete=allow_incomplete)
    except (EvalError, IdxError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=2) if as_json else table(result))
    if result["warning"]:
        click.echo(f"warning: {result['warning']}", err=True)


if __name__ == "__main__":
    main()
