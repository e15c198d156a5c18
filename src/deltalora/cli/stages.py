"""Verbs of the data stages: tasks, zoo, delta, evaluate and the main job ``run``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deltalora.cli.app import (
    BaseOpt,
    DeviceOpt,
    DtypeOpt,
    PresetOpt,
    ProbeOpt,
    SetOpt,
    TasksFileOpt,
    TasksOpt,
    TensorboardOpt,
    WorkspaceOpt,
    app,
    check_outputs,
    delta_app,
    setup,
    tasks_app,
    zoo_app,
)
from deltalora.errors import UsageError


@tasks_app.command("list")
def tasks_list(
    preset: PresetOpt = "small",
    tasks_file: TasksFileOpt = None,
    tasks: TasksOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Also list dropped candidates with the reason.")] = False,
) -> None:
    """List the preset's task pool (name, domain, source)."""
    from deltalora.data.registry import BUILTIN, DROPPED

    run = setup(preset, tasks_file=tasks_file, tasks=tasks)
    specs = {**BUILTIN, **{s.name: s for s in run.extra}}
    for name in [*run.preset.pool, *(s.name for s in run.extra if s.name not in run.preset.pool)]:
        s = specs[name]
        typer.echo(f"{s.name:45s} {s.domain:12s} {s.source}")
    if all_:
        for name, why in DROPPED.items():
            typer.echo(f"{name:45s} dropped: {why}")


@tasks_app.command("show")
def tasks_show(
    name: str,
    preset: PresetOpt = "small",
    tasks_file: TasksFileOpt = None,
    n: Annotated[int, typer.Option(help="Items to print.")] = 2,
) -> None:
    """Show a task's domain, kind, split sizes and a few train items."""
    from deltalora.data.tasks import load_task, resolve_spec

    run = setup(preset, tasks_file=tasks_file)
    spec = resolve_spec(name, run.extra)
    task = load_task(spec, run.preset.tasks)
    typer.echo(
        f"{task.name}: domain={task.domain} kind={task.kind} train={len(task.train)} test={len(task.test)} "
        f"source={spec.source}"
    )
    if spec.note:
        typer.echo(f"note: {spec.note}")
    for it in task.train[:n]:
        typer.echo("-" * 60)
        typer.echo(it.prompt + it.completion())
        if it.choices:
            typer.echo(f"[choices: {list(it.choices)}]")


@tasks_app.command("prepare")
def tasks_prepare(
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    tasks: TasksOpt = None,
) -> None:
    """Fetch and cache every pool task's source, validate it, write <workspace>/tasks.json."""
    from deltalora.data.bigbench import extract_bigbench
    from deltalora.data.tasks import load_task, resolve_spec
    from deltalora.io import atomic_write_json

    run = setup(preset, workspace, overrides, tasks_file, tasks=tasks)
    specs = [resolve_spec(n, run.extra) for n in run.preset.pool]
    extract_bigbench([s.source.split(":", 1)[1] for s in specs if s.source.startswith("bigbench:")])
    rows = []
    for s in specs:
        t = load_task(s, run.preset.tasks)
        rows.append(
            {
                "task": t.name,
                "domain": t.domain,
                "kind": t.kind,
                "n_train": len(t.train),
                "n_test": len(t.test),
                "source": s.source,
            }
        )
        typer.echo(f"{t.name:45s} {t.domain:12s} {t.kind:5s} train={len(t.train):5d} test={len(t.test):4d}")
    atomic_write_json(run.ws.tasks_file, rows)


@zoo_app.command("build")
def zoo_build(
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    base: BaseOpt = None,
    tasks: TasksOpt = None,
    tensorboard: TensorboardOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Train every missing adapter (resumable: rerun continues where a killed build stopped, on any device)."""
    from deltalora.zoo.build import build_zoo

    run = setup(preset, workspace, overrides, tasks_file, base, tasks, device, dtype)
    manifest = build_zoo(run.preset, run.ws, run.extra, tensorboard)
    typer.echo(f"zoo: {len(manifest)} checkpoints in {run.ws.zoo}")


@zoo_app.command("results")
def zoo_results_cmd(
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    tasks: TasksOpt = None,
    out: Annotated[Path | None, typer.Option(help="JSON output (default results/zoo_<preset>.json).")] = None,
    md: Annotated[Path | None, typer.Option(help="Markdown table (default docs/zoo_<preset>.md).")] = None,
) -> None:
    """Per-task base vs LoRA accuracy and train time, as JSON and a Markdown table."""
    from deltalora.zoo.summary import zoo_results

    run = setup(preset, workspace, overrides, tasks_file, tasks=tasks)
    name = run.preset.name
    out, md = out or Path(f"results/zoo_{name}.json"), md or Path(f"docs/zoo_{name}.md")
    check_outputs(run.ws, (out, md))
    rows = zoo_results(run.preset, run.ws, out, md, run.extra)
    for r in rows:
        typer.echo(f"{r['task']:45s} base={r['base_acc']:.3f} lora={r['lora_acc']:.3f} gain={r['gain']:+.3f}")


@delta_app.command("compute")
def delta_compute(
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    overrides: SetOpt = None,
    base: BaseOpt = None,
    tasks: TasksOpt = None,
    probes: Annotated[
        list[int] | None, typer.Option("--probes", help="Probe-set sizes: 1, 5 and/or 20 (repeatable).")
    ] = None,
    device: DeviceOpt = None,
) -> None:
    """δ for every checkpoint in the zoo (of the --tasks only, if given; resumable); base activations computed once."""
    from deltalora.delta.compute import delta_stage

    run = setup(preset, workspace, overrides, base=base, tasks=tasks, device=device)
    delta_stage(
        run.preset, run.ws, tuple(probes or [run.preset.delta.n_probes]), pool=run.preset.pool if tasks else None
    )


@delta_app.command("report")
def delta_report_cmd(
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    overrides: SetOpt = None,
    tasks: TasksOpt = None,
    out: Annotated[Path | None, typer.Option(help="JSON output (default results/delta_<preset>.json).")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG map (default docs/delta_map_<preset>.png).")] = None,
) -> None:
    """Silhouette by domain (δ vs flattened weights), 2-D map, additivity of pair adapters, over the selected tasks."""
    from deltalora.delta.report import delta_report
    from deltalora.pipeline import write_results_md
    from deltalora.zoo.summary import selected_tasks

    run = setup(preset, workspace, overrides, tasks=tasks)
    out = out or Path(f"results/delta_{run.preset.name}.json")
    plot = plot or Path(f"docs/delta_map_{run.preset.name}.png")
    check_outputs(run.ws, (out, plot, Path("docs") / f"results_{run.preset.name}.md"))
    res = delta_report(run.ws, out, plot, selected_tasks(run.preset, run.ws, run.extra))
    write_results_md(run.preset.name, out.parent, Path("docs"))
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "additivity"}, indent=1))


@delta_app.command("protocol")
def delta_protocol_cmd(
    preset: PresetOpt = "families",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="JSON output (default results/protocol_<preset>.json).")] = None,
    md: Annotated[Path | None, typer.Option(help="Markdown tables (default docs/protocol_<preset>.md).")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG map (default docs/protocol_map_<preset>.png).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """The Delta Activations paper's protocol on a built zoo: LoRAs on disjoint parts of each selected task (shared
    and independent inits; resumable), then δ vs flattened weights vs ΔW by silhouette and 1-NN retrieval against
    permutation nulls, and additivity against a control."""
    from deltalora.delta.protocol import protocol_stage

    run = setup(preset, workspace, overrides, tasks_file, device=device, dtype=dtype)
    name = run.preset.name
    out = out or Path(f"results/protocol_{name}.json")
    md, plot = md or Path(f"docs/protocol_{name}.md"), plot or Path(f"docs/protocol_map_{name}.png")
    check_outputs(run.ws, (out, md, plot))
    protocol_stage(run.preset, run.ws, out, md, plot, run.extra)
    typer.echo(f"protocol: {out}, {md}, {plot}")


@app.command("evaluate")
def evaluate_cmd(
    task: Annotated[str, typer.Option("--task", "-t", help="Task name.")],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="PEFT adapter folder (omit: base model).")
    ] = None,
    preset: PresetOpt = "small",
    base: BaseOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    split: Annotated[str, typer.Option(help="test, val or train.")] = "test",
    device: DeviceOpt = None,
) -> None:
    """Accuracy of an adapter (or the base model) on a task's split."""
    from deltalora.data.tasks import load_task, resolve_spec
    from deltalora.lm.evaluate import accuracy
    from deltalora.lm.models import load_base
    from deltalora.lm.names import offline_name
    from deltalora.zoo.adapters import load_adapter, read_adapter

    if split not in ("test", "val", "train"):
        raise UsageError(f"--split must be test, val or train, got {split!r}")
    run = setup(preset, overrides=overrides, tasks_file=tasks_file, base=base, device=device)
    p = run.preset
    t = load_task(resolve_spec(task, run.extra), p.tasks)
    if not getattr(t, split):
        raise UsageError(f"task {task} has no {split} items in preset {p.name} (tasks.n_val=0: no validation split)")
    if adapter is not None:
        recorded = read_adapter(adapter)[0].get("base_model_name_or_path")
        if base is None and recorded:  # deltalora's own adapters were trained on the offline copy
            p = p.replace(base=offline_name(recorded))
    model, tok = load_base(p.base, run.device)
    if adapter is not None:
        model = load_adapter(model, adapter, p.base)
    items = getattr(t, split)
    acc = accuracy(model, tok, items, p.zoo.eval_batch_size, p.zoo.max_length)
    res = dict(task=t.name, split=split, adapter=str(adapter) if adapter else None, base=p.base, n=len(items))
    typer.echo(json.dumps({**res, "accuracy": round(acc, 4)}))


@app.command("run")
def run_cmd(
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    tasks_file: TasksFileOpt = None,
    overrides: SetOpt = None,
    base: BaseOpt = None,
    tasks: TasksOpt = None,
    results_dir: Annotated[Path, typer.Option(help="Where result JSON goes.")] = Path("results"),
    docs_dir: Annotated[Path, typer.Option(help="Where tables and plots go.")] = Path("docs"),
    tensorboard: TensorboardOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """The main job: build the zoo, compute Delta Activations (|P| = 1, 5, 20), write results and plots."""
    from deltalora.pipeline import run_all

    run = setup(preset, workspace, overrides, tasks_file, base, tasks, device, dtype)
    check_outputs(run.ws, dirs=(results_dir, docs_dir))
    res = run_all(run.preset, run.ws, results_dir, docs_dir, run.extra, tensorboard)
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "additivity"}, indent=1))


@delta_app.command("embed")
def delta_embed(
    folders: Annotated[
        list[Path], typer.Argument(help="PEFT LoRA adapter folders and/or full fine-tuned model folders.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="δ file (.safetensors); its JSON index goes next to it.")],
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    overrides: SetOpt = None,
    base: BaseOpt = None,
    probes: ProbeOpt = None,
    key: Annotated[str, typer.Option("--key", help="Key of each δ: the folder's path as given, or its name.")] = "path",
    device: DeviceOpt = None,
) -> None:
    """δ of any PEFT LoRA adapters and full fine-tunes of the base, in one safetensors file plus a JSON index."""
    from deltalora.delta.embed import embed_folders, index_path, probe_config

    run = setup(preset, workspace, overrides, base=base, device=device)
    cfg = probe_config(run.preset.delta, probes)
    for e in embed_folders(folders, out, run.preset.base, cfg, key, run.ws.protected, run.device):
        typer.echo(f"{e.kind:5s} |δ|={e.delta_norm:.4g}  {e.key}")
    typer.echo(f"wrote {out} and {index_path(out)} (base {run.preset.base}, |P|={cfg.n_probes})")


@delta_app.command("neighbours")
def delta_neighbours(
    query: Annotated[Path | None, typer.Argument(help="Adapter or model folder, embedded on the set's base.")] = None,
    query_key: Annotated[str | None, typer.Option("--query-key", help="Query: an entry of the δ set.")] = None,
    deltas: Annotated[
        Path | None, typer.Option("--deltas", help="A δ file from `delta embed` (default: the workspace's zoo δ).")
    ] = None,
    preset: PresetOpt = "small",
    workspace: WorkspaceOpt = None,
    overrides: SetOpt = None,
    base: BaseOpt = None,
    probes: ProbeOpt = None,
    top: Annotated[int, typer.Option("--top", "-k", help="How many neighbours to print.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: DeviceOpt = None,
) -> None:
    """The adapters of a δ set nearest to a query by cosine (a --query-key entry is not its own neighbour)."""
    from deltalora.delta.embed import DeltaSet, probe_config, query_neighbours

    if deltas is not None and workspace is not None:
        raise UsageError("--deltas and --workspace name two δ sets; give one")
    run = setup(preset, workspace, overrides, base=base, device=device)
    cfg = probe_config(run.preset.delta, probes)
    dset = DeltaSet.from_file(deltas) if deltas else DeltaSet.from_workspace(run.ws, run.preset.base, cfg.n_probes)
    dset = dset.resolved(base, probes, run.preset.base, cfg.n_probes)
    res = query_neighbours(dset, query, query_key, top, cfg.batch_size, run.device)
    if as_json:
        typer.echo(json.dumps(res, indent=1))
        return
    typer.echo(f"{res['query']} in {res['set']} (base {res['base']}, |P|={res['n_probes']}):")
    for i, r in enumerate(res["neighbours"], 1):
        typer.echo(f"{i:3d}  cos={r['cosine']:+.4f}  {r['task'] or '-':30s}  {r['key']}")
