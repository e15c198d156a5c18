"""Verbs that measure what the pipeline's pieces could do: ceiling (what a generator could express) and select
(which generator configuration validates best)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deltalora.cli.app import (
    DeviceOpt,
    PresetOpt,
    SetOpt,
    TasksFileOpt,
    WorkspaceOpt,
    app,
    check_outputs,
    setup,
    split_names,
)
from deltalora.errors import UsageError


@app.command("ceiling")
def ceiling_cmd(
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    score: Annotated[
        str | None,
        typer.Option(help="Comma-separated tasks to score (default: the first two selected tasks of every domain)."),
    ] = None,
    ranks: Annotated[str, typer.Option(help="Comma-separated ranks k of the reconstructions (0: the mean).")] = (
        "0,4,16,64"
    ),
    n_test: Annotated[int, typer.Option(help="Test items scored per task and reconstruction.")] = 50,
    out: Annotated[Path | None, typer.Option(help="JSON output (default results/ceiling_<preset>.json).")] = None,
    device: DeviceOpt = None,
) -> None:
    """What a generator could express: variance of the zoo's weight targets (the selected tasks' checkpoints)
    along their principal directions, and the accuracy of each scored task's adapter rebuilt from the top k
    directions, with its own checkpoints in the span (seen) and without (held out), against the reference."""
    from deltalora.data.tasks import load_pool
    from deltalora.experiments.ceiling import target_ceiling
    from deltalora.io import atomic_write_json
    from deltalora.zoo.summary import selected_tasks

    run = setup(preset, workspace, overrides, tasks_file, device=device)
    out = out or Path(f"results/ceiling_{run.preset.name}.json")
    check_outputs(run.ws, (out,))
    train = list(selected_tasks(run.preset, run.ws, run.extra))
    if score:
        scored = split_names(score)
    else:
        domains = {n: t.domain for n, t in load_pool(run.preset.replace(pool=tuple(train)), run.extra).items()}
        scored = [t for t in train if [u for u in train if domains[u] == domains[t]].index(t) < 2]
    try:
        ks = tuple(int(k) for k in ranks.split(",") if k.strip())
    except ValueError:
        raise UsageError(f"--ranks must be comma-separated whole numbers, got {ranks!r}") from None
    if not ks or min(ks) < 0 or n_test < 1:
        raise UsageError("--ranks needs at least one rank >= 0 and --n-test must be >= 1")
    result = {
        "preset": run.preset.name,
        "command": "deltalora ceiling",
        **target_ceiling(run.preset, run.ws, train, scored, ks, n_test, run.extra),
    }
    atomic_write_json(out, result)
    typer.echo(json.dumps({k: result[k] for k in ("directions_for", "mean_seen", "mean_held_out", "mean_oracle")}))


@app.command("select")
def select_cmd(
    candidate: Annotated[
        list[str],
        typer.Option(
            "--candidate",
            help='A generator configuration as space-separated overrides, e.g. "generator.head=conv" (repeatable; '
            '"" is the preset as it is).',
        ),
    ],
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    fold: Annotated[int, typer.Option(help="Cross-validation fold whose training tasks train every candidate.")] = 0,
    by: Annotated[
        str,
        typer.Option(
            help="loss: best validation token MSE (candidates with the same targets); accuracy: accuracy on the "
            "training tasks' validation items of adapters generated from their train prompts."
        ),
    ] = "loss",
    n_val: Annotated[int, typer.Option(help="--by accuracy: validation items scored per training task.")] = 50,
    out: Annotated[Path | None, typer.Option(help="JSON output (default results/selection_<preset>.json).")] = None,
    device: DeviceOpt = None,
) -> None:
    """Choose the generator's configuration on validation: train every candidate on one cross-validation fold's
    training tasks (experiment.steps steps) and rank them by their best validation loss (draws of every training
    task's validation-split prompts) or by accuracy on the training tasks' validation items. No test item and no
    held-out task is read."""
    from deltalora.data.tasks import load_pool
    from deltalora.experiments.selection import CRITERIA, read_candidates, select_generator
    from deltalora.io import atomic_write_json
    from deltalora.presets import with_pool
    from deltalora.zoo.summary import selected_tasks

    run = setup(preset, workspace, overrides, tasks_file, device=device)
    out = out or Path(f"results/selection_{run.preset.name}.json")
    check_outputs(run.ws, (out,))
    p = with_pool(run.preset, ",".join(selected_tasks(run.preset, run.ws, run.extra)))
    domains = {n: t.domain for n, t in load_pool(p, run.extra).items()}
    result = {
        "command": "deltalora select",
        **select_generator(p, run.ws, domains, read_candidates(candidate), fold, by, n_val, run.extra),
    }
    atomic_write_json(out, result)
    key = CRITERIA[by].key
    typer.echo(json.dumps({k: v[key] for k, v in result["candidates"].items()} | {"chosen": result["chosen"]}))
