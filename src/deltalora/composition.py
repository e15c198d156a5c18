"""RQ4: composing two tasks' behaviours, scored on both tasks' test items.

Methods per zoo pair (a, b): each task's own LoRA; the LoRA trained on the union (the
zoo's pair adapter); exact LoRA addition (PEFT ``cat``: Σ B·A at rank 2r); PEFT's ``svd``
merge back to rank r; variant B's G_θ decoding δ_a + δ_b and α·δ_a + (1-α)·δ_b; and the
main generators given half their prompts from each task.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .assess import mean_std
from .experiments import Cell, Runner, claimed
from .generator import choose_prompts, generate_tensors, load_generator
from .io import atomic_write_json, read_json
from .tasks import stable_seed


_PEFT_MERGES = {"LoRA sum (PEFT cat, rank 2r)": "cat", "PEFT svd merge (rank r)": "svd"}


def run_composition(runner: Runner, cells: list[Cell]) -> Path:
    pre, ex = runner.preset, runner.preset.experiment
    main = {c.name: c for c in cells if c.rq == "rq1" and c.method == "generator"}
    manifest = runner.scorer.manifest
    pairs: dict[str, Any] = {}
    for a, b in pre.pairs:
        cache = runner.root / "composition" / f"{a}+{b}"
        ref_a, ref_b = runner.scorer.ref(a), runner.scorer.ref(b)

        def both(tensors: dict[str, torch.Tensor] | None) -> dict:
            if tensors is None:  # the PEFT model's active adapter is what is scored
                return {t: runner.scorer.score_active(t) for t in (a, b)}
            return {t: {k: v for k, v in runner.score(t, tensors).items() if k != "delta"} for t in (a, b)}

        def cached(name: str, make) -> None:
            f = cache / ("".join(c if c.isalnum() else "_" for c in name) + ".json")
            if f.exists():
                return
            with claimed(f.with_suffix(".lock")) as mine:  # another experiment process may be on it
                if mine and not f.exists():
                    atomic_write_json(f, {"method": name, "adapters": make()})

        union = [c for c in manifest if c["final"] and c.get("pair_of") == [a, b]]
        cached(f"{a} LoRA", lambda: [both(ref_a.ref_tensors[0])])
        cached(f"{b} LoRA", lambda: [both(ref_b.ref_tensors[0])])
        if union:
            cached("union LoRA (trained on both tasks)",
                   lambda: [both(load_file(runner.scorer.root / union[0]["path"] / "adapter_model.safetensors"))])
        for label, kind in _PEFT_MERGES.items():
            cached(label, lambda kind=kind: [_peft_merge(runner, a, b, kind, both)])
        if "B" in main:
            for seed in ex.seeds:
                gen = runner.trained_generator(main["B"], seed)
                for alpha in (1.0, *ex.interpolations):
                    label = "B: G(δa + δb)" if alpha == 1.0 else f"B: G({alpha:g}·δa + {1 - alpha:g}·δb)"
                    w_a, w_b = (1.0, 1.0) if alpha == 1.0 else (alpha, 1 - alpha)
                    cached(f"{label} seed{seed}", lambda g=gen, wa=w_a, wb=w_b: [both(_decode_delta(g, wa * ref_a.ref_delta + wb * ref_b.ref_delta))])
        for v in ex.mixed_variants:
            if v not in main:
                continue
            for seed in ex.seeds:
                cached(f"{v} on mixed prompts seed{seed}", lambda v=v, seed=seed: _mixed(runner, main[v], seed, a, b, both))
        pairs[f"{a}+{b}"] = _summary(cache, a, b)
    out = {"rq": "rq4", "preset": pre.name, "base": pre.base, "experiment": {"seeds": list(ex.seeds), "draws": ex.draws,
           "n_test": ex.n_test, "interpolations": list(ex.interpolations)}, "pairs": pairs,
           "base_acc": {t: runner.scorer.ref(t).base_acc for p in pre.pairs for t in p}}
    f = runner.results_dir / "rq4.json"
    atomic_write_json(f, out)
    return f


def _peft_merge(runner: Runner, a: str, b: str, kind: str, both) -> dict:
    """Load both adapters next to the scorer's, merge with PEFT, score, and remove them again."""
    model, root = runner.scorer.model, runner.scorer.root
    names = ["compose_a", "compose_b", f"compose_{kind}"]
    try:
        model.load_adapter(str(root / runner.scorer.final_adapters(a)[0]["path"]), adapter_name=names[0])
        model.load_adapter(str(root / runner.scorer.final_adapters(b)[0]["path"]), adapter_name=names[1])
        model.add_weighted_adapter(names[:2], [1.0, 1.0], adapter_name=names[2], combination_type=kind)
        model.set_adapter(names[2])
        return both(None)
    finally:
        model.set_adapter("default")
        for n in names:
            if n in model.peft_config:
                model.delete_adapter(n)


@torch.inference_mode()
def _decode_delta(gen_dir: Path, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    model, tokenizer, scale, _ = load_generator(gen_dir)
    return {k: v[0] for k, v in tokenizer.decode(model.from_delta(delta[None] / scale)).items()}


def _mixed(runner: Runner, cell: Cell, seed: int, a: str, b: str, both) -> list[dict]:
    gen = runner.trained_generator(cell, seed)
    model, tokenizer, _, conf = load_generator(gen)
    n = conf["preset"]["generator"]["n_prompts"]
    pa, pb = ([it.prompt for it in runner.tasks[t].train] for t in (a, b))
    out = []
    for d in range(runner.preset.experiment.draws):
        half_a = choose_prompts(pa, n // 2, stable_seed(a, b, seed, d))
        half_b = choose_prompts(pb, n - n // 2, stable_seed(b, a, seed, d))
        out.append(both(generate_tensors(model, tokenizer, runner.encoder, half_a + half_b, n, stable_seed("mixed", seed, d))))
    return out


def _summary(cache: Path, a: str, b: str) -> dict:
    """One row per method: accuracy on each task and their mean, over all its adapters (and seeds)."""
    groups: dict[str, list[dict]] = {}
    for f in sorted(cache.glob("*.json")):
        rec = read_json(f, "composition result")
        groups.setdefault(rec["method"].rsplit(" seed", 1)[0], []).extend(rec["adapters"])
    rows = {}
    for method, adapters in groups.items():
        rows[method] = {"acc_a": mean_std([x[a]["acc"] for x in adapters]), "acc_b": mean_std([x[b]["acc"] for x in adapters]),
                        "acc_mean": mean_std([statistics.fmean((x[a]["acc"], x[b]["acc"])) for x in adapters]),
                        "delta_cos_a": mean_std([x[a]["delta_cos"] for x in adapters]),
                        "delta_cos_b": mean_std([x[b]["delta_cos"] for x in adapters])}
    return {"tasks": [a, b], "methods": rows}
