"""The research questions (RQ1-RQ4), ablations and negative controls as a grid of cells.

A *generator run* (config changes, training tasks, seed) is trained once and shared by
every cell that scores it. A *cell* scores one method on a list of tasks; its result for
each generator seed is cached, so a rerun skips finished work and a killed run resumes.
Conditioning prompts always come from a task's train split and scored items from its test
split, so no scored item ever conditions a generator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from deltalora.config import ExperimentConfig, Preset
from deltalora.generator.mixture import MIXTURE
from deltalora.generator.retrieval import RETRIEVAL
from deltalora.generator.variants import VARIANTS, baseline, weighted_by

RQS = ("rq1", "rq2", "rq2_lodo", "rq3", "rq4", "ablations", "cv")
METRICS = ("acc", "param_mse", "delta_dist", "delta_cos", "kl")

GENERATOR = "generator"
MULTITASK = "multitask"


@dataclass(frozen=True)
class Method:
    """How one kind of cell gets its adapters; the planner, runner, results and report read these specs."""

    name: str
    """The cell's ``method`` field."""
    label: str
    """Row label of its baseline cells (unused for generators, which are labelled by variant)."""
    summary: str
    """One line for the report's setup section."""
    seeded: bool = False
    """Run once per generator seed (its adapters depend on the seed's prompt draws), else once."""
    baseline: bool = True
    """A reference row of every RQ1 / RQ2 / leave-one-domain-out table."""
    uses_train: bool = True
    """Its adapters come from the training tasks (the cell's ``train``)."""
    picks: bool = False
    """Its score rows name the zoo adapters it picked (``retrieved``), summarised per task."""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("base", "base model", "the base model without an adapter", uses_train=False),
        Method("oracle", "oracle (the task's own LoRA)", "the scored task's own zoo LoRA", uses_train=False),
        Method("train_avg", "mean of training adapters", "the element-wise mean of the training tasks' LoRAs"),
        Method(
            RETRIEVAL,
            RETRIEVAL,
            "the training task's LoRA whose mean prompt embedding is nearest to the prompt draw's",
            seeded=True,
            picks=True,
        ),
        Method(
            MIXTURE,
            "top-k retrieval mixture",
            "the k nearest training tasks' LoRAs summed exactly (rank k·r), weighted by softmax(cosine / T)",
            seeded=True,
            picks=True,
        ),
        Method(
            MULTITASK,
            "multi-task LoRA",
            "one LoRA trained with the zoo's recipe on the union of the training tasks' train items",
        ),
        Method(GENERATOR, "", "a trained generator's LoRA from a prompt draw", seeded=True, baseline=False),
    )
}
"""Every method a cell may name (``Cell.method``)."""


@dataclass(frozen=True)
class PromptSource:
    """Where the prompts that condition a cell's generators (and retrieval) come from."""

    name: str
    """The cell's ``prompts`` field."""
    label: str
    """Suffix of the cell names that use it ("" for the task's own prompts)."""
    summary: str
    """One line for the report."""


PROMPT_SOURCES: dict[str, PromptSource] = {
    s.name: s
    for s in (
        PromptSource("own", "", "the scored task's own train-split prompts"),
        PromptSource(
            "other", "other-family prompts", "train-split prompts of a task from another domain (a negative control)"
        ),
        PromptSource(
            "random",
            "random-text prompts",
            "word salad: each of the task's train prompts replaced by as many words drawn at random from every pool "
            "task's train prompts (the words of the pool, none of its structure)",
        ),
    )
}
"""Every prompt source a cell may name; prompt sensitivity is a method's accuracy from ``own`` minus from the
others."""


@dataclass(frozen=True)
class Cell:
    """One method scored on a list of tasks."""

    rq: str
    """The result file it belongs to (one of ``RQS``)."""
    name: str
    """Row label in the tables."""
    method: str
    """A key of ``METHODS``."""
    tasks: tuple[str, ...]
    """Tasks whose test items are scored."""
    train: tuple[str, ...] = ()
    """Training tasks of the generator, the retrieval index or the averaged adapters."""
    changes: tuple[tuple[str, Any], ...] = ()
    """GeneratorConfig fields that differ from the preset (the variant among them)."""
    prompts: str = "own"
    """A key of ``PROMPT_SOURCES``: the scored task's train prompts, another domain's, or random text."""
    n_seeds: int = 0
    """A seeded cell runs the first this many of the experiment's seeds (0: all of them)."""

    def __post_init__(self) -> None:
        if self.prompts not in PROMPT_SOURCES:
            raise ValueError(f"cell {self.name!r}: prompts must be one of {', '.join(PROMPT_SOURCES)}")

    @property
    def id(self) -> str:
        """A file-name-safe identifier of the cell."""
        return f"{self.rq}__" + "".join(c if c.isalnum() or c in "._-" else "_" for c in self.name)

    @property
    def seeded(self) -> bool:
        """True if the cell is run once per generator seed."""
        return METHODS[self.method].seeded

    def seeds(self, all_seeds: tuple[int, ...]) -> tuple[int | None, ...]:
        """The generator seeds this cell runs (``(None,)``: once, unseeded)."""
        if not self.seeded:
            return (None,)
        return all_seeds[: self.n_seeds] if self.n_seeds else all_seeds


def plan(preset: Preset, domains: dict[str, str]) -> list[Cell]:
    """Every cell, most important first (a partial run then still answers RQ1 and RQ2)."""
    ex = preset.experiment
    train = tuple(t for t in preset.pool if t not in ex.held_out)
    seen, held = ex.seen_eval, ex.held_out
    cells: list[Cell] = []
    for rq, tasks in (("rq1", seen), ("rq2", held)):
        cells += baselines(rq, tasks, train)
    for v in ex.variants:
        cells += [
            Cell(rq, v, GENERATOR, tasks, train, (("variant", v),)) for rq, tasks in (("rq1", seen), ("rq2", held))
        ]
    base = baseline().name
    if ex.long_steps and base in ex.variants:  # the baseline is cheap per step: also give it the δ variants' wall time
        cells += [
            Cell(
                rq,
                f"{base}, {ex.long_steps} steps (compute-matched)",
                GENERATOR,
                tasks,
                train,
                (("variant", base), ("steps", ex.long_steps)),
            )
            for rq, tasks in (("rq1", seen), ("rq2", held))
        ]
    a = ex.ablation_variant
    # the main grid's generators on the ablation and RQ3 tasks: their scores are shared, nothing is recomputed
    main_rows = [
        Cell(
            "ablations",
            f"{v} (main grid{', |P|=5, λ_δ=1' if VARIANTS[v].uses_delta else ': no δ loss'})",
            GENERATOR,
            seen + held,
            train,
            (("variant", v),),
        )
        for v in dict.fromkeys((base, a))
        if v in ex.variants
    ]
    main_rows += [
        Cell("rq3", f"{v}, all data, clean (main grid)", GENERATOR, seen, train, (("variant", v),))
        for v in ex.rq3_variants
        if v in ex.variants
    ]
    control, *sweep_rows = ablations(ex)
    shuffled = [Cell("ablations", control[0], GENERATOR, seen + held, train, control[1])]
    other = [
        Cell(
            "ablations",
            f"{v}, prompts of another domain (control)",
            GENERATOR,
            seen + held,
            train,
            (("variant", v),),
            prompts="other",
        )
        for v in (base, a)
        if v in ex.variants
    ]
    lodo: list[Cell] = []
    if ex.lodo_domain:
        lodo_train = tuple(t for t in preset.pool if domains[t] != ex.lodo_domain)
        lodo_eval = ex.lodo_eval or tuple(t for t in preset.pool if domains[t] == ex.lodo_domain)
        lodo += baselines("rq2_lodo", lodo_eval, lodo_train)
        lodo += [Cell("rq2_lodo", v, GENERATOR, lodo_eval, lodo_train, (("variant", v),)) for v in ex.lodo_variants]
    rq3 = {
        v: [
            Cell("rq3", f"{v}, {f:.0%} of the data", GENERATOR, seen, train, (("variant", v), ("data_fraction", f)))
            for f in ex.fractions
        ]
        + [
            Cell("rq3", f"{v}, weight noise σ={s:g}", GENERATOR, seen, train, (("variant", v), ("weight_noise", s)))
            for s in ex.weight_noise
        ]
        + [
            Cell("rq3", f"{v}, {m:.0%} mislabelled", GENERATOR, seen, train, (("variant", v), ("mislabel_fraction", m)))
            for m in ex.mislabel
        ]
        for v in ex.rq3_variants
    }
    cheap_rq3 = [c for v, cs in rq3.items() if not VARIANTS[v].needs_base for c in cs]
    costly_rq3 = [c for v, cs in rq3.items() if VARIANTS[v].needs_base for c in cs]
    sweeps = [Cell("ablations", name, GENERATOR, seen + held, train, ch) for name, ch in sweep_rows]
    # run order = priority: the negative control and every protocol before the costlier sweeps
    cells += main_rows + shuffled + lodo + cheap_rq3 + other + costly_rq3 + sweeps
    return [c for c in cells if c.tasks]  # a preset without seen or held-out tasks (families) runs --only cv


def ablations(ex: ExperimentConfig) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """The ablation rows as (name, generator changes): first the negative control (``ablation_variant`` with δ
    shuffled across tasks), then its probe-set sizes and λ_δ values, then the KL variant's (C's) λ_KL values."""
    a = ex.ablation_variant
    rows = [(f"{a}, δ shuffled across tasks (control)", (("variant", a), ("shuffle_delta", True)))]
    rows += [(f"{a}, |P|={p}", (("variant", a), ("n_probes", p))) for p in ex.probe_sizes]
    rows += [(f"{a}, λ_δ={lam:g}", (("variant", a), ("lambda_delta", lam))) for lam in ex.lambdas]
    kl = weighted_by("lambda_kl").name
    rows += [(f"{kl}, λ_KL={lam:g}", (("variant", kl), ("lambda_kl", lam))) for lam in ex.kl_lambdas]
    return rows


def baselines(rq: str, tasks: tuple[str, ...], train: tuple[str, ...]) -> list[Cell]:
    """One cell per baseline method (``Method.baseline``) on these tasks, with these training tasks."""
    return [Cell(rq, m.label, m.name, tasks, train if m.uses_train else ()) for m in METHODS.values() if m.baseline]


WARM_FROM = "warm_from"
"""A cell change naming the variant whose generator (same training tasks and seed) warm-starts this one."""


def generator_preset(preset: Preset, cell: Cell, seed: int, init_from: str = "") -> Preset:
    """The preset a cell's generator of this seed is trained with (``init_from``: the folder its ``warm_from``
    change resolved to)."""
    ex = preset.experiment
    changes = {k: v for k, v in cell.changes if k != WARM_FROM}
    gen = dataclasses.replace(
        preset.generator,
        **{"steps": ex.steps, "stage1_steps": ex.steps, "seed": seed, **changes, "init_from": init_from},
    )
    return preset.replace(generator=gen)


def warm_source(cell: Cell) -> Cell | None:
    """The cell whose generator warm-starts this cell's (same rq, tasks and training tasks), if any."""
    variant = dict(cell.changes).get(WARM_FROM)
    if variant is None:
        return None
    return Cell(cell.rq, variant, GENERATOR, cell.tasks, cell.train, (("variant", variant),))
