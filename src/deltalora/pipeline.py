"""Stage entry points shared by the CLI and tests: each is setup -> run -> save."""

from __future__ import annotations

import dataclasses
import time
import typing
from pathlib import Path

import numpy as np

from .analysis import additivity, plot_map, silhouette
from .config import ConfigError, Preset
from .delta import compute_zoo_deltas, delta_dir, load_deltas
from .io import atomic_write_bytes, atomic_write_json, read_json
from .models import load_base
from .registry import TaskSpec
from .zoo import build_zoo, zoo_dir, zoo_summary


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """``section.field=value`` overrides, e.g. ``zoo.steps=10`` or ``zoo.seeds=0,1``; ``pool=a,b,c``
    replaces the task pool and keeps the preset's pairs whose two tasks are both still in it."""
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if key == "pool" and sep:
            pool = tuple(v for v in value.split(",") if v)
            preset = preset.replace(pool=pool, pairs=tuple(p for p in preset.pairs if set(p) <= set(pool)))
            continue
        section, _, name = key.partition(".")
        if not sep or not name or section not in ("tasks", "zoo", "delta", "generator", "experiment"):
            raise ConfigError(f"override {ov!r}: expected tasks|zoo|delta|generator|experiment.<field>=<value> or pool=<task>,<task>")
        sub = getattr(preset, section)
        fields = {f.name: f for f in dataclasses.fields(sub)}
        if name not in fields:
            raise ConfigError(f"override {ov!r}: {section} has no field {name!r}; fields: {', '.join(fields)}")
        hints = typing.get_type_hints(type(sub))
        typ = hints[name]
        try:
            if typing.get_origin(typ) is tuple:
                inner = typing.get_args(typ)[0]
                parsed = tuple(inner(v) for v in value.split(",") if v)
            elif typ is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                parsed = value.lower() in ("true", "1")
            else:
                parsed = typ(value)
        except ValueError as e:
            raise ConfigError(f"override {ov!r}: {value!r} is not a valid {typ}") from e
        preset = preset.replace(**{section: dataclasses.replace(sub, **{name: parsed})})
    return preset


def delta_stage(preset: Preset, workspace: Path, probe_sizes: tuple[int, ...] = (5,)) -> None:
    """Delta Activations for every checkpoint of the zoo, for each probe-set size."""
    manifest = read_json(zoo_dir(workspace) / "manifest.json", "zoo manifest (run `deltalora zoo build` first)")
    base, tok = load_base(preset.base)
    for n in probe_sizes:
        cfg = dataclasses.replace(preset.delta, n_probes=n)
        compute_zoo_deltas(base, tok, zoo_dir(workspace), manifest, cfg, delta_dir(workspace), base_name=preset.base)


def _flat_weights(zoo_root: Path, paths: list[str]) -> np.ndarray:
    from safetensors.torch import load_file

    rows = []
    for p in paths:
        t = load_file(zoo_root / p / "adapter_model.safetensors")
        rows.append(np.concatenate([t[k].flatten().numpy() for k in sorted(t)]))
    return np.stack(rows)


def _silhouette_or_none(x: np.ndarray, labels: list[str]) -> float | None:
    """None where silhouette is undefined (one domain, or a domain per adapter) rather than failing the report."""
    if not 2 <= len(set(labels)) < len(labels):
        return None
    return round(silhouette(x, labels), 4)


def delta_report(workspace: Path, out_json: Path, out_png: Path, pool: tuple[str, ...] | None = None,
                 probe_sizes: tuple[int, ...] = (1, 5, 20)) -> dict:
    """Silhouette by domain for δ and flattened weights, the 2-D map, additivity; saved as JSON + PNG.

    With ``pool``, only adapters of those tasks (and pairs of them) count: candidates
    dropped from the pool stay in the zoo folder but not in the analysis.
    """
    root = zoo_dir(workspace)
    manifest = read_json(root / "manifest.json", "zoo manifest")
    if pool is not None:
        manifest = [c for c in manifest if all(t in pool for t in (c.get("pair_of") or [c["task"]]))]
    finals = [c for c in manifest if c["final"] and not c.get("pair_of")]
    labels = [c["domain"] for c in finals]
    paths = [c["path"] for c in finals]
    deltas5 = load_deltas(workspace, 5)
    x = np.stack([deltas5[p].numpy() for p in paths])
    result: dict = {
        "n_adapters": len(finals), "n_tasks": len({c["task"] for c in finals}), "n_domains": len(set(labels)),
        "unit": "final checkpoint of each (task, seed) run; labels = task domain; distance clip(1-cos, 0, 1)",
        "silhouette_delta": _silhouette_or_none(x, labels),
        "silhouette_flat_weights": _silhouette_or_none(_flat_weights(root, paths), labels),
        "silhouette_delta_by_probes": {},
        "additivity": additivity(deltas5, manifest),
    }
    for n in probe_sizes:
        f = delta_dir(workspace) / f"deltas_p{n}.safetensors"
        if f.exists():
            d = load_deltas(workspace, n)
            result["silhouette_delta_by_probes"][str(n)] = _silhouette_or_none(np.stack([d[p].numpy() for p in paths]), labels)
    timing = delta_dir(workspace) / "timing_p5.json"
    if timing.exists():
        result["delta_seconds_per_adapter"] = round(read_json(timing)["seconds_per_adapter"], 4)
    if result["additivity"]:
        add = result["additivity"]
        result["additivity_mean"] = {k: round(float(np.mean([r[k] for r in add])), 4) for k in ("cos_sum", "cos_a", "cos_b")}
    plot_map(x, labels, [c["task"] for c in finals], out_png,
             f"Delta Activations of {len(finals)} adapters (silhouette {result['silhouette_delta']})")
    atomic_write_json(out_json, result)
    return result


def zoo_results(preset: Preset, workspace: Path, out_json: Path, out_md: Path | None,
                extra: list[TaskSpec] | None = None, min_gain: float = 0.05) -> list[dict]:
    """Per-task zoo results as JSON and a Markdown table."""
    from .registry import DROPPED

    rows = zoo_summary(preset, workspace, extra)
    dropped = zoo_summary(preset.replace(pool=tuple(DROPPED), pairs=()), workspace, extra) if DROPPED else []
    for r in rows:
        r["passes_min_gain"] = r["gain"] >= min_gain
    for r in dropped:
        r.update(passes_min_gain=r["gain"] >= min_gain, dropped=DROPPED[r["task"]])
    runs = [read_json(f) for f in sorted((zoo_dir(workspace) / "runs").glob("*.json"))]
    bases = [read_json(f) for f in sorted((zoo_dir(workspace) / "base").glob("*.json"))]
    in_pool = lambda names: all(t in preset.pool for t in names)  # noqa: E731
    pool_seconds = sum(r["wall_seconds"] for r in runs if in_pool(r["tasks"])) + sum(b["seconds"] for b in bases if in_pool([b["task"]]))
    payload = {
        "preset": preset.name, "base": preset.base,
        "zoo": dataclasses.asdict(preset.zoo),
        "build_wall_seconds": round(pool_seconds, 1),
        "build_wall_seconds_note": "sum of per-run wall times (training, checkpoint saving, final test evaluation) and "
                                   "base-model evaluations for the pool tasks and pair adapters",
        "build_wall_seconds_all_candidates": round(sum(r["wall_seconds"] for r in runs) + sum(b["seconds"] for b in bases), 1),
        "n_adapter_runs": sum(in_pool(r["tasks"]) for r in runs),
        "n_checkpoints": sum(len(r["checkpoints"]) for r in runs if in_pool(r["tasks"])),
        "pairs": [{"pair": r["task"], "test_acc": r["test_acc"]} for r in runs if len(r["tasks"]) > 1 and in_pool(r["tasks"])],
        "tasks": rows,
        "dropped_candidates": dropped,
    }
    atomic_write_json(out_json, payload)
    if out_md is not None:
        lines = ["| task | domain | kind | n_train | n_test | base acc | LoRA acc (mean over seeds) | gain | train s/adapter |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['task']} | {r['domain']} | {r['kind']} | {r['n_train']} | {r['n_test']} | {r['base_acc']:.3f} | "
                         f"{r['lora_acc']:.3f} ({', '.join(f'{a:.3f}' for a in r['lora_acc_per_seed'])}) | {r['gain']:+.3f} | {r['train_seconds']:.0f} |")
        if dropped:
            lines += ["", "Candidates measured and dropped from the pool:", ""]
            lines += [f"- `{r['task']}` ({r['domain']}): base {r['base_acc']:.3f}, LoRA {r['lora_acc']:.3f} — {r['dropped']}" for r in dropped]
        atomic_write_bytes(out_md, ("\n".join(lines) + "\n").encode())
    return rows


def run_all(preset: Preset, workspace: Path, results_dir: Path, docs_dir: Path, extra: list[TaskSpec] | None = None) -> dict:
    """The main job: zoo -> Delta Activations (|P| = 1, 5, 20) -> results and report files."""
    t0 = time.perf_counter()
    build_zoo(preset, workspace, extra)
    delta_stage(preset, workspace, (1, 5, 20))
    zoo_results(preset, workspace, results_dir / f"zoo_{preset.name}.json", docs_dir / f"zoo_{preset.name}.md", extra)
    out = delta_report(workspace, results_dir / f"delta_{preset.name}.json", docs_dir / f"delta_map_{preset.name}.png", preset.pool)
    out["pipeline_seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
    write_results_md(preset.name, results_dir, docs_dir)
    return out


def write_results_md(name: str, results_dir: Path, docs_dir: Path) -> Path:
    """docs/results.md, composed only from the result JSON files that exist (never typed-in numbers)."""
    zoo_f, delta_f = results_dir / f"zoo_{name}.json", results_dir / f"delta_{name}.json"
    lines = [f"# Results: `{name}` preset", "",
             f"Generated by `deltalora run --preset {name}` from `{zoo_f}` and `{delta_f}`; every number below is read from them.", ""]
    if zoo_f.exists():
        z = read_json(zoo_f)
        rows = z["tasks"]
        passing = [r for r in rows if r["passes_min_gain"]]
        lines += ["## Reference LoRA zoo", "",
                  f"Base `{z['base']}`; LoRA r={z['zoo']['rank']}, alpha={z['zoo']['alpha']} on {', '.join(z['zoo']['target_modules'])}, "
                  f"{z['zoo']['steps']} steps x batch {z['zoo']['batch_size']}, lr {z['zoo']['lr']}, seeds {z['zoo']['seeds']}, "
                  f"{z['zoo']['keep_last']} checkpoints kept per run. {z['n_adapter_runs']} runs, {z['n_checkpoints']} checkpoints; "
                  f"build wall time {z['build_wall_seconds'] / 60:.1f} min on this machine (sum over runs and base evaluations).", "",
                  f"{len(passing)} of {len(rows)} tasks gain at least 5 accuracy points over the base model "
                  f"in {len({r['domain'] for r in passing})} domains.", ""]
        lines += (docs_dir / f"zoo_{name}.md").read_text().splitlines() if (docs_dir / f"zoo_{name}.md").exists() else []
        if z["pairs"]:
            lines += ["", "Adapters trained on the union of two tasks (test accuracy on each task):", ""]
            lines += [f"- `{p['pair']}`: " + ", ".join(f"{t} {a:.3f}" for t, a in p["test_acc"].items()) for p in z["pairs"]]
        lines.append("")
    if delta_f.exists():
        d = read_json(delta_f)
        lines += ["## Delta Activations", "",
                  f"{d['n_adapters']} adapters ({d['unit']}), {d['n_domains']} domains.", "",
                  "| embedding | silhouette by domain |", "|---|---:|",
                  f"| flattened LoRA weights | {d['silhouette_flat_weights']} |"]
        lines += [f"| Delta Activations, {n} probe{'s' if n != '1' else ''}{' (default)' if n == '5' else ''} | {v} |"
                  for n, v in d["silhouette_delta_by_probes"].items()]
        lines += ["", "For scale, the paper reports 0.614 for Delta Activations and -0.043 for flattened weights "
                      "on its 5-domain zoo of 7-9B models.", ""]
        if "delta_seconds_per_adapter" in d:
            lines += [f"δ for one adapter, base activations cached: {d['delta_seconds_per_adapter']:.3f} s.", ""]
        if d["additivity"]:
            lines += ["Additivity: cosine of δ(LoRA on a∪b) with δ_a + δ_b, and with each alone.", "",
                      "| pair | cos(δ_ab, δ_a+δ_b) | cos(δ_ab, δ_a) | cos(δ_ab, δ_b) |", "|---|---:|---:|---:|"]
            lines += [f"| {r['pair']} | {r['cos_sum']} | {r['cos_a']} | {r['cos_b']} |" for r in d["additivity"]]
            lines.append("")
        lines += [f"![δ map](delta_map_{name}.png)", ""]
    lines += ["Generators, baselines and the research questions: [report.md](report.md) "
              f"(`deltalora experiment --preset {name}` then `deltalora report results/experiments_{name}`).", ""]
    out = docs_dir / "results.md"
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return out

