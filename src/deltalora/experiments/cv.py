"""Cross-validation over tasks: every task held out once, folds stratified by domain, paired tests with Holm.

Each fold trains the generators (and builds the retrieval index, the mixture, the multi-task LoRA and the mean
adapter) on every task outside the fold and scores the fold's tasks. Every method is scored on the same items
of the same tasks, so the comparisons declared here before the run (each ``experiment.cv_variants`` generator
against each baseline) are paired: across tasks (Wilcoxon, sign test, t-interval of the mean difference) and
across items (bootstrap within tasks), with Holm's correction over the declared family.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import numpy as np

from deltalora.config import Preset
from deltalora.data.items import stable_seed
from deltalora.errors import ConfigError
from deltalora.experiments.cells import CellStore
from deltalora.experiments.grid import GENERATOR, METHODS, Cell, baselines
from deltalora.io import atomic_write_json
from deltalora.stats import across_tasks, bootstrap_items, holm, verdict

CV = "cv"


def family_folds(domains: dict[str, str], k: int, seed: int = 0) -> list[tuple[str, ...]]:
    """k disjoint held-out sets that cover every task once; each domain's tasks are dealt round-robin after a
    seeded shuffle, continuing where the previous domain stopped, so every fold holds out about 1/k of every
    domain and keeps the rest of it for training."""
    if not 2 <= k <= len(domains):
        raise ConfigError(f"experiment.folds must be between 2 and the number of tasks ({len(domains)}), got {k}")
    folds: list[list[str]] = [[] for _ in range(k)]
    rng = random.Random(stable_seed("folds", seed))
    at = 0
    for d in sorted(set(domains.values())):
        tasks = sorted(t for t, dom in domains.items() if dom == d)
        rng.shuffle(tasks)
        for t in tasks:
            folds[at % k].append(t)
            at += 1
    return [tuple(sorted(f)) for f in folds]


def cv_cells(preset: Preset, domains: dict[str, str]) -> list[Cell]:
    """The cross-validation cells (none when ``experiment.folds`` is 0): per fold, every baseline and every
    ``cv_variants`` generator, named ``<method> [fold i]``."""
    ex = preset.experiment
    if not ex.folds:
        return []
    cells = []
    for i, held in enumerate(family_folds({t: domains[t] for t in preset.pool}, ex.folds, ex.fold_seed)):
        train = tuple(t for t in preset.pool if t not in held)
        rows = baselines(CV, held, train) + [
            Cell(CV, v, GENERATOR, held, train, (("variant", v),)) for v in ex.cv_variants
        ]
        cells += [Cell(c.rq, f"{c.name} [fold {i}]", c.method, c.tasks, c.train, c.changes) for c in rows]
    return cells


def _per_task(store: CellStore, cells: list[Cell]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """A method's accuracy per task and its hit rate per item (averaged over seeds and prompt draws)."""
    acc, item_hits = {}, {}
    for cell in cells:
        rows = [rec["tasks"] for rec in store.records(cell)]
        for t in cell.tasks:
            runs = [r for rec in rows for r in rec.get(t, [])]
            if runs:
                acc[t] = statistics.fmean(r["acc"] for r in runs)
                item_hits[t] = np.mean([r["hits"] for r in runs], 0).tolist()
    return acc, item_hits


def write_cv(preset: Preset, store: CellStore, results_dir: Path, cells: list[Cell]) -> Path:
    """``<results_dir>/cv.json``: every method's accuracy per task over all folds, and the declared comparisons
    (each cv variant minus each baseline other than the oracle) with Holm-adjusted p-values and verdicts."""
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        if c.rq == CV:
            groups.setdefault(c.name.rsplit(" [fold ", 1)[0], []).append(c)
    methods = {name: _per_task(store, cs) for name, cs in groups.items()}
    ex = preset.experiment
    labels = {m.name: m.label for m in METHODS.values()}
    rivals = [labels[m.name] for m in METHODS.values() if m.baseline and m.name != "oracle"]
    comparisons, p_values = {}, {}
    for v in ex.cv_variants:
        for b in rivals:
            a_acc, a_hits = methods.get(v, ({}, {}))
            b_acc, b_hits = methods.get(b, ({}, {}))
            common = sorted(set(a_acc) & set(b_acc))
            if len(common) < 2:
                continue  # not run yet
            key = f"{v} - {b}"
            tasks_test = across_tasks({t: a_acc[t] for t in common}, {t: b_acc[t] for t in common})
            items_test = bootstrap_items({t: a_hits[t] for t in common}, {t: b_hits[t] for t in common})
            comparisons[key] = {"across_tasks": tasks_test, "across_items": items_test}
            p_values[key] = tasks_test["p_wilcoxon"]
    for key, p_adj in holm(p_values).items():
        c = comparisons[key]
        c["p_holm"] = p_adj
        c["verdict"] = verdict(c["across_tasks"]["diff_ci"], p_adj)
    out = {
        "rq": CV,
        "preset": preset.name,
        "folds": ex.folds,
        "declared_comparisons": [f"{v} - {b}" for v in ex.cv_variants for b in rivals],
        "methods": {
            name: {"per_task": acc, "mean": statistics.fmean(acc.values())} for name, (acc, _) in methods.items() if acc
        },
        "comparisons": comparisons,
    }
    f = results_dir / f"{CV}.json"
    atomic_write_json(f, out)
    return f
