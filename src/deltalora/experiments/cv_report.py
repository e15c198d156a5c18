"""The report's cross-validation section and plot, from ``cv.json`` alone."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deltalora.errors import ArtifactError
from deltalora.experiments.answers import comparison_table
from deltalora.experiments.cv import DECLARED, question_of
from deltalora.io import atomic_write_bytes, read_json


def cv_title(cv: dict) -> str:
    """A cross-validation run's section title, from what its declaration adds to the headline comparison."""
    ex = cv["experiment"]
    parts = []
    if ex.get("cv_warm_variants"):
        parts.append("δ and end-to-end variants warm-started from dnd")
    if ex.get("cv_scratch_variants"):
        parts.append(f"{', '.join(ex['cv_scratch_variants'])} trained from scratch")
    if ex.get("cv_rq3"):
        parts.append("RQ3: δ supervision with fewer training tasks and corrupted weights")
    if len(ex.get("cv_variants", ())) > 1:
        parts.append(f"{', '.join(ex['cv_variants'])} on every fold")
    if n := len(ex.get("cv_lofo", ())):
        parts.append(f"{n} famil{'y' if n == 1 else 'ies'} held out")
    return f"{'; '.join(parts)} (cross-validation)" if parts else "Cross-validation over tasks"


def cv_parts(cv: dict | None, more: Sequence[Path]) -> tuple[list[tuple[str, dict]], list[str], dict[str, list[str]]]:
    """The report's cross-validation sections: the first run's, then each further run's (``only_new``), as
    (title, cv) pairs; the lines of a section on the further runs declared whose cells have not run yet (a
    folder with ``declared.json`` and no ``cv.json``), with their ``discussion.md`` if present; and, per research
    question, the folders of those runs, and of runs still going, that declare comparisons for it."""
    parts = [("Cross-validation over tasks", cv)] if cv is not None else []
    methods = {n for _, c in parts for n in c["methods"]}
    comparisons = {k for _, c in parts for k in c["comparisons"]}
    pending: list[str] = []
    waiting: dict[str, list[str]] = {}
    for d in more:
        f = d / "cv.json"
        if not f.exists() and (d / DECLARED).exists():
            dec = read_json(d / DECLARED, "declaration")
            new = [k for k in dec["declared_comparisons"] if k not in comparisons]
            tags = _questions(dec, d / DECLARED)
            for q in dict.fromkeys(tags[k] for k in new):
                waiting.setdefault(q, []).append(f"`{d}`")
            pending += [
                f"**{cv_title(dec)}**: `{d / DECLARED}`, `{dec['preset']}` preset, {len(new)} comparisons "
                f"not in an earlier section ({len(dec['declared_comparisons'])} declared); no results yet "
                "(no cv.json).",
                "",
            ]
            if (d / "discussion.md").exists():
                pending += [(d / "discussion.md").read_text().strip(), ""]
            continue
        if not f.exists():
            raise ArtifactError(
                f"{f}: not found; each further results folder is a cross-validation run (cv.json), a declared one "
                f"({DECLARED}) or a composition run (rq4.json)"
            )
        extra = read_json(f, "cross-validation results")
        tags, todo = _questions(extra, f), Counter()
        todo.update(tags[k] for k in extra["declared_comparisons"] if k not in extra["comparisons"])
        for q, n in todo.items():  # a run still going: its declared comparisons without results
            waiting.setdefault(q, []).append(f"`{d}` ({n} still to run)")
        parts.append((cv_title(extra), with_discussion(only_new(extra, methods, comparisons), d)))
        methods |= set(extra["methods"])
        comparisons |= set(extra["comparisons"])
    return parts, (["## Declared, not run", "", *pending] if pending else []), waiting


def with_discussion(doc: dict, folder: Path) -> dict:
    """``doc`` with its folder's hand-written ``discussion.md`` (what the numbers cannot say: a cost, a caveat of
    the design), which the report prints under the run's section."""
    f = folder / "discussion.md"
    return {**doc, "discussion": f.read_text().strip()} if f.exists() else doc


def discussion_lines(doc: dict) -> list[str]:
    """The section's closing note from its folder's ``discussion.md``, if any."""
    return [doc["discussion"], ""] if doc.get("discussion") else []


def cv_questions(parts: list[tuple[str, dict]]) -> dict[str, dict[str, dict]]:
    """The sections' comparisons by the research question each answers (``cv.question_of``), each with both
    methods' means over the tasks both scored (``means``)."""
    asked: dict[str, dict[str, dict]] = {}
    for title, c in parts:
        tags = _questions(c, f"cv.json of '{title}'")
        for key, comp in c["comparisons"].items():
            asked.setdefault(tags[key], {})[key] = {**comp, "means": _paired_means(c["methods"], *key.split(" - ", 1))}
    return asked


def _questions(doc: dict, where: object) -> dict[str, str]:
    """``cv.question_of`` for a declaration or cv.json, which must declare exactly what its config declares."""
    tags = question_of(doc["experiment"])
    if odd := [k for k in doc["declared_comparisons"] if k not in tags]:
        raise ArtifactError(f"{where}: declared_comparisons {odd} are not what its experiment config declares")
    return tags


def _paired_means(methods: dict, a: str, b: str) -> tuple[float, float] | None:
    """Both methods' mean accuracy over the tasks both scored (what their paired comparison compares)."""
    if a not in methods or b not in methods:
        return None
    pa, pb = methods[a]["per_task"], methods[b]["per_task"]
    common = [t for t in pa if t in pb]
    return (float(np.mean([pa[t] for t in common])), float(np.mean([pb[t] for t in common]))) if common else None


def only_new(cv: dict, methods: set[str], comparisons: set[str]) -> dict:
    """``cv`` without the comparisons an earlier section showed, and without the methods it showed unless a
    remaining comparison names them (runs that share cells repeat the headline rows); those are kept on the
    tasks the new methods scored, so every row of the section averages the same tasks."""
    comps = {k: c for k, c in cv["comparisons"].items() if k not in comparisons}
    named = {n for k in comps for n in k.split(" - ", 1)}
    new = {n: m for n, m in cv["methods"].items() if n not in methods}
    tasks = {t for m in new.values() for t in m["per_task"]}
    rivals = {}
    for n, m in cv["methods"].items():
        if n in methods and n in named:
            per = {t: a for t, a in m["per_task"].items() if t in tasks}
            if per:
                rivals[n] = {"per_task": per, "mean": float(np.mean(list(per.values())))}
    return {
        **cv,
        "methods": {**rivals, **new},
        "comparisons": comps,
        "delta_separation": {n: x for n, x in cv.get("delta_separation", {}).items() if n in new},
        "delta_similarity": {n: x for n, x in cv.get("delta_similarity", {}).items() if n in new},
        "declared_comparisons": [k for k in cv["declared_comparisons"] if k not in comparisons],
        "cell_seconds": sum(m.get("cell_seconds", 0) for m in new.values()) or cv.get("cell_seconds"),
        "later": True,
    }


def cv_section(
    cv: dict, plots: dict[str, str], title: str = "Cross-validation over tasks", stem: str = "report_cv"
) -> list[str]:
    """Cross-validation: each method's mean accuracy over tasks (each scored where its fold held it out, or, for
    the rows marked seen, by the previous fold's generators that trained on it), per family, and the declared
    comparisons with their paired tests and Holm-corrected verdicts."""
    ex, methods, doms = cv["experiment"], cv["methods"], cv["domains"]
    families = sorted(set(doms.values()))
    seconds = (
        f" The finished cells of this section took {cv['cell_seconds'] / 3600:.1f} h of wall time, summed over "
        "cells and seeds (generator training, baselines and scoring; processes ran side by side)."
        if cv.get("cell_seconds")
        else ""
    )
    if cv.get("later"):
        setup = (
            "This run shares the folds, items and cells above; its own rows are listed with the earlier rows they "
            "are compared with, on the same tasks."
            + (
                f" Warm-started, from-scratch and RQ3 rows score the first {ex['cv_warm_folds']} fold(s) with "
                f"generator seeds {ex['seeds'][: ex['cv_warm_seeds'] or None]}."
                if ex.get("cv_warm_variants") or ex.get("cv_rq3") or ex.get("cv_scratch_variants")
                else ""
            )
            + seconds
        )
    else:
        setup = (
            f"{len(doms)} tasks in {len(families)} families dealt into {cv['folds']} folds stratified by family; "
            "each fold's generators and baselines are built without its tasks, which are then scored (held out). "
            "Rows marked *seen* score the next fold's tasks with this fold's generators, which trained on them"
            + (
                f"; rows marked *held-out family* score each of {', '.join(ex['cv_lofo'])} with everything built "
                "from the other families. "
                if ex.get("cv_lofo")
                else ". "
            )
            + f"Generator seeds {ex['seeds']}, {ex['draws']} prompt draw(s) per task and seed, {ex['n_test']} test "
            "items per task, the same items for every method. Accuracy is the mean over tasks of each task's mean "
            "over seeds and draws." + seconds
        )
    L = [
        f"## {title}",
        "",
        setup,
        "",
        "| method | mean accuracy | tasks | train s (mean per adapter source) | δ cos to own LoRAs | "
        + " | ".join(families)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(families),
    ]
    for name, m in methods.items():
        fam = [[a for t, a in m["per_task"].items() if doms[t] == f] for f in families]
        secs, c = m.get("train_seconds"), m.get("delta_cos")
        cos = f"{c['mean']:.3f}" if c else "—"
        L.append(
            f"| {name} | {m['mean']:.3f} | {len(m['per_task'])} | {secs if secs is not None else '—'} | "
            f"{cos} | " + " | ".join(f"{np.mean(x):.2f}" if x else "—" for x in fam) + " |"
        )
    L += [
        "",
        "Declared comparisons (fixed by the config before the run; one Holm family). Difference a − b of per-task "
        "accuracy: mean with its t-interval across tasks, the bootstrap interval over items, Wilcoxon signed-rank "
        "p before and after Holm; a verdict only where the corrected test rejects and the interval excludes 0, "
        "otherwise the smallest difference the design could detect (80% power).",
        "",
        *comparison_table(cv["comparisons"]),
    ]
    missing = [k for k in cv["declared_comparisons"] if k not in cv["comparisons"]]
    if missing:
        L += ["", f"Not run yet: {', '.join(missing)}."]
    L.append("")
    L += discussion_lines(cv)
    L += _separation_table(cv.get("delta_separation", {})) + _similarity_table(cv.get("delta_similarity", {}))
    if f"{stem}.png" in plots:
        L += [f"![cross-validation by family]({stem}.png)", ""]
    if f"{stem}_losses.png" in plots:
        best = {
            n: m["best_steps"]
            for n, m in methods.items()
            if "seen" not in n and any(x is not None for x in m.get("best_steps", []))
        }
        if best:  # rows that keep their last step (warm starts) have none to name
            steps = "; ".join(f"{n}: {', '.join(map(str, b))}" for n, b in best.items())
            L += [f"Kept generator steps (lowest validation loss), per fold: {steps}.", ""]
        L += [f"![generator training and validation loss]({stem}_losses.png)", ""]
    return L


def _separation_table(sep: dict) -> list[str]:
    """Each method's adapters in δ space: silhouette and 1-NN retrieval by family, beside the tasks' own LoRAs."""
    if not sep:
        return []

    def stat(x: dict, k: str) -> str:
        return f"{x[k]['value']:+.3f} (p {x[k]['p']:.3f})"

    L = [
        "Behaviour space: each method's adapters (one per task, the mean δ over seeds) by family, against the "
        "tasks' own LoRAs on the same tasks; silhouette and leave-one-out 1-NN family retrieval on the cosine "
        "distance, permutation p-values. Adapters that ignore their prompts (the mean adapter, the multi-task "
        "LoRA) are one point per fold: their negative silhouette is the floor.",
        "",
        "| method | tasks | silhouette | own LoRAs' silhouette | 1-NN family | own LoRAs' 1-NN |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, x in sep.items():
        m, o = x["method"], x["own_loras"]
        if m == o:
            continue  # the oracle: the own LoRAs themselves
        L.append(
            f"| {name} | {x['n_tasks']} | {stat(m, 'silhouette')} | {o['silhouette']['value']:+.3f} | "
            f"{stat(m, 'nn_accuracy')} | {o['nn_accuracy']['value']:.3f} |"
        )
    return [*L, ""]


def _similarity_table(sim: dict) -> list[str]:
    """Each generator's δ against each baseline's on the same tasks: mean cosine over tasks with its t-interval."""
    rivals = list(dict.fromkeys(r for row in sim.values() for r in row))
    if not rivals:
        return []
    L = [
        "Whose behaviour a generated adapter has: the cosine of its δ (mean over seeds) to each baseline's on the "
        "same tasks, mean over tasks with its 95% t-interval.",
        "",
        "| generator | " + " | ".join(rivals) + " |",
        "|---|" + "---:|" * len(rivals),
    ]
    for g, row in sim.items():
        cells = [
            f"{row[r]['mean']:.3f} [{row[r]['ci'][0]:.3f}, {row[r]['ci'][1]:.3f}]" if r in row and row[r]["ci"] else "—"
            for r in rivals
        ]
        L.append(f"| {g} | " + " | ".join(cells) + " |")
    return [*L, ""]


def cv_plot(cv: dict, out_dir: Path, stem: str = "report_cv") -> dict[str, str]:
    """Mean accuracy per family of every method that scored held-out tasks (the seen rows and prompt controls
    aside), as grouped bars; and each fold's generator training and validation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = cv["domains"]
    families = sorted(set(doms.values()))
    names = [n for n in cv["methods"] if "seen" not in n and "prompts" not in n]
    if not names:
        return {}
    fig, ax = plt.subplots(figsize=(1.2 * len(families) + 3, 4.2))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        per = cv["methods"][n]["per_task"]
        ys = [np.mean([a for t, a in per.items() if doms[t] == f] or [np.nan]) for f in families]
        ax.bar(np.arange(len(families)) + i * width, ys, width, label=n)
    ax.set_xticks(np.arange(len(families)) + 0.4 - width / 2, families, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("accuracy on held-out tasks (mean over the family)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Cross-validation: every task scored while held out", fontsize=9)
    made = {f"{stem}.png": save_png(fig, out_dir / f"{stem}.png")}
    curves = {(n, fold): c for n, m in cv["methods"].items() for fold, c in m.get("curves", {}).items()}
    curves = {k: c for k, c in curves.items() if "seen" not in k[0]}
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, ((n, fold), c) in enumerate(sorted(curves.items())):
            color = f"C{i % 10}"
            ax.plot(*zip(*c["loss"]), color=color, alpha=0.5, lw=1, label=f"{n} {fold}: training loss")
            if c["val_loss"]:
                ax.plot(*zip(*c["val_loss"]), color=color, lw=2, marker=".", label=f"{n} {fold}: validation")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("token MSE (seed 0)")
        ax.legend(fontsize=6)
        ax.set_title("Generator training per fold: the weights of the lowest validation loss are kept", fontsize=9)
        made[f"{stem}_losses.png"] = save_png(fig, out_dir / f"{stem}_losses.png")
    return made


def save_png(fig, path: Path) -> str:
    """Write a figure as PNG atomically, close it, and return the file's name (the report links it by name)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path.name
