"""Per-task zoo results: base vs LoRA accuracy and cost, as JSON and a Markdown table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import stats

from deltalora.config import Preset
from deltalora.data.registry import DROPPED, TaskSpec
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.io import atomic_write_bytes, atomic_write_json, read_json
from deltalora.workspace import Workspace
from deltalora.zoo.manifest import RunRecord


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


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _paired_interval(base_hits: list[int] | None, run_hits: list[list[int] | None]) -> list[float] | None:
    """t-interval of the per-item accuracy difference (LoRA, averaged over runs, minus base) on the same items."""
    if not base_hits or not all(run_hits):
        return None
    diff = np.mean(np.array(run_hits, dtype=float), 0) - np.array(base_hits, dtype=float)
    if np.ptp(diff) == 0:  # every item moved alike: the interval is the point (scipy would return nan)
        return [round(float(diff[0]), 4)] * 2
    ci = stats.ttest_1samp(diff, 0.0).confidence_interval(0.95)
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def zoo_results(
    preset: Preset,
    ws: Workspace,
    out_json: Path,
    out_md: Path | None,
    extra: list[TaskSpec] | None = None,
    min_gain: float = 0.05,
) -> list[dict]:
    """Per-task zoo results as JSON and a Markdown table; dropped candidates listed with the reason."""
    rows = zoo_summary(preset, ws, extra)
    dropped = zoo_summary(preset.replace(pool=tuple(DROPPED), pairs=()), ws, extra) if DROPPED else []
    for r in rows:
        r["passes_min_gain"] = r["gain"] >= min_gain
    for r in dropped:
        r.update(passes_min_gain=r["gain"] >= min_gain, dropped=DROPPED[r["task"]])
    runs = [RunRecord.from_file(f) for f in sorted(ws.runs.glob("*.json"))]
    bases = [read_json(f) for f in sorted(ws.base_evals.glob("*.json"))]

    def in_pool(names) -> bool:
        return all(t in preset.pool for t in names)

    pool_seconds = sum(r.wall_seconds for r in runs if in_pool(r.tasks)) + sum(
        b["seconds"] for b in bases if in_pool([b["task"]])
    )
    payload = {
        "preset": preset.name,
        "base": preset.base,
        "zoo": dataclasses.asdict(preset.zoo),
        "build_wall_seconds": round(pool_seconds, 1),
        "build_wall_seconds_note": "sum of per-run wall times (training, checkpoint saving, final test evaluation) and "
        "base-model evaluations for the pool tasks and pair adapters",
        "build_wall_seconds_all_candidates": round(
            sum(r.wall_seconds for r in runs) + sum(b["seconds"] for b in bases), 1
        ),
        "n_adapter_runs": sum(in_pool(r.tasks) for r in runs),
        "n_checkpoints": sum(len(r.checkpoints) for r in runs if in_pool(r.tasks)),
        "pairs": [{"pair": r.task, "test_acc": r.test_acc} for r in runs if len(r.tasks) > 1 and in_pool(r.tasks)],
        "tasks": rows,
        "dropped_candidates": dropped,
    }
    atomic_write_json(out_json, payload)
    if out_md is not None:
        atomic_write_bytes(out_md, ("\n".join(_markdown(rows, dropped)) + "\n").encode())
    return rows


def _markdown(rows: list[dict], dropped: list[dict]) -> list[str]:
    lines = [
        "| task | domain | kind | n_train | n_test | base acc | LoRA acc (mean over seeds) | gain | train s/adapter |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{a:.3f}" for a in r["lora_acc_per_seed"])
        lines.append(
            f"| {r['task']} | {r['domain']} | {r['kind']} | {r['n_train']} | {r['n_test']} | {r['base_acc']:.3f} | "
            f"{r['lora_acc']:.3f} ({per_seed}) | {r['gain']:+.3f} | {r['train_seconds']:.0f} |"
        )
    if dropped:
        lines += ["", "Candidates measured and dropped from the pool:", ""]
        lines += [
            f"- `{r['task']}` ({r['domain']}): base {r['base_acc']:.3f}, LoRA {r['lora_acc']:.3f} — {r['dropped']}"
            for r in dropped
        ]
    return lines
