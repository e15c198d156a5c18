"""The harness's paired statistics: intervals with t quantiles, tests across tasks and items, Holm, verdicts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from deltalora.stats import (
    across_tasks,
    bootstrap_items,
    holm,
    min_detectable_effect,
    t_interval,
    verdict,
    welch_interval,
)


def test_t_interval_uses_the_t_quantile():
    xs = [0.5, 0.7]
    r = t_interval(xs)
    half = stats.t.ppf(0.975, 1) * np.std(xs, ddof=1) / math.sqrt(2)
    assert r["ci"] == pytest.approx([0.6 - half, 0.6 + half])
    assert half > 1.96 * np.std(xs, ddof=1) / math.sqrt(2) * 5  # n = 2: 12.7, not 1.96
    assert t_interval([0.3])["ci"] is None and t_interval([0.3, 0.3])["ci"] == [0.3, 0.3]


def test_holm_adjusts_step_down_and_stays_monotone():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"x": 0.6, "y": 0.7}) == pytest.approx({"x": 1.0, "y": 1.0})


def test_across_tasks_detects_a_consistent_gain_and_not_noise():
    rng = np.random.default_rng(0)
    tasks = [f"t{i}" for i in range(20)]
    b = {t: float(rng.uniform(0.2, 0.6)) for t in tasks}
    better = {t: b[t] + 0.1 + float(rng.normal(0, 0.02)) for t in tasks}
    r = across_tasks(better, b)
    assert r["n_tasks"] == 20 and r["wins"] == 20 and r["p_wilcoxon"] < 1e-4 and r["p_sign"] < 1e-4
    assert r["diff_ci"][0] > 0 and verdict(r["diff_ci"], r["p_wilcoxon"]) == "better"
    same = across_tasks(b, b)
    assert same["p_wilcoxon"] == 1.0 and verdict(same["diff_ci"], same["p_wilcoxon"]) == "not detected"
    noisy = {t: b[t] + float(rng.normal(0, 0.05)) for t in tasks}
    n = across_tasks(noisy, b)
    sd = np.std([noisy[t] - b[t] for t in tasks], ddof=1)
    assert n["min_detectable"] == pytest.approx(min_detectable_effect(sd, 20))


def test_bootstrap_pairs_the_items():
    rng = np.random.default_rng(1)
    a = {t: rng.integers(0, 2, 50).astype(float) for t in ("x", "y")}
    shifted = {t: v + 0.1 for t, v in a.items()}  # the same items, every one 0.1 better: no item noise left
    r = bootstrap_items(shifted, a, draws=200)
    assert r["ci"] == pytest.approx([0.1, 0.1]) and r["p"] == pytest.approx(1 / 200)
    assert bootstrap_items(a, a, draws=200)["p"] == 1.0
    noisy = bootstrap_items({t: 1 - v for t, v in a.items()}, a, draws=200)
    assert noisy["ci"][0] < noisy["diff"] < noisy["ci"][1]


def test_smallest_detectable_effect_shrinks_with_more_tasks():
    assert min_detectable_effect(0.1, 1) is None
    assert min_detectable_effect(0.1, 40) < min_detectable_effect(0.1, 10) < min_detectable_effect(0.1, 3)
    # n = 10, sd 0.1: (t_.975,9 + t_.8,9) * 0.1 / sqrt(10)
    assert min_detectable_effect(0.1, 10) == pytest.approx((2.2622 + 0.8834) * 0.1 / math.sqrt(10), rel=1e-3)


# ---------------------------------------------------------------- the generator's ceiling


def test_principal_basis_and_projection():
    from deltalora.generator.basis import principal_basis, project

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    mean, basis, var = principal_basis(x)
    assert basis.shape == (5, 40)  # 6 centred rows span 5 directions
    torch.testing.assert_close(basis @ basis.T, torch.eye(5, dtype=torch.float64))
    assert (np.diff(var) <= 1e-12).all() and var.sum() == pytest.approx(((x - x.mean(0)) ** 2).sum().item() / 6)
    torch.testing.assert_close(project(x[2], mean, basis, 5), x[2])  # in the span: exact
    torch.testing.assert_close(project(x[2], mean, basis, 0), mean)  # rank 0: the mean
    excl = torch.tensor([False, False, True, False, False, False])
    m2, b2, _ = principal_basis(x, excl)
    torch.testing.assert_close(m2, x[~excl].mean(0))
    assert not torch.allclose(project(x[2], m2, b2, 4), x[2])  # a row left out is not reproduced


def test_target_ceiling_on_the_tiny_zoo(tiny_zoo):
    from deltalora.experiments.ceiling import target_ceiling

    tasks = ["syn.add", "syn.parity", "syn.copy", "syn.first"]
    r = target_ceiling(tiny_zoo.preset, tiny_zoo.ws, tasks, ["syn.add"], ranks=(0, 7), n_test=8)
    assert r["n_checkpoints"] == 8 and r["explained_variance"][-1] == pytest.approx(1.0)
    row = r["tasks"]["syn.add"]
    assert row["seen"]["7"] == row["oracle"]  # 8 checkpoints span 7 directions: the reference itself
    assert set(row["held_out"]) == {"0", "7"} and 0 <= row["held_out"]["0"] <= 1


def test_ceiling_verb(tiny_zoo, tmp_path):
    from typer.testing import CliRunner

    from deltalora.cli import app
    from deltalora.errors import UsageError

    out = tmp_path / "c.json"
    args = ["ceiling", "--preset", "tiny", "--workspace", str(tiny_zoo.ws.root), "--n-test", "4", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--ranks", "0,2"])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert set(r["tasks"]) == {"syn.add", "syn.parity", "syn.copy", "syn.first"}  # two per domain, all selected
    assert r["ranks"] == [0, 2] and set(r["mean_held_out"]) == {"0", "2"}
    bad = CliRunner().invoke(app, [*args, "--ranks", "x"])
    assert isinstance(bad.exception, UsageError) and "--ranks" in str(bad.exception)


def test_welch_interval_uses_the_t_quantile_at_welch_degrees_of_freedom():
    a, b = [0.52, 0.48, 0.55], [0.40, 0.47]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 2
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    w = welch_interval(a, b)
    d = np.mean(a) - np.mean(b)
    assert w["diff"] == pytest.approx(d) and w["ci"] == pytest.approx([d - half, d + half])
    assert half > 1.96 * math.sqrt(va + vb)  # two seeds: wider than the normal interval the report used to draw
    assert welch_interval([0.5], [0.4])["ci"] is None
