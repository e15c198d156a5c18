"""RQ4: composing two tasks' behaviours, scored on both tasks' test items.

Methods per zoo pair (a, b): each task's own LoRA; the LoRA trained on the union (the
zoo's pair adapter); exact LoRA addition (PEFT ``cat``: Σ B·A at rank 2r); PEFT's ``svd``
merge back to rank r; variant B's G_θ decoding δ_a + δ_b and α·δ_a + (1-α)·δ_b; and the
generators given half their prompts from each task. The generators are the main grid's (RQ1's); a preset without
that grid (cross-validation only) composes with its first fold's generators trained from scratch on their own
prompts, which were trained on some of the pairs' tasks and not on the others (``rq4.json`` says which).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltalora.data.items import stable_seed
from deltalora.delta.analysis import cos
from deltalora.experiments.cv import CV
from deltalora.experiments.grid import GENERATOR, Cell
from deltalora.experiments.runner import Runner
from deltalora.experiments.scoring import mean_std
from deltalora.generator.artifact import load_generator
from deltalora.generator.generate import choose_prompts, generate_tensors
from deltalora.generator.variants import VARIANTS
from deltalora.io import atomic_write_json, file_lock, read_json
from deltalora.stats import across_tasks, bootstrap_items, holm, verdict

_PEFT_MERGES = {"LoRA sum (PEFT cat, rank 2r)": "cat", "PEFT svd merge (rank r)": "svd"}


def run_composition(runner: Runner, cells: list[Cell]) -> Path:
    """Every method on every zoo pair, cached per method in the results folder; writes and returns ``rq4.json``."""
    pre, ex = runner.preset, runner.preset.experiment
    main = composition_generators(cells)
    paired = {t for p in pre.pairs for t in p}
    for a, b in pre.pairs:
        _pair(runner, main, a, b)
    _settled(runner.results_dir / "composition")
    pairs = {f"{a}+{b}": _summary(_cache(runner, a, b), a, b) for a, b in pre.pairs}
    units = {f"{k}|{t}": per for k, p in pairs.items() for t, per in p.pop("units").items()}
    out = {
        "rq": "rq4",
        "preset": pre.name,
        "base": pre.base,
        "experiment": {
            "seeds": list(ex.seeds),
            "draws": ex.draws,
            "n_test": ex.n_test,
            "interpolations": list(ex.interpolations),
        },
        "generators": {
            name: {"cell": c.name, "n_train": len(c.train), "not_trained_on": sorted(paired - set(c.train))}
            for name, c in main.items()
        },
        "pairs": pairs,
        "comparisons": _paired(units),
        "base_acc": {t: runner.scorer.ref(t).base_acc for p in pre.pairs for t in p},
    }
    f = runner.results_dir / "rq4.json"
    atomic_write_json(f, out)
    return f


def composition_generators(cells: list[Cell]) -> dict[str, Cell]:
    """The generators RQ4 composes with, by name: the main grid's RQ1 generators, or else the first
    cross-validation fold's generators trained from scratch and conditioned on the scored task's prompts (named by
    their variant)."""
    main = {c.name: c for c in cells if c.rq == "rq1" and c.method == GENERATOR}
    if main:
        return main
    plain = [c for c in cells if c.rq == CV and c.method == GENERATOR and c.prompts == "own"]
    # the rows named by their variant alone (not a warm start, an RQ3 condition or the seen-task scoring)
    return {v: c for c in plain if (v := c.name.removesuffix(" [fold 0]")) in VARIANTS}


def _cache(runner: Runner, a: str, b: str) -> Path:
    """A pair's per-method results: beside ``rq4.json``, committed, so a rerun resumes from them."""
    return runner.results_dir / "composition" / f"{a}+{b}"


def _settled(root: Path) -> None:
    """Wait until no other process holds a method of any pair: a summary taken while one still scores would
    leave its result out of ``rq4.json`` (the last process to finish writes the file everyone reads)."""
    for lock in sorted(root.glob("*/*.lock")):
        with file_lock(lock, block=True):
            pass


def _pair(runner: Runner, main: dict[str, Cell], a: str, b: str) -> None:
    """Every method on one pair, each cached in its own file; a method another process holds is left to it."""
    ex = runner.preset.experiment
    cache = _cache(runner, a, b)
    ref_a, ref_b = runner.scorer.ref(a), runner.scorer.ref(b)

    union = runner.scorer.manifest.union(a, b)
    union_delta = runner.scorer.deltas.get(union[0].path) if union else None

    def both(tensors: dict[str, torch.Tensor] | None) -> dict:
        """The adapter's metrics on each task and, when the union LoRA has δ, its δ's cosine to that δ."""
        if tensors is None:  # the PEFT model's active adapter is what is scored
            scored = {t: runner.scorer.score_active(t) for t in (a, b)}
        else:
            rows = {t: runner.score(t, tensors) for t in (a, b)}
            # device: cpu - the row's δ list, beside the zoo's δ on the CPU
            scored = {t: (r, torch.tensor(r.pop("delta"))) for t, r in rows.items()}
        out: dict[str, Any] = {t: m for t, (m, _) in scored.items()}
        if union_delta is not None:  # δ reads the adapter alone, not the task: either task's is the same
            out[UNION_COS] = cos(scored[a][1], union_delta)
        return out

    def cached(name: str, make) -> None:
        f = cache / ("".join(c if c.isalnum() else "_" for c in name) + ".json")
        if f.exists():
            return
        with file_lock(f.with_suffix(".lock")) as mine:  # another experiment process may be on it
            if mine and not f.exists():
                atomic_write_json(f, {"method": name, "adapters": make()})

    cached(f"{a} LoRA", lambda: [both(ref_a.ref_tensors[0])])
    cached(f"{b} LoRA", lambda: [both(ref_b.ref_tensors[0])])
    if union:
        cached("union LoRA (trained on both tasks)", lambda: [both(runner.scorer.tensors(union[0]))])
    for label, kind in _PEFT_MERGES.items():
        cached(label, lambda kind=kind: [_peft_merge(runner, a, b, kind, both)])
    for name in (n for n, c in main.items() if VARIANTS[dict(c.changes)["variant"]].decodes_delta):
        for seed in main[name].seeds(ex.seeds):
            gen = runner.trained_generator(main[name], seed)
            for alpha in (1.0, *ex.interpolations):
                label = f"{name}: G(δa + δb)" if alpha == 1.0 else f"{name}: G({alpha:g}·δa + {1 - alpha:g}·δb)"
                w_a, w_b = (1.0, 1.0) if alpha == 1.0 else (alpha, 1 - alpha)
                delta = w_a * ref_a.ref_delta + w_b * ref_b.ref_delta
                cached(f"{label} seed{seed}", lambda g=gen, d=delta: [both(_decode_delta(g, d, runner.scorer.device))])
    for v in ex.mixed_variants:
        if v not in main:
            continue
        for seed in main[v].seeds(ex.seeds):
            cached(f"{v} on mixed prompts seed{seed}", lambda v=v, seed=seed: _mixed(runner, main[v], seed, a, b, both))


def _peft_merge(runner: Runner, a: str, b: str, kind: str, both) -> dict:
    """Load both adapters next to the scorer's, merge with PEFT, score, and remove them again."""
    model, root = runner.scorer.model, runner.scorer.ws.zoo
    names = ["compose_a", "compose_b", f"compose_{kind}"]
    try:
        on = str(runner.scorer.device)  # PEFT's default is the first GPU whenever one exists
        model.load_adapter(str(root / runner.scorer.final_adapters(a)[0].path), adapter_name=names[0], torch_device=on)
        model.load_adapter(str(root / runner.scorer.final_adapters(b)[0].path), adapter_name=names[1], torch_device=on)
        model.add_weighted_adapter(names[:2], [1.0, 1.0], adapter_name=names[2], combination_type=kind)
        model.set_adapter(names[2])
        return both(None)
    finally:
        model.set_adapter("default")
        for n in names:
            if n in model.peft_config:
                model.delete_adapter(n)


@torch.inference_mode()
def _decode_delta(gen_dir: Path, delta: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    gen = load_generator(gen_dir, device)
    tokens = gen.model.from_delta(delta[None].to(device) / gen.delta_scale)
    return {k: v[0].cpu() for k, v in gen.tokenizer.decode(tokens).items()}


def _mixed(runner: Runner, cell: Cell, seed: int, a: str, b: str, both) -> list[dict]:
    gen = load_generator(runner.trained_generator(cell, seed), runner.scorer.device)
    n = gen.card.n_prompts
    pa, pb = ([it.prompt for it in runner.tasks[t].train] for t in (a, b))
    out = []
    for d in range(runner.preset.experiment.draws):
        half_a = choose_prompts(pa, n // 2, stable_seed(a, b, seed, d))
        half_b = choose_prompts(pb, n - n // 2, stable_seed(b, a, seed, d))
        out.append(both(generate_tensors(gen, runner.encoder, half_a + half_b, stable_seed("mixed", seed, d))))
    return out


def _summary(cache: Path, a: str, b: str) -> dict:
    """One row per method: accuracy on each task and their mean, over all its adapters (and seeds); and, under
    ``units``, each method's accuracy and per-item hit rate on each task (the own LoRAs named by their role)."""
    groups: dict[str, list[dict]] = {}
    for f in sorted(cache.glob("*.json")):
        rec = read_json(f, "composition result")
        groups.setdefault(rec["method"].rsplit(" seed", 1)[0], []).extend(rec["adapters"])
    rows, units = {}, {a: {}, b: {}}
    for method, adapters in groups.items():
        rows[method] = {
            "acc_a": mean_std([x[a]["acc"] for x in adapters]),
            "acc_b": mean_std([x[b]["acc"] for x in adapters]),
            "acc_mean": mean_std([statistics.fmean((x[a]["acc"], x[b]["acc"])) for x in adapters]),
            "delta_cos_a": mean_std([x[a]["delta_cos"] for x in adapters]),
            "delta_cos_b": mean_std([x[b]["delta_cos"] for x in adapters]),
            UNION_COS: mean_std(cs) if (cs := [x[UNION_COS] for x in adapters if UNION_COS in x]) else None,
        }
        for t in (a, b):
            role = OWN if method == f"{t} LoRA" else OTHER if method in (f"{a} LoRA", f"{b} LoRA") else method
            hits = np.mean([x[t]["hits"] for x in adapters], 0)
            units[t][role] = (float(hits.mean()), hits.tolist())
    return {"tasks": [a, b], "methods": rows, "units": units}


UNION = "union LoRA (trained on both tasks)"
UNION_COS = "delta_cos_union"
"""Cosine of an adapter's δ to the union LoRA's: how much it behaves like the adapter trained on both tasks."""
OWN, OTHER = "the scored task's own LoRA", "the other task's LoRA"


def declared_rq4(methods: set[str]) -> list[tuple[str, str]]:
    """RQ4's comparisons, fixed by the method list: every composition (interpolations at α = 0.5 only), and each
    task's own LoRA, against the LoRA trained on the union; each decoded δ sum against the exact LoRA sum (PEFT
    ``cat``)."""
    fixed = {UNION, OWN, OTHER}
    # an interpolation other than α = 0.5 weighs the scored task differently in a pair's two units: left out
    lopsided = {m for m in methods if "·δa" in m and "G(0.5·δa" not in m}
    out = [(m, UNION) for m in sorted(methods - fixed - lopsided)] + [(OWN, UNION)]
    out += [(m, "LoRA sum (PEFT cat, rank 2r)") for m in sorted(methods) if m.endswith("G(δa + δb)")]
    return [(a, b) for a, b in out if {a, b} <= methods]


def _paired(units: dict[str, dict[str, tuple[float, list[float]]]]) -> dict:
    """Each declared RQ4 comparison, paired over (pair, task) units scored by both methods: the t-interval and
    Wilcoxon across units, the item bootstrap, Holm over the list and a verdict."""
    methods = {m for per in units.values() for m in per}
    out, p_values = {}, {}
    for a, b in declared_rq4(methods):
        both = [u for u, per in units.items() if a in per and b in per]
        if len(both) < 2:
            continue
        key = f"{a} - {b}"
        out[key] = {
            "across_tasks": across_tasks({u: units[u][a][0] for u in both}, {u: units[u][b][0] for u in both}),
            "across_items": bootstrap_items({u: units[u][a][1] for u in both}, {u: units[u][b][1] for u in both}),
        }
        p_values[key] = out[key]["across_tasks"]["p_wilcoxon"]
    for key, p in holm(p_values).items():
        out[key]["p_holm"] = p
        out[key]["verdict"] = verdict(out[key]["across_tasks"]["diff_ci"], p)
    return out
