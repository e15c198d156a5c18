"""``deltalora <verb>``: behaviour-aware data-to-LoRA generation.

The verbs are the pipeline stages, in order: tasks -> zoo -> delta -> train-generator -> generate -> evaluate / assess -> experiment -> report. `deltalora run --preset small` is the main job (zoo, Delta Activations with 1/5/20 probes, results and plots). Every verb takes --preset (tiny | small), --workspace and --set section.field=value overrides.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import ConfigError, Preset, get_preset

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
tasks_app = typer.Typer(help="List, show and prepare tasks (BIG-bench JSON, user JSONL, synthetic).", no_args_is_help=True)
zoo_app = typer.Typer(help="Build the reference LoRA zoo and summarise it.", no_args_is_help=True)
delta_app = typer.Typer(help="Compute Delta Activations and report their quality.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(zoo_app, name="zoo")
app.add_typer(delta_app, name="delta")

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="Named preset: tiny (tests) or small (CPU default).")]
WorkspaceOpt = Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Folder for all artifacts (default runs/<preset>).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field, e.g. --set zoo.steps=10, or the task pool: --set pool=a,b (repeatable).")]
TasksFileOpt = Annotated[Optional[Path], typer.Option("--tasks-file", help="JSON list of user tasks {name, domain, path to JSONL}.")]
BaseOpt = Annotated[Optional[str], typer.Option("--base", help="Base model: known name, Hub id or folder (default: the preset's).")]
PoolOpt = Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated task names replacing the preset's pool.")]


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _setup(preset: str, overrides: list[str] | None, tasks_file: Path | None, base: str | None = None,
           pool: str | None = None) -> tuple[Preset, list]:
    from .pipeline import apply_overrides
    from .tasks import load_user_specs

    p = apply_overrides(get_preset(preset), overrides or [])
    extra = load_user_specs(tasks_file) if tasks_file else []
    changes: dict = {}
    if base:
        changes["base"] = base
    if pool:
        names = tuple(n.strip() for n in pool.split(",") if n.strip())
        changes.update(pool=names, pairs=tuple(pr for pr in p.pairs if set(pr) <= set(names)))
    return (p.replace(**changes) if changes else p), extra


def _ws(workspace: Path | None, preset: Preset) -> Path:
    return workspace or Path("runs") / preset.name


@tasks_app.command("list")
def tasks_list(preset: PresetOpt = "small", tasks_file: TasksFileOpt = None,
               all_: Annotated[bool, typer.Option("--all", help="Also list dropped candidates with the reason.")] = False) -> None:
    """List the preset's task pool (name, domain, source)."""
    from .registry import BUILTIN, DROPPED

    p, extra = _setup(preset, None, tasks_file)
    specs = {**BUILTIN, **{s.name: s for s in extra}}
    for name in [*p.pool, *(s.name for s in extra if s.name not in p.pool)]:
        s = specs[name]
        typer.echo(f"{s.name:45s} {s.domain:12s} {s.source}")
    if all_:
        for name, why in DROPPED.items():
            typer.echo(f"{name:45s} dropped: {why}")


@tasks_app.command("show")
def tasks_show(name: str, preset: PresetOpt = "small", tasks_file: TasksFileOpt = None,
               n: Annotated[int, typer.Option(help="Items to print.")] = 2) -> None:
    """Show a task's domain, kind, split sizes and a few train items."""
    from .tasks import load_task, resolve_spec

    p, extra = _setup(preset, None, tasks_file)
    spec = resolve_spec(name, extra)
    task = load_task(spec, p.tasks)
    typer.echo(f"{task.name}: domain={task.domain} kind={task.kind} train={len(task.train)} test={len(task.test)} source={spec.source}")
    if spec.note:
        typer.echo(f"note: {spec.note}")
    for it in task.train[:n]:
        typer.echo("-" * 60)
        typer.echo(it.prompt + it.completion())
        if it.choices:
            typer.echo(f"[choices: {list(it.choices)}]")


@tasks_app.command("prepare")
def tasks_prepare(preset: PresetOpt = "small", workspace: WorkspaceOpt = None, tasks_file: TasksFileOpt = None,
                  overrides: SetOpt = None, pool: PoolOpt = None) -> None:
    """Fetch and cache every pool task's source, validate it, write <workspace>/tasks.json."""
    from .bigbench import extract_bigbench
    from .io import atomic_write_json
    from .tasks import load_task, resolve_spec

    p, extra = _setup(preset, overrides, tasks_file, pool=pool)
    specs = [resolve_spec(n, extra) for n in p.pool]
    extract_bigbench([s.source.split(":", 1)[1] for s in specs if s.source.startswith("bigbench:")])
    rows = []
    for s in specs:
        t = load_task(s, p.tasks)
        rows.append({"task": t.name, "domain": t.domain, "kind": t.kind, "n_train": len(t.train), "n_test": len(t.test), "source": s.source})
        typer.echo(f"{t.name:45s} {t.domain:12s} {t.kind:5s} train={len(t.train):5d} test={len(t.test):4d}")
    atomic_write_json(_ws(workspace, p) / "tasks.json", rows)


@zoo_app.command("build")
def zoo_build(preset: PresetOpt = "small", workspace: WorkspaceOpt = None, tasks_file: TasksFileOpt = None,
              overrides: SetOpt = None, base: BaseOpt = None, pool: PoolOpt = None) -> None:
    """Train every missing adapter (resumable: rerun continues where a killed build stopped)."""
    from .zoo import build_zoo

    p, extra = _setup(preset, overrides, tasks_file, base, pool)
    manifest = build_zoo(p, _ws(workspace, p), extra)
    typer.echo(f"zoo: {len(manifest)} checkpoints in {_ws(workspace, p) / 'zoo'}")


@zoo_app.command("results")
def zoo_results_cmd(preset: PresetOpt = "small", workspace: WorkspaceOpt = None, tasks_file: TasksFileOpt = None,
                    overrides: SetOpt = None, pool: PoolOpt = None,
                    out: Annotated[Optional[Path], typer.Option(help="JSON output (default results/zoo_<preset>.json).")] = None,
                    md: Annotated[Optional[Path], typer.Option(help="Markdown table (default docs/zoo_<preset>.md).")] = None) -> None:
    """Per-task base vs LoRA accuracy and train time, as JSON and a Markdown table."""
    from .pipeline import zoo_results

    p, extra = _setup(preset, overrides, tasks_file, pool=pool)
    rows = zoo_results(p, _ws(workspace, p), out or Path(f"results/zoo_{p.name}.json"), md or Path(f"docs/zoo_{p.name}.md"), extra)
    for r in rows:
        typer.echo(f"{r['task']:45s} base={r['base_acc']:.3f} lora={r['lora_acc']:.3f} gain={r['gain']:+.3f}")


@delta_app.command("compute")
def delta_compute(preset: PresetOpt = "small", workspace: WorkspaceOpt = None, overrides: SetOpt = None, base: BaseOpt = None,
                  probes: Annotated[Optional[list[int]], typer.Option("--probes", help="Probe-set sizes: 1, 5 and/or 20 (repeatable).")] = None) -> None:
    """δ for every checkpoint in the zoo (resumable); base activations computed once per probe set."""
    from .pipeline import delta_stage

    p, _ = _setup(preset, overrides, None, base)
    delta_stage(p, _ws(workspace, p), tuple(probes or [p.delta.n_probes]))


@delta_app.command("report")
def delta_report_cmd(preset: PresetOpt = "small", workspace: WorkspaceOpt = None,
                     out: Annotated[Optional[Path], typer.Option(help="JSON output (default results/delta_<preset>.json).")] = None,
                     plot: Annotated[Optional[Path], typer.Option(help="PNG map (default docs/delta_map_<preset>.png).")] = None) -> None:
    """Silhouette by domain (δ vs flattened weights), 2-D map, additivity of pair adapters."""
    from .pipeline import delta_report, write_results_md

    p = get_preset(preset)
    out = out or Path(f"results/delta_{p.name}.json")
    res = delta_report(_ws(workspace, p), out, plot or Path(f"docs/delta_map_{p.name}.png"), p.pool)
    write_results_md(p.name, out.parent, Path("docs"))
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "additivity"}, indent=1))


@app.command("evaluate")
def evaluate_cmd(task: Annotated[str, typer.Option("--task", "-t", help="Task name.")],
                 adapter: Annotated[Optional[Path], typer.Option("--adapter", "-a", help="PEFT adapter folder (omit: base model).")] = None,
                 preset: PresetOpt = "small", base: BaseOpt = None, tasks_file: TasksFileOpt = None, overrides: SetOpt = None,
                 split: Annotated[str, typer.Option(help="test or train.")] = "test") -> None:
    """Accuracy of an adapter (or the base model) on a task's split."""
    from .adapters import load_adapter
    from .evaluate import accuracy
    from .models import load_base
    from .tasks import load_task, resolve_spec

    p, extra = _setup(preset, overrides, tasks_file, base)
    t = load_task(resolve_spec(task, extra), p.tasks)
    if split not in ("test", "train"):
        raise UserError(f"--split must be test or train, got {split!r}")
    if adapter is not None:
        from .adapters import read_adapter

        recorded = read_adapter(adapter)[0].get("base_model_name_or_path")
        if base is None and recorded:
            p = p.replace(base=recorded)
    model, tok = load_base(p.base)
    if adapter is not None:
        model = load_adapter(model, adapter, p.base)
    acc = accuracy(model, tok, getattr(t, split), p.zoo.eval_batch_size, p.zoo.max_length)
    typer.echo(json.dumps({"task": t.name, "split": split, "adapter": str(adapter) if adapter else None,
                           "base": p.base, "n": len(getattr(t, split)), "accuracy": round(acc, 4)}))


@app.command("train-generator")
def train_generator_cmd(
    variant: Annotated[str, typer.Option(help="dnd, A1, A2, B, C, or retrieval (nearest zoo adapter).")] = "dnd",
    preset: PresetOpt = "small", workspace: WorkspaceOpt = None, tasks_file: TasksFileOpt = None, overrides: SetOpt = None,
    train_tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated training tasks (default: the pool).")] = None,
    shuffle_delta: Annotated[bool, typer.Option("--shuffle-delta", help="Negative control: permute δ targets across tasks.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default <workspace>/generators/<variant>).")] = None,
) -> None:
    """Train a generator on (prompt batch, checkpoint, δ) samples of the zoo; resumes after a kill."""
    from .generator import train_generator
    from .retrieval import build_retrieval

    p, extra = _setup(preset, [*(overrides or []), *([] if variant == "retrieval" else [f"generator.variant={variant}"]),
                               *(["generator.shuffle_delta=true"] if shuffle_delta else [])], tasks_file)
    tasks = [t.strip() for t in train_tasks.split(",")] if train_tasks else list(p.pool)
    ws = _ws(workspace, p)
    dest = out or ws / "generators" / (variant + ("_shuffled" if shuffle_delta else ""))
    if variant == "retrieval":
        build_retrieval(p, ws, dest, tasks, extra)
        typer.echo(f"retrieval index over {len(tasks)} tasks in {dest}")
        return
    res = train_generator(p, ws, dest, tasks, extra)
    typer.echo(f"generator {variant}: {res['n_params']:,} parameters, emits {res['lora_params']:,} LoRA parameters; "
               f"{res['train_seconds']:.0f} s; saved to {dest}")


@app.command("generate")
def generate_cmd(generator: Annotated[Path, typer.Option("--generator", "-g", help="Trained generator or retrieval folder.")],
                 prompts: Annotated[Path, typer.Option("--prompts", help="Text file (one prompt a line) or JSONL.")],
                 out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write.")],
                 seed: Annotated[int, typer.Option(help="Seed of the prompt draw.")] = 0) -> None:
    """Emit a PEFT adapter for the prompts (loads with peft.PeftModel.from_pretrained)."""
    from .generator import generate, read_prompts

    prov = generate(generator, read_prompts(prompts), out, seed)
    typer.echo(json.dumps(prov))


@app.command("assess")
def assess_cmd(generators: Annotated[list[Path], typer.Option("--generator", "-g", help="Trained generator or retrieval folder (repeatable).")],
               preset: PresetOpt = "small", workspace: WorkspaceOpt = None, tasks_file: TasksFileOpt = None,
               overrides: SetOpt = None,
               tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated tasks (default: the generator's training tasks).")] = None,
               draws: Annotated[int, typer.Option(help="Generated adapters per task (different train-prompt draws).")] = 2,
               n_test: Annotated[Optional[int], typer.Option(help="Score only the first N test items.")] = None,
               out: Annotated[Optional[Path], typer.Option(help="JSON output: one entry per generator.")] = None,
               merge: Annotated[bool, typer.Option("--merge", help="Add these generators to an existing --out file (same draws and n_test).")] = False) -> None:
    """Accuracy, parameter MSE and δ distance/cosine of generated adapters vs the zoo's references."""
    from .assess import assess_generator
    from .io import atomic_write_json, read_json

    p, extra = _setup(preset, overrides, tasks_file)
    results = {}
    for g in generators:
        conf = read_json(g / "config.json", "generator config")
        names = [t.strip() for t in tasks.split(",")] if tasks else conf.get("train_tasks") or conf["tasks"]
        res = assess_generator(p, _ws(workspace, p), g, names, draws, n_test, extra)
        res.update({k: conf[k] for k in ("train_seconds", "n_params", "lora_params", "steps_done") if k in conf})
        results[g.name] = res
        typer.echo(f"{g.name}: " + json.dumps(res["overall"]))
    if out:
        payload = {"preset": p.name, "draws": draws, "n_test": n_test, "generators": results}
        if merge and out.exists():
            old = read_json(out, "assessment results")
            if (old.get("draws"), old.get("n_test")) != (draws, n_test):
                raise UserError(f"{out}: holds draws={old.get('draws')}, n_test={old.get('n_test')}; cannot merge a different protocol")
            payload["generators"] = {**old["generators"], **results}
        atomic_write_json(out, payload)


@app.command("run")
def run_cmd(preset: PresetOpt = "small", workspace: WorkspaceOpt = None, tasks_file: TasksFileOpt = None,
            overrides: SetOpt = None, base: BaseOpt = None, pool: PoolOpt = None,
            results_dir: Annotated[Path, typer.Option(help="Where result JSON goes.")] = Path("results"),
            docs_dir: Annotated[Path, typer.Option(help="Where tables and plots go.")] = Path("docs")) -> None:
    """The main job: build the zoo, compute Delta Activations (|P| = 1, 5, 20), write results and plots."""
    from .pipeline import run_all

    p, extra = _setup(preset, overrides, tasks_file, base, pool)
    res = run_all(p, _ws(workspace, p), results_dir, docs_dir, extra)
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "additivity"}, indent=1))


@app.command("experiment")
def experiment_cmd(preset: PresetOpt = "small", workspace: WorkspaceOpt = None, tasks_file: TasksFileOpt = None,
                   overrides: SetOpt = None,
                   only: Annotated[Optional[list[str]], typer.Option("--only", help="Run only these parts (repeatable): rq1, rq2, rq2_lodo, rq3, rq4, ablations.")] = None,
                   results_dir: Annotated[Optional[Path], typer.Option(help="Where the per-RQ JSON goes (default results/experiments_<preset>).")] = None) -> None:
    """RQ1-RQ4, ablations and controls on a built zoo with Delta Activations. Resumable: every finished
    cell is cached under <workspace>/experiments and skipped on a rerun; budgets are the preset's
    experiment.* fields (--set experiment.steps=300 ...)."""
    from .experiments import run_experiment

    p, extra = _setup(preset, overrides, tasks_file)
    files = run_experiment(p, _ws(workspace, p), results_dir or Path(f"results/experiments_{p.name}"), only, extra)
    typer.echo("\n".join(f"{rq}: {f}" for rq, f in files.items()))


@app.command("report")
def report_cmd(results_dir: Annotated[Path, typer.Argument(help="Folder of experiment results (rq1.json ...).")],
               out: Annotated[Path, typer.Option(help="Markdown report; plots go next to it.")] = Path("docs/report.md")) -> None:
    """Write the report (Markdown + PNG plots) from the experiment result files alone."""
    from .report import write_report

    typer.echo(str(write_report(results_dir, out)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .adapters import AdapterError
    from .generator import GeneratorError
    from .tasks import TaskError

    try:
        app()
    except (UserError, ConfigError, TaskError, AdapterError, GeneratorError, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
