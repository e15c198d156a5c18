"""Declared paired comparisons as the reader sees them: a Markdown table, and the parts of a sentence.

Shared by the cross-validation sections, RQ4 and the answers that open the report (``questions``): each
comparison carries its difference across units with a t-interval, the item bootstrap's interval, Wilcoxon p
before and after Holm, and a verdict; where nothing was detected, the smallest difference the design could see.
"""

from __future__ import annotations


def comparison_table(comparisons: dict, unit: str = "tasks") -> list[str]:
    """Paired comparisons as a Markdown table: difference with its t-interval across ``unit`` and the item
    bootstrap's interval, wins/losses, p before and after Holm, the verdict (or what the design could see), and
    the ratio of means where it was computed."""
    ratio = all("ratio_of_means" in c for c in comparisons.values())
    L = [
        f"| a − b | difference [95% CI, {unit}] | [95% CI, items] | wins/losses | p Wilcoxon | p Holm | verdict |"
        + (" a / b |" if ratio else ""),
        "|---|---|---|---|---:|---:|---|" + ("---:|" if ratio else ""),
    ]
    for key, c in comparisons.items():
        t, it = c["across_tasks"], c["across_items"]
        L.append(
            f"| {key} | {difference(t)} | [{it['ci'][0]:+.3f}, {it['ci'][1]:+.3f}] | {t['wins']}/{t['losses']} | "
            f"{t['p_wilcoxon']:.2g} | {c['p_holm']:.2g} | {_word(c)} |"
            + (f" {c['ratio_of_means']:.2f} |" if ratio else "")
        )
    return L


def difference(t: dict) -> str:
    """Mean difference across tasks with its t-interval."""
    ci = t["diff_ci"]
    return f"{t['diff_mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def caveat(c: dict) -> str | None:
    """Where nothing was detected: equal on every task, or the smallest difference the design could see."""
    t = c["across_tasks"]
    if c["verdict"] != "not detected":
        return None
    if t["wins"] + t["losses"] == 0:
        return "equal on every task"
    return f"could see ≥ {t['min_detectable']:.3f}" if t.get("min_detectable") is not None else None


def _word(c: dict) -> str:
    """The verdict with its caveat."""
    why = caveat(c)
    return c["verdict"] + (f" ({why})" if why else "")
