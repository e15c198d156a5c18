"""``cv.json``: what the cross-validation cells measured, per method and task, and the declared comparisons.

Read from the cell cache after every cell: each method's accuracy per task over its folds, the paired tests of
the comparisons ``declared_comparisons`` fixed before the run (Holm over them), and the behaviour space of the
adapters each method hands out (how they separate families in δ, and how near a generator's δ lies to each
baseline's).
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

import numpy as np

from deltalora.config import Preset
from deltalora.delta.analysis import cosine_distance
from deltalora.delta.separation import separation
from deltalora.experiments.cells import CellStore
from deltalora.experiments.cv import CV, LOFO, ORACLE, SEEN, declaration, declared_comparisons
from deltalora.experiments.grid import GENERATOR, METHODS, Cell
from deltalora.io import atomic_write_json
from deltalora.stats import across_tasks, bootstrap_items, holm, t_interval, verdict

Records = dict[Cell, list[dict]]
"""Each cell's records, read once per ``cv.json`` rewrite (a read also loads the rows' δ from disk)."""


def _per_task(
    records: Records, cells: list[Cell]
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, np.ndarray], dict[str, float]]:
    """A method's accuracy per task, its hit rate per item, its δ per task (a task whose δ is missing, as in
    records committed before their δ was kept, or zero, as the base model's is, has none) and the δ cosine to the
    task's reference that every row records (all averaged over seeds and prompt draws)."""
    acc, item_hits, deltas, cosines = {}, {}, {}, {}
    for cell in cells:
        rows = [rec["tasks"] for rec in records[cell]]
        for t in cell.tasks:
            runs = [r for rec in rows for r in rec.get(t, [])]
            if runs:
                acc[t] = statistics.fmean(r["acc"] for r in runs)
                item_hits[t] = np.mean([r["hits"] for r in runs], 0).tolist()
                if cell.method != "base":  # no δ: its cosine means nothing
                    cosines[t] = statistics.fmean(r["delta_cos"] for r in runs)
            ds = [r["delta"] for r in runs if r.get("delta")]
            if ds and np.linalg.norm(m := np.mean(ds, 0)) > 0:
                deltas[t] = m
    return acc, item_hits, deltas, cosines


def _seconds(records: Records, cells: list[Cell]) -> float | None:
    """Mean training wall time of the adapters a method's cells used (generators, the multi-task LoRA), else None."""
    xs = [rec["train_seconds"] for c in cells for rec in records[c] if "train_seconds" in rec]
    return round(statistics.fmean(xs), 1) if xs else None


def _delta_similarity(deltas: dict[str, dict[str, np.ndarray]], generators: list[str]) -> dict:
    """For each generator method, the cosine of its adapters' δ to each baseline's on the same tasks (mean over
    tasks with its t-interval): is a generated adapter nearer the task's own LoRA or the neighbours that
    retrieval and the mixture hand out."""
    out = {}
    for g in (g for g in generators if deltas.get(g) and f", {SEEN}" not in g):  # seen rows have no held-out rival
        part = f", {LOFO}" if g.endswith(f", {LOFO}") else ""
        row = {}
        for r in (f"{m.label}{part}" for m in METHODS.values() if m.baseline and f"{m.label}{part}" in deltas):
            tasks = sorted(set(deltas[g]) & set(deltas[r]))
            if len(tasks) >= 2:
                row[r] = t_interval([_cos(deltas[g][t], deltas[r][t]) for t in tasks])
        out[g] = row
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _delta_separation(
    deltas: dict[str, dict[str, np.ndarray]], domains: dict[str, str], permutations: int = 200
) -> dict:
    """Silhouette and 1-NN retrieval by family of each method's adapters in δ space (one per task), beside the
    same statistics of the tasks' own LoRAs (the oracle) on the same tasks: whether the adapters a method hands
    out keep the families apart in behaviour as the true ones do (permutation p-values)."""
    ref = deltas.get(ORACLE, {})
    out = {}
    for name, d in deltas.items():
        tasks = sorted(set(d) & set(ref))
        labels = [domains[t] for t in tasks]
        if not 2 <= len(set(labels)) < len(tasks):
            continue  # a silhouette needs two families and a family with two tasks

        def sep(x: dict[str, np.ndarray], tasks=tasks, labels=labels) -> dict:
            m = np.stack([x[t] for t in tasks]).astype(np.float64)
            return _separation(m.tobytes(), m.shape, tuple(labels), permutations)

        out[name] = {"n_tasks": len(tasks), "method": sep(d), "own_loras": sep(ref)}
    return out


@functools.lru_cache(maxsize=512)
def _separation(x: bytes, shape: tuple[int, int], labels: tuple[str, ...], permutations: int) -> dict:
    """``separation`` of the rows of an array given as bytes, remembered: ``cv.json`` is rewritten after every
    cell, and most methods' δ have not changed since the last time."""
    rows = np.frombuffer(x, dtype=np.float64).reshape(shape)
    return separation(cosine_distance(rows), labels, permutations)


def _curves(records: Records, cells: list[Cell]) -> dict:
    """A generator method's training and validation curves (first seed of each fold) and its kept steps."""
    recs = [(c, records[c]) for c in cells if c.method == GENERATOR and c.prompts == "own"]
    recs = [(c, r[0]) for c, r in recs if r and "curves" in r[0]]
    if not recs:
        return {}
    return {
        "curves": {c.name.rsplit(" [", 1)[1].rstrip("]"): r["curves"] for c, r in recs},
        "best_steps": [r.get("best_step") for _, r in recs],
    }


def write_cv(preset: Preset, store: CellStore, results_dir: Path, cells: list[Cell], domains: dict[str, str]) -> Path:
    """``<results_dir>/cv.json``: every method's accuracy per task over all folds, and the declared comparisons
    with Holm-adjusted p-values and verdicts (a comparison whose cells have not run yet is left out)."""
    records: Records = {c: store.records(c, preset.experiment.seeds) for c in cells if c.rq == CV}
    groups: dict[str, list[Cell]] = {}
    for c in records:
        groups.setdefault(c.name.rsplit(" [", 1)[0], []).append(c)  # one method over its folds or families
    methods = {name: _per_task(records, cs) for name, cs in groups.items()}
    deltas = {name: d for name, (_, _, d, _) in methods.items()}
    generators = [n for n, cs in groups.items() if all(c.method == GENERATOR and c.prompts == "own" for c in cs)]
    declared = declared_comparisons(preset)
    comparisons, p_values = {}, {}
    for a, b in declared:
        a_acc, a_hits, _, _ = methods.get(a, ({}, {}, {}, {}))
        b_acc, b_hits, _, _ = methods.get(b, ({}, {}, {}, {}))
        common = sorted(set(a_acc) & set(b_acc))
        if len(common) < 2:
            continue  # not run yet
        key = f"{a} - {b}"
        tasks_test = across_tasks({t: a_acc[t] for t in common}, {t: b_acc[t] for t in common})
        items_test = bootstrap_items({t: a_hits[t] for t in common}, {t: b_hits[t] for t in common})
        ratio = statistics.fmean(a_acc[t] for t in common) / max(1e-12, statistics.fmean(b_acc[t] for t in common))
        comparisons[key] = {"across_tasks": tasks_test, "across_items": items_test, "ratio_of_means": ratio}
        p_values[key] = tasks_test["p_wilcoxon"]
    for key, p_adj in holm(p_values).items():
        c = comparisons[key]
        c["p_holm"] = p_adj
        c["verdict"] = verdict(c["across_tasks"]["diff_ci"], p_adj)
    out = {
        "rq": CV,
        **declaration(preset, domains),
        "methods": {
            name: {
                "per_task": acc,
                "mean": statistics.fmean(acc.values()),
                "train_seconds": _seconds(records, groups[name]),
                "cell_seconds": round(sum(rec.get("seconds", 0.0) for c in groups[name] for rec in records[c])),
                "delta_cos": t_interval(list(cosines.values())) if len(cosines) >= 2 else None,
                **_curves(records, groups[name]),
            }
            for name, (acc, _, _, cosines) in methods.items()
            if acc
        },
        "comparisons": comparisons,
        "delta_separation": _delta_separation(deltas, domains),
        "delta_similarity": _delta_similarity(deltas, generators),
        # wall time of every finished cell and seed (generator training and scoring), summed: the run's CPU budget
        "cell_seconds": round(sum(rec.get("seconds", 0.0) for recs in records.values() for rec in recs)),
    }
    f = results_dir / f"{CV}.json"
    atomic_write_json(f, out)
    return f
