"""Verbs of the generator stages: train-generator, generate, assess, experiment and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deltalora.cli.app import (
    DeviceOpt,
    DtypeOpt,
    OverwriteOpt,
    PresetOpt,
    SetOpt,
    TasksFileOpt,
    TasksOpt,
    TensorboardOpt,
    WorkspaceOpt,
    app,
    check_outputs,
    setup,
    split_names,
)
from deltalora.errors import UsageError
from deltalora.generator.retrieval import RETRIEVAL
from deltalora.generator.variants import VARIANTS
from deltalora.workspace import Workspace

VARIANT_HELP = (
    "; ".join(f"{v.name}: {v.summary}" for v in VARIANTS.values()) + f"; {RETRIEVAL}: the nearest zoo adapter."
)
GeneratorOpt = Annotated[
    Path,
    typer.Option(
        "--generator",
        "-g",
        help="Trained generator or retrieval folder, or the name of one under <workspace>/generators.",
    ),
]


def _generator_dir(ws: Workspace, given: Path) -> Path:
    """A folder as given, else a name under the workspace's generators."""
    return given if given.exists() or len(given.parts) > 1 else ws.generator(str(given))


@app.command("train-generator")
def train_generator_cmd(
    variant: Annotated[str, typer.Option(help=VARIANT_HELP)] = "dnd",
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Comma-separated training tasks (default: the pool).")
    ] = None,
    shuffle_delta: Annotated[
        bool, typer.Option("--shuffle-delta", help="Negative control: permute δ targets across tasks.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default <workspace>/generators/<variant>): new, empty, or ours (resumed)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    tensorboard: TensorboardOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Train a generator on (prompt batch, checkpoint, δ) samples of the zoo; resumes after a kill (on any device)."""
    from deltalora.generator.retrieval import build_retrieval
    from deltalora.generator.train import train_generator

    if variant != RETRIEVAL and variant not in VARIANTS:
        raise UsageError(f"--variant: unknown {variant!r}; choose from {', '.join([*VARIANTS, RETRIEVAL])}")
    sets = [
        *(overrides or []),
        *([] if variant == RETRIEVAL else [f"generator.variant={variant}"]),
        *(["generator.shuffle_delta=true"] if shuffle_delta else []),
    ]
    run = setup(preset, workspace, sets, tasks_file, device=device, dtype=dtype)
    names = split_names(tasks) or list(run.preset.pool)
    dest = out or run.ws.generator(variant + ("_shuffled" if shuffle_delta else ""))
    if variant == RETRIEVAL:
        build_retrieval(run.preset, run.ws, dest, names, run.extra, overwrite=overwrite)
        typer.echo(f"retrieval index over {len(names)} tasks in {dest}")
        return
    card = train_generator(run.preset, run.ws, dest, names, run.extra, overwrite=overwrite, tensorboard=tensorboard)
    typer.echo(
        f"generator {variant}: {card.n_params:,} parameters, emits {card.lora_params:,} LoRA parameters; "
        f"{card.train_seconds:.0f} s; saved to {dest}"
    )


@app.command("generate")
def generate_cmd(
    generator: GeneratorOpt,
    prompts: Annotated[Path, typer.Option("--prompts", help="Text file (one prompt a line) or JSONL.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write: new or empty.")],
    seed: Annotated[int, typer.Option(help="Seed of the prompt draw.")] = 0,
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Emit a PEFT adapter for the prompts (loads with peft.PeftModel.from_pretrained)."""
    from deltalora.generator.generate import generate, read_prompts

    run = setup(preset, workspace, device=device)
    prov = generate(
        _generator_dir(run.ws, generator), read_prompts(prompts), out, seed, overwrite=overwrite, device=run.device
    )
    typer.echo(json.dumps(prov))


@app.command("assess")
def assess_cmd(
    generators: Annotated[
        list[Path],
        typer.Option(
            "--generator",
            "-g",
            help="Trained generator or retrieval folder, or a name under <workspace>/generators (repeatable).",
        ),
    ],
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Comma-separated tasks (default: the generator's training tasks).")
    ] = None,
    draws: Annotated[int, typer.Option(help="Generated adapters per task (different train-prompt draws).")] = 2,
    n_test: Annotated[int | None, typer.Option(help="Score only the first N test items.")] = None,
    out: Annotated[Path | None, typer.Option(help="JSON output: one entry per generator.")] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Add these generators to an existing --out file (same draws and n_test).")
    ] = False,
    device: DeviceOpt = None,
) -> None:
    """Accuracy, parameter MSE and δ distance/cosine of generated adapters vs the zoo's references."""
    from deltalora.experiments.assess import assess_generator
    from deltalora.generator.artifact import GeneratorCard
    from deltalora.generator.retrieval import index_tasks, is_retrieval
    from deltalora.io import atomic_write_json, read_json

    run = setup(preset, workspace, overrides, tasks_file, device=device)
    check_outputs(run.ws, (out,) if out else ())
    results = {}
    for g in (_generator_dir(run.ws, g) for g in generators):
        card = None if is_retrieval(g) else GeneratorCard.from_file(g / "config.json")
        names = split_names(tasks) or (index_tasks(g) if card is None else card.train_tasks)
        res = assess_generator(run.preset, run.ws, g, names, draws, n_test, run.extra)
        if card is not None:
            res.update(
                train_seconds=card.train_seconds,
                n_params=card.n_params,
                lora_params=card.lora_params,
                steps_done=card.steps_done,
            )
        results[g.name] = res
        typer.echo(f"{g.name}: " + json.dumps(res["overall"]))
    if out:
        payload = {"preset": run.preset.name, "draws": draws, "n_test": n_test, "generators": results}
        if merge and out.exists():
            old = read_json(out, "assessment results")
            if (old.get("draws"), old.get("n_test")) != (draws, n_test):
                raise UsageError(
                    f"{out}: holds draws={old.get('draws')}, n_test={old.get('n_test')}; "
                    "cannot merge a different protocol"
                )
            payload["generators"] = {**old["generators"], **results}
        atomic_write_json(out, payload)


@app.command("experiment")
def experiment_cmd(
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    tasks: TasksOpt = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run only these parts (repeatable): rq1, rq2, rq2_lodo, rq3, rq4, ablations, cv."),
    ] = None,
    results_dir: Annotated[
        Path | None, typer.Option(help="Where the per-RQ JSON goes (default results/experiments_<preset>).")
    ] = None,
    declare_only: Annotated[
        bool,
        typer.Option(
            "--declare-only",
            help="Write <results-dir>/declared.json (the cross-validation's comparisons, folds and configs) and stop:"
            " commit it before the run; a run that differs from it is refused.",
        ),
    ] = False,
    reuse: Annotated[
        list[Path] | None,
        typer.Option(
            "--reuse",
            help="Results folder of another cross-validation run of this preset (repeatable) whose committed cells "
            "stand in for this run's cells of the same name, e.g. the main run's beside a variants run on a fresh "
            "machine; refused unless its declared.json has the same folds, generator and scoring config.",
        ),
    ] = None,
    restore_delta: Annotated[
        bool,
        typer.Option(
            "--restore-delta",
            help="Measure again the δ of this run's committed cells that were scored before their copies kept it "
            "(each checked against the δ cosine its rows recorded; nothing is trained or rescored), then stop.",
        ),
    ] = False,
    retrain: Annotated[
        bool,
        typer.Option(
            "--retrain",
            help="With --restore-delta: train again, with their seeds, the generators and multi-task LoRAs the "
            "workspace lacks (hours on a CPU for a large run); without it those cells keep no δ.",
        ),
    ] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """RQ1-RQ4, ablations and controls on a built zoo with Delta Activations. Resumable: every finished
    cell is cached under <workspace>/experiments and skipped on a rerun; budgets are the preset's
    experiment.* fields (--set experiment.steps=300 ...). The cross-validation first writes what it will
    test to <results-dir>/declared.json (or checks the run against the one there)."""
    from deltalora.experiments.run import run_experiment
    from deltalora.presets import with_pool
    from deltalora.zoo.summary import selected_tasks

    run = setup(preset, workspace, overrides, tasks_file, tasks=tasks, device=device, dtype=dtype)
    results_dir = results_dir or Path(f"results/experiments_{run.preset.name}")
    check_outputs(run.ws, dirs=(results_dir,))
    kept = selected_tasks(run.preset, run.ws, run.extra)  # tasks whose LoRA failed the zoo's selection are no targets
    if set(kept) != set(run.preset.pool):
        dropped = [t for t in run.preset.pool if t not in kept]
        typer.echo(
            f"{len(dropped)} pool task(s) not selected by the zoo (zoo.min_gain) or not built, left out: "
            + ", ".join(dropped),
            err=True,
        )
    p = with_pool(run.preset, ",".join(kept))
    if declare_only:
        from deltalora.data.tasks import load_pool
        from deltalora.experiments.cv import declare

        if not p.experiment.folds:
            raise UsageError("--declare-only declares a cross-validation: set experiment.folds >= 2")
        results_dir.mkdir(parents=True, exist_ok=True)
        typer.echo(declare(p, {n: t.domain for n, t in load_pool(p, run.extra).items()}, results_dir))
        return
    if retrain and not restore_delta:
        raise UsageError("--retrain only goes with --restore-delta")
    if restore_delta:
        from deltalora.experiments.restore import restore_deltas

        for name, what in restore_deltas(p, run.ws, results_dir, run.extra, retrain).items():
            typer.echo(f"{name}: {what}")
        return
    files = run_experiment(p, run.ws, results_dir, only, run.extra, reuse=reuse)
    typer.echo("\n".join(f"{rq}: {f}" for rq, f in files.items()))


@app.command("report")
def report_cmd(
    results_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Folder of experiment results (rq1.json ... or cv.json), then any further cross-validation runs "
            "(cv.json) to report beside it, e.g. a variants or RQ3 run that shares its cells, or a composition run "
            "(rq4.json, from --only rq4)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Markdown report; plots go next to it.")] = Path("docs/report.md"),
) -> None:
    """Write the report (Markdown + PNG plots) from the experiment result files alone; it opens with the answer
    to every declared comparison."""
    from deltalora.experiments.report import write_report

    check_outputs(None, (out,))
    typer.echo(str(write_report(results_dirs[0], out, results_dirs[1:])))
