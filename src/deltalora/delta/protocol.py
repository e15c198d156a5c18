"""The Delta Activations paper's protocol as its own stage: LoRAs on disjoint parts of one task's train split.

For a few selected tasks of every family, ``protocol.parts`` LoRAs learn from disjoint parts of the task's train
split, once from the zoo's shared ``lora_A`` init and once from an init per task (the two give opposite answers
for weight-space similarity). δ (several probe-set sizes), the flattened LoRA weights and their product ΔW = BA
are then compared by how well they separate tasks and families (silhouette, leave-one-out 1-NN retrieval), each
against a permutation null, raw and with the common mean direction removed; and δ's additivity for union
adapters is compared with a control that swaps one task of the pair for an unrelated one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from deltalora.config import DeltaConfig, Preset
from deltalora.data.registry import TaskSpec
from deltalora.delta.analysis import cos, cosine_distance_from_gram, flat_weights, gram, plot_map
from deltalora.delta.compute import compute_zoo_deltas
from deltalora.delta.separation import centred, delta_w_gram, separation
from deltalora.device import runtime
from deltalora.errors import ArtifactError
from deltalora.io import atomic_write_bytes, atomic_write_json, read_json
from deltalora.lm.models import load_base
from deltalora.stats import t_interval
from deltalora.workspace import Workspace
from deltalora.zoo.build import build_zoo
from deltalora.zoo.manifest import Checkpoint, RunRecord
from deltalora.zoo.summary import zoo_summary

INITS: dict[str, bool] = {"shared": False, "independent": True}
"""The two LoRA inits compared, as the value of ``zoo.init_per_task``."""


def protocol_tasks(
    preset: Preset, ws: Workspace, extra: list[TaskSpec] | None = None
) -> tuple[dict[str, list[str]], tuple[tuple[str, str], ...]]:
    """Tasks per family (selected ones only: the tasks of the preset's pairs first, then the best by validation
    gain, up to ``protocol.tasks_per_family``) and the pairs whose two tasks are both selected."""
    rows = {r["task"]: r for r in zoo_summary(preset, ws, extra) if r["passes_min_gain"]}
    if not rows:
        raise ArtifactError(f"{ws.zoo}: no selected task in the zoo; run `deltalora zoo build` first")
    pairs = tuple(p for p in preset.pairs if set(p) <= rows.keys())
    families: dict[str, list[str]] = {}
    for t in dict.fromkeys(t for p in pairs for t in p):
        families.setdefault(rows[t]["domain"], []).append(t)
    by_gain = sorted(rows.values(), key=lambda r: -(r["val_gain"] if r["val_gain"] is not None else r["gain"]))
    for r in by_gain:
        chosen = families.setdefault(r["domain"], [])
        if len(chosen) < preset.protocol.tasks_per_family and r["task"] not in chosen:
            chosen.append(r["task"])
    return dict(sorted(families.items())), pairs


def protocol_stage(
    preset: Preset,
    ws: Workspace,
    out_json: Path,
    out_md: Path | None = None,
    out_png: Path | None = None,
    extra: list[TaskSpec] | None = None,
) -> dict:
    """Build both protocol zoos (resumable), compute their δ and write the comparison to ``out_json`` (and as
    Markdown tables, and a δ map of the shared-init LoRAs by family)."""
    cfg = preset.protocol
    families, pairs = protocol_tasks(preset, ws, extra)
    family_of = {t: f for f, ts in families.items() for t in ts}
    result: dict = {
        "preset": preset.name,
        "protocol": dataclasses.asdict(cfg),
        "recipe": f"{cfg.parts} LoRAs per task on disjoint parts of its train split, {cfg.steps} steps x batch "
        f"{preset.zoo.batch_size}, lr {preset.zoo.lr}, r={preset.zoo.rank}; union adapters on the first part of each "
        "task; distance clip(1-cos, 0, 1)",
        "families": families,
        "pairs": [list(p) for p in pairs],
        "seconds": {},
        "separation": {},
        "additivity": {},
    }
    base, tok = None, None
    for init, per_task in INITS.items():
        sub = Workspace(ws.root / "protocol" / init)
        p = preset.replace(
            pool=tuple(family_of),
            pairs=pairs,
            zoo=dataclasses.replace(
                preset.zoo,
                seeds=preset.zoo.seeds[:1],
                parts=cfg.parts,
                steps=cfg.steps,
                pair_steps=cfg.steps,
                keep_last=1,
                save_every=1,
                init_per_task=per_task,
                evaluate=False,
            ),
        )
        finals = [c for c in build_zoo(p, sub, extra) if c.final]
        if base is None:
            base, tok = load_base(preset.base, runtime(preset.runtime).device)
        deltas = {
            n: compute_zoo_deltas(
                base, tok, sub, finals, DeltaConfig(n_probes=n, batch_size=preset.delta.batch_size), preset.base
            )
            for n in cfg.probe_sizes
        }
        # from each run's and each probe size's own record: a stage resumed over several calls counts every run once
        result["seconds"][init] = {
            "build": round(sum(RunRecord.from_file(f).wall_seconds for f in sub.runs.glob("*.json")), 1),
            "delta": round(sum(read_json(sub.delta_timing(n), "δ timing")["seconds"] for n in cfg.probe_sizes), 1),
        }
        singles = [c for c in finals if not c.is_pair]
        result["separation"][init] = _separation(sub, singles, deltas, family_of, cfg.permutations)
        result["additivity"][init] = {
            f"p{n}": _additivity(d, finals, family_of, preset.zoo.seeds[0]) for n, d in deltas.items()
        }
        if out_png is not None and init == "shared":
            n = 5 if 5 in deltas else cfg.probe_sizes[0]
            plot_map(
                np.stack([deltas[n][c.path].numpy() for c in singles]),
                [family_of[c.task] for c in singles],
                [c.task for c in singles],
                out_png,
                f"δ (|P|={n}) of {len(singles)} protocol LoRAs, by family",
            )
    atomic_write_json(out_json, result)
    if out_md is not None:
        atomic_write_bytes(out_md, protocol_markdown(result).encode())
    return result


def _separation(
    ws: Workspace,
    singles: list[Checkpoint],
    deltas: dict[int, dict[str, torch.Tensor]],
    family_of: dict[str, str],
    permutations: int,
) -> dict:
    """Separation by task and by family for every representation, raw and with the mean direction removed."""
    tensors = [load_file(ws.zoo / c.path / "adapter_model.safetensors") for c in singles]
    grams = {f"delta_p{n}": gram(np.stack([d[c.path].numpy() for c in singles])) for n, d in deltas.items()}
    grams["flat_weights"] = gram(flat_weights(tensors))
    grams["delta_w"] = delta_w_gram(tensors)
    labels = {"task": [c.task for c in singles], "family": [family_of[c.task] for c in singles]}
    return {
        rep: {
            view: {by: separation(cosine_distance_from_gram(g2), lab, permutations) for by, lab in labels.items()}
            for view, g2 in (("raw", g), ("mean_removed", centred(g)))
        }
        for rep, g in grams.items()
    }


def _additivity(
    deltas: dict[str, torch.Tensor], finals: list[Checkpoint], family_of: dict[str, str], seed: int
) -> dict:
    """cos(δ_ab, δ_a + δ_b) per union adapter against the control cos(δ_ab, δ_a + δ_c) and cos(δ_ab, δ_c + δ_b),
    averaged over every task c of a third family; raw and with the mean single-task δ removed from every δ."""
    first = {c.task: deltas[c.path] for c in finals if not c.is_pair and c.part == 0 and c.seed == seed}
    mean = torch.stack(list(first.values())).mean(0)
    out = {}
    for view, shift in (("raw", torch.zeros_like(mean)), ("mean_removed", mean)):
        rows = []
        d = {t: v - shift for t, v in first.items()}
        for c in finals:
            if not c.is_pair:
                continue
            a, b = c.pair_of
            d_ab = deltas[c.path] - shift
            others = [t for t in d if family_of[t] not in (family_of[a], family_of[b])]
            control = [cos(d_ab, d[a] + d[o]) for o in others] + [cos(d_ab, d[o] + d[b]) for o in others]
            rows.append(
                {
                    "pair": c.task,
                    "cos_sum": round(cos(d_ab, d[a] + d[b]), 4),
                    "cos_control": round(float(np.mean(control)), 4) if control else None,  # no third family
                    "cos_a": round(cos(d_ab, d[a]), 4),
                    "cos_b": round(cos(d_ab, d[b]), 4),
                }
            )
        gap = np.array([r["cos_sum"] - r["cos_control"] for r in rows if r["cos_control"] is not None])
        summary = {"pairs": rows}
        if len(gap) >= 2:
            ti = t_interval(gap)
            summary["sum_minus_control"] = {"mean": round(ti["mean"], 4), "ci95": [round(x, 4) for x in ti["ci"]]}
        out[view] = summary
    return out


def protocol_markdown(result: dict) -> str:
    """The comparison as Markdown tables: one row per representation, silhouette and 1-NN against their nulls."""
    lines = [
        f"# Delta Activations under the paper's protocol (`{result['preset']}`)",
        "",
        f"{result['recipe']}. Tasks: "
        + "; ".join(f"{f}: {', '.join(t.split('.', 1)[-1] for t in ts)}" for f, ts in result["families"].items())
        + f". Each statistic is followed by its permutation null (mean / 95th percentile, "
        f"{result['protocol']['permutations']} label shuffles).",
    ]
    for init, reps in result["separation"].items():
        for view in ("raw", "mean_removed"):
            lines += [
                "",
                f"## {init} LoRA init, {view.replace('_', ' ')}",
                "",
                "| representation | silhouette by task | 1-NN task | silhouette by family | 1-NN family |",
                "|---|---:|---:|---:|---:|",
            ]
            for rep, views in reps.items():
                cells = [
                    f"{s['value']:+.3f} ({s['null_mean']:+.3f} / {s['null_p95']:+.3f})"
                    for by in ("task", "family")
                    for s in (views[view][by]["silhouette"], views[view][by]["nn_accuracy"])
                ]
                lines.append(f"| {rep} | " + " | ".join(cells) + " |")
    lines += ["", "## Additivity of union adapters (cos(δ_ab, δ_a+δ_b) minus the control with an unrelated task)", ""]
    lines += [
        "| init | probes | view | mean gap [95% CI over pairs] | mean cos_sum | mean control |",
        "|---|---|---|---:|---:|---:|",
    ]
    for init, by_p in result["additivity"].items():
        for p, views in by_p.items():
            for view, a in views.items():
                if "sum_minus_control" not in a:
                    continue
                g = a["sum_minus_control"]
                lines.append(
                    f"| {init} | {p} | {view} | {g['mean']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] | "
                    f"{np.mean([r['cos_sum'] for r in a['pairs']]):.3f} | "
                    f"{np.mean([r['cos_control'] for r in a['pairs'] if r['cos_control'] is not None]):.3f} |"
                )
    secs = ", ".join(f"{i}: build {s['build']:.0f} s, δ {s['delta']:.0f} s" for i, s in result["seconds"].items())
    return "\n".join(
        [
            *lines,
            "",
            f"Time on the machine that ran it (summed from each LoRA run's and each δ pass's record): {secs}.",
            "",
        ]
    )
