"""Paired comparisons for the evaluation harness: intervals, tests across tasks and items, Holm's correction.

Two methods are always compared on the same tasks and the same scored items, so every test here is paired:
across tasks (Wilcoxon signed-rank and the sign test on per-task accuracies), across items (a bootstrap that
resamples items within each task), and over seeds (a t-interval of the mean). A verdict is given only where the
Holm-corrected test rejects and the interval excludes zero; otherwise the comparison reports the smallest effect
the design could have detected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats


def t_interval(xs: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean and its t-interval (small n: the t quantile, not 1.96); a single value has no interval."""
    x = np.asarray(xs, dtype=float)
    mean = float(x.mean())
    if len(x) < 2 or np.ptp(x) == 0:
        return {"mean": mean, "ci": [mean, mean] if len(x) >= 2 else None, "n": len(x)}
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return {"mean": mean, "ci": [float(ci.low), float(ci.high)], "n": len(x)}


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean(a) − mean(b) of two independent samples (e.g. seed means of two methods) with Welch's t-interval (the
    t quantile at the Welch–Satterthwaite degrees of freedom); None for the interval where either has one value."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(x.mean() - y.mean())
    if min(len(x), len(y)) < 2 or (np.ptp(x) == 0 and np.ptp(y) == 0):
        return {"diff": diff, "ci": None if min(len(x), len(y)) < 2 else [diff, diff]}
    ci = stats.ttest_ind(x, y, equal_var=False).confidence_interval(confidence)
    return {"diff": diff, "ci": [float(ci.low), float(ci.high)]}


def across_tasks(a: Mapping[str, float], b: Mapping[str, float], confidence: float = 0.95) -> dict:
    """Paired comparison of per-task scores of two methods on the same tasks: mean difference a − b with its
    t-interval, Wilcoxon signed-rank and sign-test p-values (two-sided), and the smallest detectable effect."""
    tasks = sorted(set(a) & set(b))
    d = np.array([a[t] - b[t] for t in tasks])
    out = {"n_tasks": len(tasks), **_prefixed(t_interval(d, confidence), "diff_")}
    nonzero = d[d != 0]
    out["p_wilcoxon"] = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) >= 1 else 1.0
    wins = int((d > 0).sum())
    out["p_sign"] = float(stats.binomtest(wins, len(nonzero), 0.5).pvalue) if len(nonzero) else 1.0
    out["wins"], out["losses"] = wins, int((d < 0).sum())
    out["min_detectable"] = min_detectable_effect(float(d.std(ddof=1)) if len(d) > 1 else float("nan"), len(d))
    return out


def bootstrap_items(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    draws: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Interval of the mean over tasks of (a − b), resampling each task's scored items with replacement (the same
    resampled items for both methods: paired), and the two-sided bootstrap p-value of no difference."""
    tasks = sorted(set(a) & set(b))
    diffs = [np.asarray(a[t], dtype=float) - np.asarray(b[t], dtype=float) for t in tasks]
    rng = np.random.default_rng(seed)
    boot = np.array([np.mean([d[rng.integers(0, len(d), len(d))].mean() for d in diffs]) for _ in range(draws)])
    observed = float(np.mean([d.mean() for d in diffs]))
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    p = 2 * min((boot <= 0).mean(), (boot >= 0).mean())
    return {"diff": observed, "ci": [float(lo), float(hi)], "p": float(min(1.0, max(p, 1 / draws))), "draws": draws}


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values over a declared family of comparisons (hand-written: scipy has only
    Benjamini–Hochberg, and statsmodels is not a dependency for five lines)."""
    names = sorted(pvalues, key=pvalues.__getitem__)
    m, running, out = len(names), 0.0, {}
    for i, name in enumerate(names):
        running = max(running, min(1.0, (m - i) * pvalues[name]))
        out[name] = running
    return out


def verdict(diff_ci: Sequence[float] | None, p_adjusted: float, alpha: float = 0.05) -> str:
    """'better' / 'worse' only where the corrected test rejects and the interval excludes 0; else 'not detected'."""
    if diff_ci is None or p_adjusted >= alpha:
        return "not detected"
    if diff_ci[0] > 0:
        return "better"
    if diff_ci[1] < 0:
        return "worse"
    return "not detected"


def min_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest true mean difference a paired t-test on n differences of this sd detects with this power."""
    if n < 2 or not np.isfinite(sd):
        return None
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / np.sqrt(n))


def _prefixed(d: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items()}
