"""Cross-validation over tasks: every task held out once, folds stratified by domain, paired tests with Holm.

Each fold trains the generators (and builds the retrieval index, the mixture, the multi-task LoRA and the mean
adapter) on every task outside the fold and scores the fold's tasks; its generators also score the next fold's
tasks, which they were trained on, and are conditioned on other-family and random-text prompts too (prompt
sensitivity). Every method is scored on the same items of the same tasks, so the comparisons declared here before
the run (``declared_comparisons``) are paired in ``cv_results.write_cv``: across tasks (Wilcoxon, sign test,
t-interval of the mean difference) and across items (bootstrap within tasks), with Holm's correction over the
declared family.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

from deltalora.config import ExperimentConfig, GeneratorConfig, Preset, config_from_dict
from deltalora.data.items import stable_seed
from deltalora.errors import ConfigError
from deltalora.experiments.grid import GENERATOR, METHODS, PROMPT_SOURCES, WARM_FROM, Cell, ablations, baselines
from deltalora.experiments.questions import CONTROLS, DELTA, RQ1, RQ2, RQ3, Question
from deltalora.generator.variants import VARIANTS, baseline
from deltalora.io import atomic_write_json, read_json

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


def task_subset(train: tuple[str, ...], domains: dict[str, str], f: float, seed: int = 0) -> tuple[str, ...]:
    """A fraction f of the training tasks, ceil(f·n) of each domain's n (at least one), in the order given; nested:
    a smaller fraction keeps a subset of a larger one's tasks."""
    rng = random.Random(stable_seed("task subset", seed))
    keep = set()
    for d in sorted({domains[t] for t in train}):
        tasks = sorted(t for t in train if domains[t] == d)
        rng.shuffle(tasks)
        keep |= set(tasks[: max(1, math.ceil(f * len(tasks)))])
    return tuple(t for t in train if t in keep)


LOFO = "held-out family"
"""Name part of the leave-one-family-out rows (``experiment.cv_lofo``)."""
SEEN = "seen"
"""Name part of the cells that score a fold's generators on training tasks (the next fold's held-out tasks)."""
ORACLE = METHODS["oracle"].label


def cv_cells(preset: Preset, domains: dict[str, str]) -> list[Cell]:
    """The cross-validation cells (none when ``experiment.folds`` is 0), named ``<method> [fold i]``. Per fold:
    every baseline and every ``cv_variants`` generator on the held-out tasks, the generators also from other-family
    and random-text prompts (prompt sensitivity), and the same generators on the next fold's tasks, which they were
    trained on (seen), from their own and from other-family prompts; every task is scored once held out and once
    seen. Then, per ``cv_lofo`` family, every baseline and cv variant built without the family, on its tasks."""
    ex = preset.experiment
    if not ex.folds:
        return []
    folds = family_folds({t: domains[t] for t in preset.pool}, ex.folds, ex.fold_seed)
    cells = []
    for i, held in enumerate(folds):
        train = tuple(t for t in preset.pool if t not in held)
        seen = folds[(i + 1) % len(folds)]
        rows = baselines(CV, held, train)
        for v in ex.cv_variants:
            ch = (("variant", v),)
            for name, tasks, sources in (
                (v, held, ("own", "other", "random")),
                (f"{v}, {SEEN}", seen, ("own", "other")),
            ):
                rows += [
                    Cell(
                        CV,
                        _named(name, src),
                        GENERATOR,
                        tasks,
                        train,
                        ch,
                        prompts=src,
                        n_seeds=0 if src == "own" else ex.cv_control_seeds,
                    )
                    for src in sources
                ]
        if i < ex.cv_warm_folds:
            rows += _warm_cells(preset, held, train)
            rows += [
                Cell(CV, v, GENERATOR, held, train, (("variant", v),), n_seeds=ex.cv_warm_seeds)
                for v in ex.cv_scratch_variants
            ]
            rows += _rq3_cells(preset, held, train, domains)
        cells += [dataclasses.replace(c, name=f"{c.name} [fold {i}]") for c in rows]
    for fam in ex.cv_lofo:
        held = tuple(t for t in preset.pool if domains[t] == fam)
        if not held:
            known = ", ".join(sorted({domains[t] for t in preset.pool}))
            raise ConfigError(f"experiment.cv_lofo: no pool task in family {fam!r}; the pool's families: {known}")
        train = tuple(t for t in preset.pool if domains[t] != fam)
        rows = baselines(CV, held, train)
        rows += [Cell(CV, v, GENERATOR, held, train, (("variant", v),)) for v in ex.cv_variants]
        cells += [dataclasses.replace(c, name=f"{c.name}, {LOFO} [family {fam}]") for c in rows]
    return cells


def _warm_rows(preset: Preset) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """The warm-started rows as (name, generator changes): the baseline continued for ``warm_steps`` (the same-steps
    control) and for ``warm_long_steps`` (the compute-matched one), each warm variant, and with
    ``cv_warm_ablations`` the ablations, all from the fold's baseline generator of the same seed."""
    ex, base = preset.experiment, baseline().name
    if not ex.cv_warm_variants:
        return []
    # every row keeps its last step: validation by weight MSE would favour the variants with a weight loss
    start = (("val_every", 0), (WARM_FROM, base))
    steps = (("steps", ex.warm_steps), *start)
    rows = [(_continued(ex), (("variant", base), *steps))]
    if ex.warm_long_steps:
        rows.append((_continued(ex, long=True), (("variant", base), ("steps", ex.warm_long_steps), *start)))
    rows += [(_warm(v), (("variant", v), *steps)) for v in ex.cv_warm_variants]
    if ex.cv_warm_ablations:
        rows += [(_warm(name), (*ch, *steps)) for name, ch in ablations(ex)]
    return rows


def _rq3_conditions(ex: ExperimentConfig) -> list[tuple[str, float | None, tuple[tuple[str, Any], ...]]]:
    """RQ3's conditions as (label, fraction of the training tasks or None, generator changes): fewer training tasks,
    and weights corrupted (noise, another task's) while every δ target stays the checkpoint's own."""
    out = [(f"{f:.0%} of the training tasks", f, ()) for f in ex.task_fractions]
    out += [
        (f"weight noise σ={s:g}, true δ", None, (("weight_noise", s), ("corrupt_delta", False)))
        for s in ex.weight_noise
    ]
    out += [
        (f"{m:.0%} mislabelled weights, true δ", None, (("mislabel_fraction", m), ("corrupt_delta", False)))
        for m in ex.mislabel
    ]
    return out


def _rq3_cells(preset: Preset, held: tuple[str, ...], train: tuple[str, ...], domains: dict[str, str]) -> list[Cell]:
    """With ``cv_rq3``: each ``rq3_variants`` generator, trained from scratch, under each RQ3 condition, and (when
    it is not a cv variant) without one, on one fold's held-out tasks."""
    ex = preset.experiment
    if not ex.cv_rq3:
        return []
    cells = []
    for v in ex.rq3_variants:
        if v not in (*ex.cv_variants, *ex.cv_scratch_variants):  # else its row is there already
            cells.append(Cell(CV, v, GENERATOR, held, train, (("variant", v),), n_seeds=ex.cv_warm_seeds))
        for label, f, ch in _rq3_conditions(ex):
            tasks = train if f is None else task_subset(train, domains, f, ex.fold_seed)
            cells.append(
                Cell(CV, f"{v}, {label}", GENERATOR, held, tasks, (("variant", v), *ch), n_seeds=ex.cv_warm_seeds)
            )
    return cells


def _continued(ex: ExperimentConfig, long: bool = False) -> str:
    base = baseline().name
    return f"{base} (continued, {ex.warm_long_steps} steps)" if long else f"{base} (continued)"


def _warm(name: str) -> str:
    return f"{name} (from {baseline().name})"


def _warm_cells(preset: Preset, held: tuple[str, ...], train: tuple[str, ...]) -> list[Cell]:
    """The warm-started rows' cells on one fold's held-out tasks."""
    n = preset.experiment.cv_warm_seeds
    return [Cell(CV, name, GENERATOR, held, train, ch, n_seeds=n) for name, ch in _warm_rows(preset)]


def _named(name: str, source: str) -> str:
    label = PROMPT_SOURCES[source].label
    return f"{name}, {label}" if label else name


def declared_comparisons(preset: Preset) -> list[tuple[str, str]]:
    """The comparisons ``cv.json`` tests, fixed by the config before any cell runs (one Holm family): each cv
    variant against each baseline but the oracle on held-out tasks; its prompt sensitivity (own prompts against
    other-family and random-text prompts) on held-out and seen tasks; its seen-task accuracy against the oracle's
    on the same items; each cv variant against the baseline variant (held out and seen); and each warm-started
    variant against the baseline continued for as many steps and against
    the baseline itself (on the warm folds' tasks), also against the baseline continued for ``warm_long_steps``; the
    ``cv_warm_pairs``; each warm-started ablation against its variant's warm-started row; with ``cv_lofo``, each
    cv variant against each baseline but the oracle on the held-out families; each ``cv_scratch_variants`` against
    the baseline; with ``cv_rq3``, RQ3's pairs."""
    return [(a, b) for a, b, _ in _tagged(preset.experiment)]


def question_of(experiment: dict[str, Any]) -> dict[str, str]:
    """Which research question (``questions.QUESTIONS``) each comparison declared by a run with this ``experiment``
    config answers, keyed ``"a - b"`` as in ``cv.json``."""
    return {f"{a} - {b}": q.id for a, b, q in _tagged(config_from_dict(ExperimentConfig, experiment))}


def _tagged(ex: ExperimentConfig) -> list[tuple[str, str, Question]]:
    rivals = [m.label for m in METHODS.values() if m.baseline and m.name != "oracle"]
    out = []
    for v in ex.cv_variants:
        out += [(v, b, RQ2) for b in rivals]
        out += [(v, _named(v, src), CONTROLS) for src in ("other", "random")]
        out += [(f"{v}, {SEEN}", _named(f"{v}, {SEEN}", "other"), CONTROLS), (f"{v}, {SEEN}", ORACLE, RQ1)]
    base = baseline().name
    others = [v for v in ex.cv_variants if v != base] if base in ex.cv_variants else []
    out += [(f"{v}{part}", f"{base}{part}", q) for v in others for part, q in (("", DELTA), (f", {SEEN}", RQ1))]
    if ex.cv_lofo:
        out += [(f"{v}, {LOFO}", f"{b}, {LOFO}", RQ2) for v in ex.cv_variants for b in rivals]
        out += [(f"{v}, {LOFO}", f"{base}, {LOFO}", DELTA) for v in others]
    if ex.cv_warm_variants:
        controls = [_continued(ex)] + ([_continued(ex, long=True)] if ex.warm_long_steps else [])
        for v in ex.cv_warm_variants:
            out += [(_warm(v), c, DELTA) for c in controls] + [(_warm(v), base, DELTA)]
        out += [(*(_warm(v) for v in pair.split(":")), DELTA) for pair in ex.cv_warm_pairs]
        if ex.cv_warm_ablations:
            out += [(_warm(name), _warm(dict(ch)["variant"]), CONTROLS) for name, ch in ablations(ex)]
    out += [(v, base, DELTA) for v in ex.cv_scratch_variants]
    if ex.cv_rq3:  # under each condition (and without): does δ supervision beat the baseline trained the same way
        for v in (v for v in ex.rq3_variants if VARIANTS[v].uses_delta):
            out.append((v, base, DELTA))
            out += [(f"{v}, {label}", f"{base}, {label}", RQ3) for label, _, _ in _rq3_conditions(ex)]
    first: dict[tuple[str, str], Question] = {}  # a variant both from scratch and in RQ3 is compared once
    for a, b, q in out:
        first.setdefault((a, b), q)
    return [(a, b, q) for (a, b), q in first.items()]


def declaration(preset: Preset, domains: dict[str, str]) -> dict:
    """What a cross-validation run tests, fixed by its config before any cell runs: the comparisons (one Holm
    family), the folds, and the experiment and generator configs."""
    ex = preset.experiment
    return {
        "preset": preset.name,
        "base": preset.base,
        "folds": ex.folds,
        "experiment": dataclasses.asdict(ex),
        "generator": dataclasses.asdict(preset.generator),
        "domains": {t: domains[t] for t in preset.pool},
        "declared_comparisons": [f"{a} - {b}" for a, b in declared_comparisons(preset)],
        "fold_tasks": [list(f) for f in family_folds({t: domains[t] for t in preset.pool}, ex.folds, ex.fold_seed)],
    }


DECLARED = "declared.json"
"""The declaration's file in a results folder."""


def declare(preset: Preset, domains: dict[str, str], results_dir: Path) -> Path:
    """Write ``<results_dir>/declared.json`` before the first cross-validation cell (commit it before the run), or
    check that this run matches the one there: the comparisons and folds cannot change once results exist."""
    f = Path(results_dir) / DECLARED
    new = json.loads(json.dumps(declaration(preset, domains)))
    if f.exists():
        old = read_json(f, "declaration")
        _drop_new_defaults(new, old)
        changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
        if changed:
            raise ConfigError(
                f"{f}: this run differs from the one declared in {', '.join(changed)}; use a new --results-dir "
                "(the declaration fixes the comparisons, folds and configs before any result is seen)"
            )
    else:
        atomic_write_json(f, new)
    return f


def _drop_new_defaults(new: dict, old: dict) -> None:
    """Remove from ``new`` the config fields added since ``old`` was declared that sit at their defaults: they
    change nothing the old declaration fixed."""
    for section, config in (("experiment", ExperimentConfig()), ("generator", GeneratorConfig())):
        defaults = json.loads(json.dumps(dataclasses.asdict(config)))
        for k in set(new[section]) - set(old.get(section, {})):
            if new[section][k] == defaults[k]:
                del new[section][k]


SHARED_FIELDS = ("seeds", "draws", "n_test", "n_kl", "steps", "mixture_k", "mixture_temperature")
SHARED_FIELDS += ("multitask_step_factor", "cv_control_seeds", "warm_steps")
"""Experiment fields that change what a cell of a given name computes; the others add or remove cells, or name
what they change (``warm_long_steps``)."""


def check_reuse(preset: Preset, domains: dict[str, str], folder: Path) -> Path:
    """The committed cells of another cross-validation run, which this run may read where it has a cell of the same
    name: refused unless its declaration has this run's preset, base, folds, generator config and
    ``SHARED_FIELDS``."""
    f = Path(folder) / DECLARED
    if not f.exists():
        raise ConfigError(f"--reuse {folder}: no {DECLARED}; it takes the results folder of a cross-validation run")
    old, new = read_json(f, "declaration"), json.loads(json.dumps(declaration(preset, domains)))
    _drop_new_defaults(new, old)
    new["experiment"] = {k: new["experiment"].get(k) for k in SHARED_FIELDS}
    old["experiment"] = {k: old.get("experiment", {}).get(k) for k in SHARED_FIELDS}
    keys = ("preset", "base", "domains", "fold_tasks", "generator", "experiment")
    if changed := [k for k in keys if old.get(k) != new.get(k)]:
        raise ConfigError(
            f"--reuse {f}: its run differs from this one in {', '.join(changed)}; its cells are not this run's"
        )
    return f.parent / "cells"
