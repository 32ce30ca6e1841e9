"""``covshift check``: validate an experiment and print its resolved configuration."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from covshift.cli.app import MAX_THREADS, UserError, err_console, parse_sets
from covshift.experiments.config import MAX_SEED_COUNT
from covshift.experiments.config_files import load_config
from covshift.experiments.config_toml import config_to_toml


def check(
    preset: Annotated[
        str,
        typer.Argument(
            metavar="PRESET",
            help="A shipped preset (see `covshift presets`) or a path to a .toml file.",
        ),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field, as in covshift run (repeatable)."),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_SEED_COUNT, help="Seeds 0 .. N-1 instead of the preset's."),
    ] = None,
    size: Annotated[
        str | None, typer.Option(help="One of the preset's sizes (see covshift presets).")
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            min=1, max=MAX_THREADS, help="Torch threads for the trial steps (they are timed)."
        ),
    ] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the resolved configuration as JSON.")
    ] = False,
) -> None:
    """Check an experiment as `covshift run` would before it writes anything (the
    config, its grid, its data, every distinct network built, probed and trained for
    a few steps on a throwaway copy), then print the resolved configuration as TOML
    (a file `covshift run` accepts, with the same experiment id). Nothing is written:
    no store, no report.

    Example: covshift check my-sweep.toml --set optimizer.lr=0.5 > resolved.toml
    """
    from covshift.experiments.costs import estimate_seconds, format_seconds
    from covshift.experiments.grid import expand_grid, experiment_id
    from covshift.experiments.preflight import preflight

    overrides: dict[str, Any] = parse_sets(set_ or [])
    if seeds is not None:
        overrides["seeds"] = seeds
    config = load_config(preset, overrides, size=size)
    points = expand_grid(config)
    costs = preflight(config, points, threads)
    if as_json:
        print(json.dumps(config.model_dump(mode="json"), indent=2, allow_nan=False))
    else:
        text, lost = config_to_toml(config)
        if lost:
            raise UserError(
                f"{preset}: the resolved configuration has values TOML cannot write "
                f"({', '.join(lost)} = None); use --json for it"
            )
        print(text, end="")
    networks = len({(p.network, repr(sorted(p.axes.items()))) for p in points})
    err_console.print(
        f"ok: {experiment_id(config)}, {len(points)} points ({networks} network settings x "
        f"{len(config.seeds)} seeds), every distinct network built and trained for a few "
        f"steps; estimated {format_seconds(estimate_seconds(points, costs, 1))} on one "
        f"worker of {threads} thread{'s' * (threads != 1)}. Nothing was written.",
        highlight=False,
        soft_wrap=True,
    )
