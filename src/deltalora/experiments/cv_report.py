"""The report's cross-validation section and plot, from ``cv.json`` alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deltalora.io import atomic_write_bytes


def cv_section(cv: dict, plots: dict[str, str]) -> list[str]:
    """Cross-validation: each method's mean accuracy over tasks (each scored where its fold held it out, or, for
    the rows marked seen, by the previous fold's generators that trained on it), per family, and the declared
    comparisons with their paired tests and Holm-corrected verdicts."""
    ex, methods, doms = cv["experiment"], cv["methods"], cv["domains"]
    families = sorted(set(doms.values()))
    L = [
        "## Cross-validation over tasks",
        "",
        *_answers(cv),
        f"{len(doms)} tasks in {len(families)} families dealt into {cv['folds']} folds stratified by family; each "
        "fold's generators and baselines are built without its tasks, which are then scored (held out). Rows marked "
        "*seen* score the next fold's tasks with this fold's generators, which trained on them. "
        f"Generator seeds {ex['seeds']}, {ex['draws']} prompt draw(s) per task and seed, {ex['n_test']} test items "
        "per task, the same items for every method. Accuracy is the mean over tasks of each task's mean over "
        "seeds and draws."
        + (
            f" The finished cells took {cv['cell_seconds'] / 3600:.1f} h of wall time, summed over cells and seeds "
            "(generator training, baselines and scoring; processes ran side by side)."
            if cv.get("cell_seconds")
            else ""
        ),
        "",
        "| method | mean accuracy | tasks | train s (mean per adapter source) | " + " | ".join(families) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(families),
    ]
    for name, m in methods.items():
        fam = [[a for t, a in m["per_task"].items() if doms[t] == f] for f in families]
        secs = m.get("train_seconds")
        L.append(
            f"| {name} | {m['mean']:.3f} | {len(m['per_task'])} | {secs if secs is not None else '—'} | "
            + " | ".join(f"{np.mean(x):.2f}" if x else "—" for x in fam)
            + " |"
        )
    L += [
        "",
        "Declared comparisons (fixed by the config before the run; one Holm family). Difference a − b of per-task "
        "accuracy: mean with its t-interval across tasks, the bootstrap interval over items, Wilcoxon signed-rank "
        "p before and after Holm; a verdict only where the corrected test rejects and the interval excludes 0, "
        "otherwise the smallest difference the design could detect (80% power).",
        "",
        "| a − b | difference [95% CI, tasks] | [95% CI, items] | wins/losses | p Wilcoxon | p Holm | verdict | "
        "a / b |",
        "|---|---|---|---|---:|---:|---|---:|",
    ]
    for key, c in cv["comparisons"].items():
        t, it = c["across_tasks"], c["across_items"]
        L.append(
            f"| {key} | {_difference(t)} | [{it['ci'][0]:+.3f}, {it['ci'][1]:+.3f}] | {t['wins']}/{t['losses']} | "
            f"{t['p_wilcoxon']:.2g} | {c['p_holm']:.2g} | {_word(c)} | {c['ratio_of_means']:.2f} |"
        )
    missing = [k for k in cv["declared_comparisons"] if k not in cv["comparisons"]]
    if missing:
        L += ["", f"Not run yet: {', '.join(missing)}."]
    L.append("")
    if "report_cv.png" in plots:
        L += ["![cross-validation by family](report_cv.png)", ""]
    if "report_cv_losses.png" in plots:
        best = {n: m["best_steps"] for n, m in methods.items() if m.get("best_steps")}
        L += [
            "Kept generator steps (lowest validation loss), per fold: "
            + "; ".join(f"{n}: {', '.join(map(str, b))}" for n, b in best.items() if "seen" not in n)
            + ".",
            "",
            "![generator training and validation loss](report_cv_losses.png)",
            "",
        ]
    return L


def cv_plot(cv: dict, out_dir: Path) -> dict[str, str]:
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
    made = {"report_cv.png": _save(fig, out_dir / "report_cv.png")}
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
        made["report_cv_losses.png"] = _save(fig, out_dir / "report_cv_losses.png")
    return made


def _save(fig, path: Path) -> str:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def _difference(t: dict) -> str:
    """Mean difference across tasks with its t-interval."""
    ci = t["diff_ci"]
    return f"{t['diff_mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def _caveat(c: dict) -> str | None:
    """Where nothing was detected: equal on every task, or the smallest difference the design could see."""
    t = c["across_tasks"]
    if c["verdict"] != "not detected":
        return None
    if t["wins"] + t["losses"] == 0:
        return "equal on every task"
    return f"could see ≥ {t['min_detectable']:.3f}" if t.get("min_detectable") is not None else None


def _word(c: dict) -> str:
    """The verdict with its caveat."""
    caveat = _caveat(c)
    return c["verdict"] + (f" ({caveat})" if caveat else "")


def _answers(cv: dict) -> list[str]:
    """One sentence per compared method, first in the section: its mean and each declared comparison's verdict,
    difference, interval and Holm-corrected p (the reader's answer before the tables)."""
    by_method: dict[str, list[str]] = {}
    for key, c in cv["comparisons"].items():
        a, b = key.split(" - ", 1)
        caveat = _caveat(c)
        by_method.setdefault(a, []).append(
            f"{c['verdict']} vs {b} ({_difference(c['across_tasks'])}, p_Holm {c['p_holm']:.2g}"
            + (f"; {caveat})" if caveat else ")")
        )
    if not by_method:
        return []
    L = ["Answers (each declared comparison, corrected over the whole declared list):", ""]
    for a, parts in by_method.items():
        m = cv["methods"].get(a)
        mean = f" (mean {m['mean']:.3f} over {len(m['per_task'])} tasks)" if m else ""
        L.append(f"- **{a}**{mean}: " + "; ".join(parts) + ".")
    return [*L, ""]
