"""``deltalora report``: the Markdown report and its plots, composed only from the result files.

Every number in the report is read from ``RESULTS_DIR/*.json``; the conclusions are
computed from them (differences of seed means with Welch t-intervals; cross-validation with the paired,
Holm-corrected tests of ``cv.json``).
A hand-written ``discussion.md`` in a results folder, if present, is included verbatim: the first folder's at
the end, a further run's under its section (or, while it has not run, under "Declared, not run").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deltalora.errors import ArtifactError
from deltalora.experiments.composition_report import composition_plot, find_rq4, rq4_section
from deltalora.experiments.cv_report import cv_parts, cv_plot, cv_questions, cv_section, save_png
from deltalora.experiments.grid import GENERATOR, METHODS
from deltalora.experiments.questions import CONTROLS, DELTA, RQ1, RQ2, RQ3, RQ4, question_lines
from deltalora.experiments.results import read_results
from deltalora.generator.variants import VARIANTS, baseline
from deltalora.io import atomic_write_bytes, read_json
from deltalora.stats import welch_interval


def _fmt(ms: dict | None, digits: int = 3) -> str:
    if not ms:
        return "—"
    if ms["n"] == 1:
        return f"{ms['mean']:.{digits}f}"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _sci(ms: dict | None) -> str:
    return "—" if not ms else f"{ms['mean']:.2e}"


def _table(cells: dict, with_gen: bool = True) -> list[str]:
    head = "| method | accuracy | KL to reference | δ cosine | ‖δ̂ − δ‖ | parameter MSE | n adapters (seeds) |" + (
        " train s |" if with_gen else ""
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, c in cells.items():
        o = c["overall"]
        row = (
            f"| {name} | {_fmt(o['acc'])} | {_fmt(o['kl'])} | {_fmt(o['delta_cos'], 2)} | {_fmt(o['delta_dist'], 2)} | "
            f"{_sci(o['param_mse'])} | {o['acc']['n']} ({len(c['seeds_done']) if c['seeds_done'] != [None] else '—'}) |"
        )
        if with_gen:
            row += f" {c['train_seconds']['mean']:.0f} |" if "train_seconds" in c else " — |"
        lines.append(row)
    return lines


def _per_task(cells: dict) -> list[str]:
    tasks = next(iter(cells.values()))["tasks"]
    lines = ["| method | " + " | ".join(t.rsplit(".", 1)[-1] for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, c in cells.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(c["per_task"][t]["acc"], 2) for t in tasks) + " |")
    return lines


def _verdict(cells: dict) -> list[str]:
    """One line per δ variant: accuracy difference to the baseline variant with its interval, in plain words."""
    base = baseline().name
    if base not in cells:
        return []
    out = []
    for v in (v.name for v in VARIANTS.values() if v.uses_delta):
        if v not in cells:
            continue
        w = welch_interval(cells[v]["per_seed_acc"], cells[base]["per_seed_acc"])
        d, ci = w["diff"], w["ci"]
        word = "better than" if ci and ci[0] > 0 else "worse than" if ci and ci[1] < 0 else "not distinguishable from"
        interval = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "none (one seed)"
        out.append(
            f"- {v} − {base} accuracy: {d:+.3f} (Welch 95% interval {interval} over generator seeds, n = "
            f"{len(cells[v]['per_seed_acc'])} vs {len(cells[base]['per_seed_acc'])}, each the mean of its draws): "
            f"{word} {base}."
        )
    return out


def _plots(results: Path, out_dir: Path, rqs: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}

    def save(fig, name: str) -> None:
        made[name] = save_png(fig, out_dir / name)

    # accuracy bars with error bars
    parts = [(rq, rqs[rq]["cells"]) for rq in ("rq1", "rq2", "rq2_lodo") if rq in rqs and rqs[rq]["cells"]]
    if parts:
        fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 4.2), squeeze=False)
        for ax, (rq, cells) in zip(axes[0], parts):
            names = list(cells)
            m = [cells[n]["overall"]["acc"]["mean"] for n in names]
            s = [cells[n]["overall"]["acc"]["std"] for n in names]
            ax.bar(
                range(len(names)),
                m,
                yerr=s,
                capsize=3,
                color=["#999" if cells[n]["method"] != GENERATOR else "#3a7" for n in names],
            )
            ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], rotation=60, ha="right", fontsize=7)
            ax.set_title(
                {"rq1": "RQ1 seen tasks", "rq2": "RQ2 held-out tasks", "rq2_lodo": "RQ2 left-out domain"}[rq],
                fontsize=9,
            )
            ax.set_ylabel("accuracy (mean ± std over adapters)")
        save(fig, "report_accuracy.png")
    # loss curves per variant
    if "rq1" in rqs:
        curves = {n: c["loss_curve"] for n, c in rqs["rq1"]["cells"].items() if c.get("loss_curve")}
        if curves:
            fig, ax = plt.subplots(figsize=(6, 4))
            for n, pts in curves.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=n)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("total training loss (seed 0)")
            ax.legend(fontsize=8)
            save(fig, "report_losses.png")
    # δ map: reference vs generated adapters, by domain
    dfile = results / "deltas.safetensors"
    if dfile.exists() and "rq1" in rqs:
        from safetensors.torch import load_file

        from deltalora.delta.analysis import plot_map

        deltas, domains = load_file(dfile), rqs["rq1"]["domains"]
        keys = [k for k in deltas if k.startswith("ref|")] + [
            k for k in deltas if k.startswith(("rq1|", "rq2|")) and k.split("|")[1] in VARIANTS
        ]
        if len(keys) >= 4:
            x = np.stack([deltas[k].numpy() for k in keys])
            ok = np.linalg.norm(x, axis=1) > 0
            keys, x = [k for k, o in zip(keys, ok) if o], x[ok]
            plot_map(
                x,
                [domains[k.split("|")[-1]] for k in keys],
                [k.split("|")[-1] for k in keys],
                out_dir / "report_delta_map.png",
                "Delta Activations: reference vs generated adapters (seen and held-out tasks)",
                kinds=["reference" if k.startswith("ref|") else k.split("|")[1] for k in keys],
            )
            made["report_delta_map.png"] = "report_delta_map.png"
    return made


# the grid's result files, each with its section title and the research questions (``questions``) it answers
_SECTIONS = {
    "rq1": ("RQ1: in-domain reconstruction (tasks seen in training)", (RQ1, DELTA)),
    "rq2": ("RQ2: zero-shot generalisation to held-out tasks of seen domains", (RQ2, DELTA)),
    "rq2_lodo": ("RQ2: leave-one-domain-out", (RQ2,)),
    "rq3": ("RQ3: robustness and sample efficiency (seen tasks)", (RQ3,)),
    "ablations": ("Ablations and negative controls (seen + held-out tasks)", (CONTROLS,)),
}


def write_report(results_dir: str | Path, out: str | Path, more: Sequence[str | Path] = ()) -> Path:
    """``out`` (Markdown) and its PNG plots beside it, from the result files of ``results_dir`` and the
    cross-validation runs in ``more`` (each a folder with ``cv.json``; runs that share cells with an earlier one,
    such as the variants or RQ3 run beside the headline one, add only what they compare)."""
    results, out = Path(results_dir), Path(out)
    rqs = read_results(results)
    cv = read_json(results / "cv.json", "cross-validation results") if (results / "cv.json").exists() else None
    if not rqs and cv is None:
        raise ArtifactError(
            f"{results}: no experiment results (rq1.json ... or cv.json); run `deltalora experiment` first"
        )
    rq4, rq4_only = find_rq4(rqs, [Path(d) for d in more])
    parts, pending, waiting = cv_parts(cv, [Path(d) for d in more if Path(d) not in rq4_only])
    any_rq = next(iter(rqs.values())) if rqs else cv
    ex = any_rq.get("experiment", {})
    plots = _plots(results, out.parent, rqs)
    if rq4:
        plots.update(composition_plot(rq4, out.parent))
    stems = ["report_cv" if i == 0 else f"report_cv{i}" for i in range(len(parts))]
    for (_, c), stem in zip(parts, stems):
        plots.update(cv_plot(c, out.parent, stem))
    L = [
        f"# deltalora report: `{any_rq['preset']}` preset",
        "",
        f"Generated by `deltalora report {' '.join(map(str, (results, *more)))}` from the JSON files in "
        f"{'those folders' if more else 'that folder'}; every number is read from them. "
        f"The experiment ran with `deltalora experiment --preset {any_rq['preset']}`.",
        "",
    ]
    asked = cv_questions(parts)
    if rq4 and rq4.get("comparisons"):
        asked[RQ4.id] = rq4["comparisons"]
    shown: dict[str, list[str]] = {}
    for rq, (title, qs) in _SECTIONS.items():
        for q in qs if rq in rqs else ():
            shown.setdefault(q.id, []).append(f"'{title}'")
    if rq4:  # its section's tables answer RQ4 even where an older run declared no comparison
        shown[RQ4.id] = ["'RQ4: composition'"]
    if asked or shown:
        L += [
            "## The questions, answered",
            "",
            "Composed from the declared comparisons in the sections below: difference a − b of per-task accuracy "
            "(paired over tasks; RQ4 over pair × task units) with its 95% t-interval, Wilcoxon p after Holm over "
            "its run's declared list; better or worse only where the corrected test rejects and the interval "
            "excludes 0, otherwise the smallest difference the design could see.",
            "",
            *question_lines(asked, waiting, shown),
            "",
        ]
    L += [
        "## Setup",
        "",
        f"- Base model: `{any_rq['base']}`.",
        f"- Generators: {ex.get('steps')} optimizer steps per generator (variant B: {ex.get('steps')} more for E_ψ); "
        f"seeds {ex.get('seeds')}; {ex.get('draws')} generated adapters per task and seed, each from its own draw of "
        f"train-split prompts; {ex.get('n_test')} test items per task (the same items for every method); "
        f"KL on the answer tokens of {ex.get('n_kl')} test items.",
        "- Accuracy is mean ± std over adapter sets (one set = one generator seed and one prompt draw, averaged "
        "over the scored tasks); baselines without a seed or draw have n = 1.",
        "- KL is KL(reference ‖ adapter) averaged over every gold-answer token (teacher-forced); "
        "δ cosine and distance are to the task's reference δ.",
        "- Baselines: " + "; ".join(f"{m.label}: {m.summary}" for m in METHODS.values() if m.baseline) + ".",
        f"- Top-k retrieval mixture: k = {ex.get('mixture_k')}, temperature {ex.get('mixture_temperature')}; "
        "parameter MSE is not defined at its rank k·r (—). "
        f"Multi-task LoRA: the zoo's steps x {ex.get('multitask_step_factor')}.",
        "",
    ]
    if "domains" in any_rq:
        doms: dict[str, list[str]] = {}
        for t, d in any_rq["domains"].items():
            doms.setdefault(d, []).append(t)
        L += [
            f"- Pool: {len(any_rq['domains'])} tasks in {len(doms)} domains: "
            + "; ".join(f"{d} ({len(ts)})" for d, ts in sorted(doms.items()))
            + ".",
        ]
        if rqs:
            L.append(
                f"- Held-out tasks (RQ2): {', '.join(ex.get('held_out', []))}. "
                f"Left-out domain: {ex.get('lodo_domain') or 'none'}."
            )
        L.append("")
    for (title, c), stem in zip(parts, stems):
        L += cv_section(c, plots, title, stem)
    L += pending
    for rq, (title, _) in _SECTIONS.items():
        if rq not in rqs:
            L += [] if cv is not None else [f"## {title}", "", "Not run.", ""]
            continue
        r = rqs[rq]
        L += [f"## {title}", ""]
        if r["cells"]:
            L += (
                _table(r["cells"])
                + ["", "Accuracy per task (mean ± std over adapters):", ""]
                + _per_task(r["cells"])
                + [""]
            )
            L += _verdict(r["cells"]) + [""]
        if r.get("not_run"):
            L += [f"Cells not run in this budget: {', '.join(r['not_run'])}.", ""]
        if rq == "rq2" and "report_accuracy.png" in plots:
            L += ["![accuracy](report_accuracy.png)", ""]
        if rq == "rq1" and "report_losses.png" in plots:
            L += ["![losses](report_losses.png)", ""]
        if rq == "rq2" and "report_delta_map.png" in plots:
            L += ["![delta map](report_delta_map.png)", ""]
    if rq4:
        L += rq4_section(rq4, plots, _fmt)
    disc = results / "discussion.md"
    if disc.exists():
        L += ["## Discussion", "", disc.read_text().strip(), ""]
    atomic_write_bytes(out, "\n".join(L).encode())
    return out
