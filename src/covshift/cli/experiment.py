"""``covshift run``: one experiment's grid, then its report and claims."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from covshift.cli.app import (
    AddressOption,
    BackendOption,
    DbOption,
    MembersOption,
    ThreadsOption,
    UserError,
    WorkersOption,
    check_folder,
    err_console,
    existing_store,
    out_console,
    parse_sets,
    print_note,
    report_dir,
)
from covshift.data import dataset_names
from covshift.experiments.config import MAX_SEED_COUNT
from covshift.experiments.config_files import load_config
from covshift.store import DEFAULT_DB, Store


def run(
    preset: Annotated[
        str | None,
        typer.Argument(
            metavar="[PRESET]",
            help="A shipped preset (see `covshift presets`) or a path to a .toml file.",
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps per network.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of weights and batches.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help=f"Dataset: {', '.join(dataset_names())}.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder with the IDX files (default: $COVSHIFT_DATA_DIR, then the "
            "dataset's standard place)."
        ),
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (SGD or AdamW: optimizer.kind).")
    ] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Mini-batch size.")] = None,
    eval_every: Annotated[
        int | None, typer.Option(min=1, help="Steps between evaluations on the full test set.")
    ] = None,
    probe_every: Annotated[
        int | None, typer.Option(min=1, help="Steps between probe records.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:i].")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override any config field: --set model.init_std=0.05 (repeatable)."
        ),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(
            min=1, max=MAX_SEED_COUNT, help="Run seeds 0 .. N-1 (instead of the preset's seeds)."
        ),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(help="One of the preset's sizes (quick, full; see covshift presets)."),
    ] = None,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
    members: MembersOption = None,
    backend: BackendOption = "local",
    address: AddressOption = None,
    gpus_per_point: Annotated[
        float, typer.Option(min=0, help="GPUs Ray reserves per point (--backend ray).")
    ] = 0.0,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the grid's points and the estimate; run nothing."),
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(help="Run a recorded experiment again by its id (what is finished is kept)."),
    ] = None,
    db: DbOption = DEFAULT_DB,
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: reports/<experiment id> beside the store)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the headline numbers and claims as JSON on stdout (progress to stderr).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run an experiment (a shipped preset or a TOML file): every point of its grid
    that the store does not hold yet, then its report and claims.

    Example: covshift run ioffe2015 --steps 2000 --json
    """
    from covshift.cli.tables import claims_table, plan_table, summary_table
    from covshift.experiments.costs import format_seconds
    from covshift.experiments.experiment_summary import (
        json_safe,
        stored_config,
        summarize,
        unfinished_note,
    )
    from covshift.experiments.members import recorded_batches
    from covshift.experiments.planner import describe_plan, plan_members
    from covshift.experiments.preflight import preflight
    from covshift.experiments.sweep import (
        make_backend,
        make_sweep_progress,
        plan_sweep,
        run_sweep,
    )
    from covshift.report import write_report

    flags = {
        "steps": steps,
        "seeds": [seed] if seed is not None else seeds,
        "dataset": dataset,
        "data_dir": str(data_dir) if data_dir else None,
        "optimizer.lr": lr,
        "optimizer.momentum": momentum,
        "batch_size": batch_size,
        "eval_every": eval_every,
        "probe.every": probe_every,
        "device": device,
    }
    if seed is not None and seeds is not None:
        raise UserError("give --seed S (one seed) or --seeds N (seeds 0 .. N-1), not both")
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_sets(set_ or []))
    if resume is not None:
        if overrides or size:
            raise UserError(
                "--resume runs a recorded experiment with its recorded settings; "
                f"drop the overrides ({', '.join(overrides)})"
            )
        with existing_store(db) as reading:
            config = stored_config(reading, resume)
    elif preset is None:
        raise UserError("name a preset (covshift presets) or a .toml file, or give --resume ID")
    else:
        config = load_config(preset, overrides, size=size)
    check_folder(db.parent, "--db")
    if out is not None:
        check_folder(out, "--out")
    plan = plan_sweep(config, db)
    todo = plan.to_run
    chosen = make_backend(
        backend,
        points=len(todo),
        workers=workers,
        threads=threads,
        address=address,
        gpus=gpus_per_point,
    )
    costs = preflight(config, todo, chosen.threads)  # raises before anything is written
    console = err_console if as_json else out_console
    lanes = chosen.workers or workers or 1
    nets, seeds_n = len(config.networks), len(config.seeds)
    grid = " x ".join(
        [f"{nets} network{'s' * (nets != 1)}"]
        + [f"{len(v)} {k}" for k, v in config.sweep.items()]
        + [f"{seeds_n} seed{'s' * (seeds_n != 1)}"]
    )
    where = (
        f"{chosen.workers} worker{'s' * (chosen.workers > 1)} x {chosen.threads} thread"
        f"{'s' * (chosen.threads > 1)}"
        if chosen.name != "ray"
        else f"Ray tasks of {chosen.threads} CPU{'s' * (chosen.threads > 1)}"
    )
    batches = plan_members(
        todo,
        costs,
        lanes=lanes,
        threads=chosen.threads,
        members=members,
        resumed=recorded_batches(todo, plan.recorded, db),
    )
    estimate = format_seconds(batches.seconds) if todo else "0s"
    console.print(
        f"{plan.experiment_id}: {len(plan.points)} points ({grid}); {len(todo)} to run, "
        f"{len(plan.points) - len(todo)} already recorded; {chosen.name} backend, {where}; "
        f"estimated {estimate} ({describe_plan(batches)})",
        highlight=False,
        soft_wrap=True,
    )
    for note in batches.notes:
        console.print(f"  {note}", highlight=False, soft_wrap=True)
    if dry_run:
        console.print(plan_table(plan))
        return
    if resume is not None and not todo:
        outcomes = sorted({plan.status(p) for p in plan.points})
        console.print(
            f"{resume} is complete: each of its {len(plan.points)} points is recorded "
            f"({' or '.join(outcomes)}), so there is nothing to resume; its report and "
            "claims are rebuilt from the store.",
            highlight=False,
            soft_wrap=True,
        )
    store = Store(db)
    with make_sweep_progress(disable=quiet, console=console) as progress:
        try:
            groups = batches.backend_groups
            result = run_sweep(plan, store, chosen, progress=progress, groups=groups)
        except KeyboardInterrupt:
            progress.stop()
            err_console.print(
                f"[yellow]Interrupted[/] {plan.experiment_id}. What was recorded stays in "
                f"{store.path}; the same command resumes it, as does: "
                f"covshift run --resume {plan.experiment_id} --db {db}",
                soft_wrap=True,
                highlight=False,
            )
            raise typer.Exit(130) from None
    summary = summarize(store, plan.experiment_id, config)
    index = write_report(
        store, plan.experiment_id, config, summary, report_dir(store.path, plan.experiment_id, out)
    )
    summary["report"] = str(index)
    summary["seconds"] = result.seconds
    if as_json:
        print(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    else:
        console.print(summary_table(summary, config))
        if summary["claims"]:
            console.print(claims_table(summary))
        console.print(f"Report: {index}")
    unfinished = [o for o in result.outcomes if o.status in ("failed", "busy")]
    for o in unfinished:
        err_console.print(f"[red]{o.status}[/]: point {o.point}: {o.error}", highlight=False)
    note = unfinished_note(summary, plan.experiment_id, store.path)
    if note:
        print_note(note)
    if any(o.status == "failed" for o in result.outcomes):
        raise typer.Exit(1)  # the report holds what was measured; a point did not train
