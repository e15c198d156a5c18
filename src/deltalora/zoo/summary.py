"""Per-task zoo results: base vs LoRA accuracy and cost, as JSON and a Markdown table."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from deltalora.config import Preset
from deltalora.data.registry import DROPPED, TaskSpec
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.io import atomic_write_bytes, atomic_write_json, read_json
from deltalora.stats import t_interval
from deltalora.workspace import Workspace
from deltalora.zoo.manifest import RunRecord

COUNTED_MIN_ITEMS = 100
"""A selected task counts towards the pool's size with at least this many train and test items."""


def zoo_summary(preset: Preset, ws: Workspace, extra: list[TaskSpec] | None = None) -> list[dict]:
    """One record per task: sizes, base and LoRA accuracy on validation and test (mean over its runs), the test
    gain's paired 95% interval over items, whether it is selected, and its cost."""
    rows = []
    for name in preset.pool:
        base_f = ws.base_record(name)
        runs = [RunRecord.from_file(f) for f in sorted(ws.runs.glob(f"{name}__seed*.json"))]
        if not base_f.exists() or not runs:
            continue
        task = load_task(resolve_spec(name, extra), preset.tasks)
        base = read_json(base_f, "base accuracy")
        accs = [r.test_acc[name] for r in runs]
        lora_acc = sum(accs) / len(accs)
        vals = [r.val_acc[name] for r in runs if name in r.val_acc]
        lora_val = sum(vals) / len(vals) if vals else None
        base_val = base.get("base_val_acc")
        val_gain = lora_val - base_val if vals and base_val is not None else None
        gain = lora_acc - base["base_acc"]
        rows.append(
            {
                "task": name,
                "domain": task.domain,
                "kind": task.kind,
                "n_train": len(task.train),
                "n_val": len(task.val),
                "n_test": len(task.test),
                "base_val_acc": _round(base_val),
                "lora_val_acc": _round(lora_val),
                "val_gain": _round(val_gain),
                "base_acc": round(base["base_acc"], 4),
                "lora_acc": round(lora_acc, 4),
                "lora_acc_per_run": [round(a, 4) for a in accs],
                "gain": round(gain, 4),
                "gain_ci95": _paired_interval(base.get("test_hits"), [r.test_hits.get(name) for r in runs]),
                "selected_on": "validation" if val_gain is not None else "test",
                "passes_min_gain": (val_gain if val_gain is not None else gain) >= preset.zoo.min_gain,
                "train_seconds": round(sum(r.train_seconds for r in runs) / len(runs), 1),
                "wall_seconds_all_runs": round(sum(r.wall_seconds for r in runs), 1),
            }
        )
    return rows


def selected_tasks(preset: Preset, ws: Workspace, extra: list[TaskSpec] | None = None) -> tuple[str, ...]:
    """The pool tasks whose LoRA passed the selection (``zoo.min_gain``), in pool order."""
    return tuple(r["task"] for r in zoo_summary(preset, ws, extra) if r["passes_min_gain"])


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _paired_interval(base_hits: list[int] | None, run_hits: list[list[int] | None]) -> list[float] | None:
    """t-interval of the per-item accuracy difference (LoRA, averaged over runs, minus base) on the same items."""
    if not base_hits or not all(run_hits):
        return None
    diff = np.mean(np.array(run_hits, dtype=float), 0) - np.array(base_hits, dtype=float)
    return [round(x, 4) for x in t_interval(diff)["ci"]]


def zoo_results(
    preset: Preset,
    ws: Workspace,
    out_json: Path,
    out_md: Path | None,
    extra: list[TaskSpec] | None = None,
) -> list[dict]:
    """Per-task zoo results as JSON and a Markdown table: selection, counts per family, the time of each stage;
    candidates dropped by hand (the registry's ``DROPPED``) listed with the reason."""
    rows = zoo_summary(preset, ws, extra)
    dropped = zoo_summary(preset.replace(pool=tuple(DROPPED), pairs=()), ws, extra) if DROPPED else []
    for r in dropped:
        r["dropped"] = DROPPED[r["task"]]
    runs = [RunRecord.from_file(f) for f in sorted(ws.runs.glob("*.json"))]
    bases = [read_json(f) for f in sorted(ws.base_evals.glob("*.json"))]

    def in_pool(names) -> bool:
        return all(t in preset.pool for t in names)

    pool_runs = [r for r in runs if in_pool(r.tasks)]
    stages = {
        "base_eval": sum(b["seconds"] for b in bases if in_pool([b["task"]])),
        "train": sum(r.train_seconds for r in pool_runs),
        "lora_eval": sum(r.eval_seconds for r in pool_runs),
    }
    selected = [r for r in rows if r["passes_min_gain"]]
    counted = [r for r in selected if r["n_train"] >= COUNTED_MIN_ITEMS and r["n_test"] >= COUNTED_MIN_ITEMS]
    families = Counter(r["domain"] for r in counted)
    payload = {
        "preset": preset.name,
        "base": preset.base,
        "tasks_config": dataclasses.asdict(preset.tasks),
        "zoo": dataclasses.asdict(preset.zoo),
        "selection": f"LoRA gain >= {preset.zoo.min_gain} over the base model on the "
        + ("validation split (carved from train)" if preset.tasks.n_val else "test split"),
        "n_candidates": len(preset.pool),
        "n_measured": len(rows),
        "n_selected": len(selected),
        "n_counted": len(counted),
        "counted_note": f"selected tasks with >= {COUNTED_MIN_ITEMS} train and >= {COUNTED_MIN_ITEMS} test items",
        "counted_per_domain": dict(sorted(families.items())),
        "domains_with_4_counted": sum(n >= 4 for n in families.values()),
        "build_wall_seconds": round(sum(r.wall_seconds for r in pool_runs) + stages["base_eval"], 1),
        "build_wall_seconds_note": "sum of per-run wall times (training, checkpoint saving, final evaluation) and "
        "base-model evaluations for the pool tasks and pair adapters, on the machine that built it",
        "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
        "n_adapter_runs": len(pool_runs),
        "n_checkpoints": sum(len(r.checkpoints) for r in pool_runs),
        "selected": [r["task"] for r in selected],
        "pairs": [{"pair": r.task, "test_acc": r.test_acc} for r in pool_runs if len(r.tasks) > 1],
        "tasks": rows,
        "dropped_candidates": dropped,
    }
    atomic_write_json(out_json, payload)
    if out_md is not None:
        atomic_write_bytes(out_md, ("\n".join(_markdown(rows, dropped)) + "\n").encode())
    return rows


def _fmt(x: float | None, sign: bool = False) -> str:
    return "–" if x is None else (f"{x:+.3f}" if sign else f"{x:.3f}")


def _markdown(rows: list[dict], dropped: list[dict]) -> list[str]:
    lines = [
        "| task | domain | kind | train / val / test | base val | LoRA val | val gain | selected | base test | "
        "LoRA test (per run) | test gain [95% CI] | train s/run |",
        "|---|---|---|---|---:|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = ", ".join(f"{a:.3f}" for a in r["lora_acc_per_run"])
        ci = r["gain_ci95"]
        interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        lines.append(
            f"| {r['task']} | {r['domain']} | {r['kind']} | {r['n_train']} / {r['n_val']} / {r['n_test']} | "
            f"{_fmt(r['base_val_acc'])} | {_fmt(r['lora_val_acc'])} | {_fmt(r['val_gain'], True)} | "
            f"{'yes' if r['passes_min_gain'] else 'no'} | {r['base_acc']:.3f} | {r['lora_acc']:.3f} ({runs}) | "
            f"{r['gain']:+.3f}{interval} | {r['train_seconds']:.0f} |"
        )
    if dropped:
        lines += ["", "Candidates measured and dropped from the pool by hand:", ""]
        lines += [
            f"- `{r['task']}` ({r['domain']}): base {r['base_acc']:.3f}, LoRA {r['lora_acc']:.3f} — {r['dropped']}"
            for r in dropped
        ]
    return lines
