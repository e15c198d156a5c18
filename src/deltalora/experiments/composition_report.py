"""The report's RQ4 section and its heat-map, from ``rq4.json`` (``composition.run_composition``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deltalora.experiments.answers import comparison_table
from deltalora.experiments.composition import UNION_COS
from deltalora.experiments.cv_report import discussion_lines, save_png, with_discussion
from deltalora.io import read_json

PLOT = "report_composition.png"


def find_rq4(rqs: dict, more: Sequence[Path]) -> tuple[dict | None, list[Path]]:
    """RQ4's results: the main folder's, else the first further folder's ``rq4.json``; and the further folders
    that hold nothing else (no ``cv.json`` or declaration), which the cross-validation sections then skip."""
    found = [d for d in more if (d / "rq4.json").exists()]
    only = [d for d in found if not (d / "cv.json").exists() and not (d / "declared.json").exists()]
    if "rq4" in rqs:
        return rqs["rq4"], only
    return (with_discussion(read_json(found[0] / "rq4.json", "composition results"), found[0]) if found else None), only


def composition_plot(rq4: dict, out_dir: Path) -> dict[str, str]:
    """Accuracy of every method on each pair's two tasks, as a heat-map (``report_composition.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = rq4["pairs"]
    if not pairs:
        return {}

    def generic(m: str, p: dict) -> str:
        return m.replace(p["tasks"][0], "task a").replace(p["tasks"][1], "task b")

    methods = list(dict.fromkeys(generic(m, p) for p in pairs.values() for m in p["methods"]))
    cols = [(pk, t) for pk, p in pairs.items() for t in ("a", "b")]
    grid = np.full((len(methods), len(cols)), np.nan)
    for j, (pk, t) in enumerate(cols):
        for m, row in pairs[pk]["methods"].items():
            grid[methods.index(generic(m, pairs[pk])), j] = row[f"acc_{t}"]["mean"]
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 3, 0.42 * len(methods) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    names = [pairs[pk]["tasks"][0 if t == "a" else 1].rsplit(".", 1)[-1] for pk, t in cols]
    ax.set_xticks(range(len(cols)), names, rotation=45, ha="right", fontsize=7)
    for i, j in zip(*np.nonzero(~np.isnan(grid))):
        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title("RQ4: composition (columns: each pair's two tasks)", fontsize=9)
    return {PLOT: save_png(fig, out_dir / PLOT)}


def rq4_section(rq4: dict, plots: dict[str, str], fmt) -> list[str]:
    """The RQ4 section: which generators composed, per pair a table of every method, the paired comparisons and the
    heat-map; ``fmt`` renders a mean ± std record."""
    L = ["## RQ4: composition", ""]
    gens = rq4.get("generators", {})
    if gens:
        L += [
            "Generators: "
            + "; ".join(
                f"{n} = `{g['cell']}` ({g['n_train']} training tasks"
                + (f"; not trained on {', '.join(g['not_trained_on'])})" if g["not_trained_on"] else ")")
                for n, g in gens.items()
            )
            + ".",
            "",
        ]
    base = ", ".join(f"{t.rsplit('.', 1)[-1]} {a:.3f}" for t, a in rq4["base_acc"].items())
    # rq4.json files written before the δ cosine was measured have no such column
    behaves = any(row.get(UNION_COS) for p in rq4["pairs"].values() for row in p["methods"].values())
    L += [
        f"Base-model accuracy: {base}."
        + (
            " δ cos to union: the cosine of each adapter's Delta Activations to the union LoRA's (|P| as in the "
            "zoo's δ), how much it behaves like the adapter trained on both tasks."
            if behaves
            else ""
        ),
        "",
    ]
    for p in rq4["pairs"].values():
        a, b = p["tasks"]
        cols = ["method", f"acc {a.rsplit('.', 1)[-1]}", f"acc {b.rsplit('.', 1)[-1]}", "mean"]
        cols += ["δ cos to union", "n"] if behaves else ["n"]
        L += [f"**{a} + {b}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for m, row in p["methods"].items():
            cells = [m, fmt(row["acc_a"]), fmt(row["acc_b"]), fmt(row["acc_mean"])]
            cells += [fmt(row.get(UNION_COS), 2)] if behaves else []
            L.append("| " + " | ".join([*cells, str(row["acc_mean"]["n"])]) + " |")
        L.append("")
    if rq4.get("comparisons"):
        L += [
            "Paired over the (pair, task) units both methods scored (Holm over this list; interpolations other "
            "than α = 0.5 weigh a pair's two tasks unequally and are not tested):",
            "",
            *comparison_table(rq4["comparisons"], unit="pair × task units"),
            "",
        ]
    L += discussion_lines(rq4)
    if PLOT in plots:
        L += [f"![composition]({PLOT})", ""]
    return L
