"""Cross-validation over tasks: folds stratified by domain, every task held out once, paired tests with Holm."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltalora.cli import app
from deltalora.delta.compute import delta_stage
from deltalora.errors import ArtifactError, ConfigError
from deltalora.experiments.cv import (
    LOFO,
    ORACLE,
    cv_cells,
    declared_comparisons,
    family_folds,
    question_of,
    task_subset,
)
from deltalora.experiments.cv_report import cv_questions
from deltalora.experiments.grid import Cell
from deltalora.experiments.questions import LIST_ALL, QUESTIONS, RQ4, sentence
from deltalora.experiments.runner import word_salad
from deltalora.workspace import Workspace


def test_folds_cover_every_task_once_and_spread_each_domain():
    domains = {f"{d}{i}": d for d in "abc" for i in range(5)} | {"z0": "z"}
    folds = family_folds(domains, 4, seed=1)
    flat = [t for f in folds for t in f]
    assert sorted(flat) == sorted(domains) and len(flat) == len(set(flat))
    for d in "abc":  # 5 tasks of a domain over 4 folds: 1 or 2 per fold
        counts = Counter(sum(domains[t] == d for t in f) for f in folds)
        assert set(counts) <= {1, 2}
    assert family_folds(domains, 4, seed=1) == folds and family_folds(domains, 4, seed=2) != folds
    with pytest.raises(ConfigError, match="experiment.folds"):
        family_folds(domains, 1)


def test_cross_validation_on_the_tiny_preset(tiny_zoo, tmp_path):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_zoo.workspace, ws.root)
    delta_stage(tiny_zoo.preset, ws, (5,))
    out = tmp_path / "results"
    args = ["experiment", "--preset", "tiny", "-w", str(ws.root), "--results-dir", str(out), "--only", "cv"]
    sets = ["--set", "experiment.folds=2", "--set", "experiment.seeds=0", "--set", "experiment.draws=1"]
    sets += ["--set", "tasks.n_val=4", "--set", "generator.val_every=1"]  # each fold's generator keeps its best step
    sets += ["--set", "experiment.cv_warm_variants=E2E", "--set", "experiment.warm_steps=2"]
    sets += ["--set", "experiment.cv_lofo=math"]  # leave-one-family-out: the math family, built from strings alone
    r = CliRunner().invoke(app, [*args, *sets])
    assert r.exit_code == 0, r.output
    cv = json.loads((out / "cv.json").read_text())
    pool = set(tiny_zoo.preset.pool)
    assert {"dnd", "dnd, other-family prompts", "dnd, random-text prompts", "dnd, seen"} <= set(cv["methods"])
    for name, m in cv["methods"].items():
        if LOFO in name:  # the held-out family's tasks only, every method on them
            assert set(m["per_task"]) == {"syn.add", "syn.parity"}, name
        elif "(" not in name or "task's own" in name:  # the warm-started rows score the first fold only (below)
            assert set(m["per_task"]) == pool, name  # every task scored once held out, once seen (generators)
    assert "dnd, seen - oracle (the task's own LoRA)" in cv["declared_comparisons"]
    # the warm-started variant and the continued baseline: fold 0's tasks only, each from fold 0's dnd generator
    assert f"dnd, {LOFO} - multi-task LoRA, {LOFO}" in cv["comparisons"]

    def lofo(*families: str) -> list[Cell]:
        ex = dataclasses.replace(tiny_zoo.preset.experiment, folds=2, cv_lofo=families)
        return cv_cells(tiny_zoo.preset.replace(experiment=ex), cv["domains"])

    assert lofo("math")[-1].name == f"dnd, {LOFO} [family math]"
    assert set(lofo("math")[-1].train) == {"syn.copy", "syn.first"}
    with pytest.raises(ConfigError, match="no pool task in family 'maths'"):
        lofo("maths")
    warm = cv["comparisons"]["E2E (from dnd) - dnd (continued)"]["across_tasks"]
    assert warm["n_tasks"] == len(cv["fold_tasks"][0]) == len(cv["methods"]["E2E (from dnd)"]["per_task"])
    cards = [json.loads(f.read_text()) for f in (ws.experiments / "generators").glob("*/config.json")]
    sources = {c["preset"]["generator"]["init_from"] for c in cards if c["preset"]["generator"]["init_from"]}
    dnd_fold0 = {
        str(f.parent)
        for f in (ws.experiments / "generators").glob("*/config.json")
        if json.loads(f.read_text())["preset"]["generator"]["variant"] == "dnd"
    }
    assert len(sources) == 1 and sources <= dnd_fold0
    # the report is written from cv.json alone: every declared comparison has its row
    doc = tmp_path / "docs" / "report.md"
    r = CliRunner().invoke(app, ["report", str(out), "--out", str(doc)])
    assert r.exit_code == 0, r.output
    text = doc.read_text()
    assert "## Cross-validation over tasks" in text and (doc.parent / "report_cv.png").exists()
    assert (doc.parent / "report_cv_losses.png").exists() and "Kept generator steps" in text
    steps = cv["methods"]["dnd"]["best_steps"]
    assert len(steps) == 2 and all(1 <= b <= cv["experiment"]["steps"] for b in steps)
    assert all(c["val_loss"] for c in cv["methods"]["dnd"]["curves"].values())
    assert all(f"| {k} |" in text for k in cv["comparisons"]) and "## RQ1" not in text
    # the report opens with one line per research question, composed from the comparisons that answer it
    lines = _question_lines(text)
    tags = question_of(cv["experiment"])
    for q in QUESTIONS:
        mine = {k: c for k, c in cv["comparisons"].items() if tags[k] == q.id}
        named = mine if len(mine) <= LIST_ALL else {k: c for k, c in mine.items() if c["verdict"] != "not detected"}
        assert all(f"{k} (" in lines[q.id] for k in named) and ("Not asked" in lines[q.id]) == (not mine)
    assert lines["RQ4"].endswith("Not asked by any run in this report.") and "E2E (from dnd) - dnd (" in lines["δ"]
    dnd, mean = (cv["methods"][n]["per_task"] for n in ("dnd", "mean of training adapters"))
    paired = cv_questions([("", cv)])["RQ2"]["dnd - mean of training adapters"]["means"]
    assert paired == pytest.approx((sum(dnd.values()) / len(dnd), sum(mean.values()) / len(mean)))
    assert cv["cell_seconds"] > 0 and "h of wall time" in text  # the run's CPU time is stated
    assert set(cv["comparisons"]) == set(cv["declared_comparisons"])
    for c in cv["comparisons"].values():
        assert c["across_tasks"]["n_tasks"] in (len(cv["fold_tasks"][0]), 4) and 0 <= c["p_holm"] <= 1
        assert c["p_holm"] >= c["across_tasks"]["p_wilcoxon"] - 1e-12  # Holm never lowers a p-value
        assert c["verdict"] in ("better", "worse", "not detected")
    # behaviour space: the generated adapters and the own LoRAs, by family, on the same tasks
    sep = cv["delta_separation"]["dnd"]
    assert sep["n_tasks"] == len(pool) and sep["own_loras"] == cv["delta_separation"][ORACLE]["method"]
    assert -1 <= sep["method"]["silhouette"]["value"] <= 1 and "| dnd | 4 |" in text.split("Behaviour space")[1]
    sim = cv["delta_similarity"]["dnd"]
    assert set(sim) == {ORACLE, "mean of training adapters", "retrieval", "top-k retrieval mixture", "multi-task LoRA"}
    assert (
        all(-1 <= x["mean"] <= 1 and x["n"] == len(pool) for x in sim.values())
        and "dnd, seen" not in cv["delta_similarity"]
    )
    assert f"dnd, {LOFO}" in cv["delta_similarity"] and "Whose behaviour" in text
    # the δ cosine every row records (kept in the committed copies, δ or not): the oracle's is 1 with one zoo seed
    assert cv["methods"][ORACLE]["delta_cos"]["mean"] == pytest.approx(1, abs=1e-4)
    assert cv["methods"]["dnd"]["delta_cos"]["n"] == len(pool) and cv["methods"]["base model"]["delta_cos"] is None
    assert f"| {cv['methods']['dnd']['delta_cos']['mean']:.3f} |" in text.split("| dnd |")[1].split("\n")[0] + "|"
    # a fresh machine (no workspace cells or generators) resumes from another run's committed cells: nothing reruns
    fresh = Workspace(tmp_path / "fresh")
    shutil.copytree(ws.root, fresh.root, ignore=shutil.ignore_patterns("experiments"))
    again = [*args[:4], str(fresh.root), "--results-dir", str(tmp_path / "again"), "--only", "cv", *sets]
    r = CliRunner().invoke(app, [*again, "--reuse", str(out)])
    assert r.exit_code == 0, r.output
    redone = json.loads((tmp_path / "again" / "cv.json").read_text())
    assert redone["comparisons"] == cv["comparisons"] and not (fresh.experiments / "generators").exists()
    # δ came back from the committed float16 copies: the behaviour-space numbers stay within float16's error
    old_sim, new_sim = cv["delta_similarity"]["dnd"], redone["delta_similarity"]["dnd"]
    assert all(new_sim[b]["mean"] == pytest.approx(old_sim[b]["mean"], abs=1e-3) for b in old_sim)
    r = CliRunner().invoke(app, [*again, "--set", "experiment.n_test=3", "--reuse", str(out)])
    assert isinstance(r.exception, ConfigError) and f"--reuse {out / 'declared.json'}" in str(r.exception)
    # cells committed before their copies kept δ: --restore-delta measures it again, trains nothing, and refuses an
    # adapter whose δ cosine is not the one its row recorded
    old = tmp_path / "old"
    shutil.copytree(out, old)
    kept = {f.relative_to(old): load_file(f) for f in old.glob("cells/*/*.delta.safetensors")}
    for f in kept:
        (old / f).unlink()

    def restore(workspace: Workspace, *more: str) -> dict[str, str]:
        r = CliRunner().invoke(
            app,
            [*args[:4], str(workspace.root), "--results-dir", str(old), *args[-2:], *sets, "--restore-delta", *more],
        )
        assert r.exit_code == 0, r.output
        return dict(line.split(": ", 1) for line in r.output.splitlines() if ": " in line)

    said = restore(fresh)  # no generators, no multi-task LoRA: those cells keep no δ
    assert said["dnd [fold 0]"].startswith("kept without δ") and said["multi-task LoRA [fold 0]"].startswith("kept")
    assert all(said[f"{m} [fold 1]"] == "restored" for m in ("retrieval", "top-k retrieval mixture", ORACLE))
    assert not (fresh.experiments / "generators").exists() and not (fresh.experiments / "multitask").exists()
    said = restore(ws)  # the workspace that scored them: every generator cell too
    assert said["dnd [fold 0]"] == "restored" and said["retrieval [fold 0]"] == "had its δ"
    gen = {f.relative_to(old) for c in ("dnd", "multi") for f in old.glob(f"cells/cv__{c}*/*.delta.safetensors")}
    for f in gen:
        (old / f).unlink()
    said = restore(fresh, "--retrain")  # trained again with their seeds: the same adapters, row by row
    assert said["dnd [fold 0]"] == "restored" and said["multi-task LoRA [fold 0]"] == "restored"
    assert (fresh.experiments / "generators").exists()
    assert CliRunner().invoke(app, [*args, *sets, "--retrain"]).exit_code != 0  # only with --restore-delta
    back = {f.relative_to(old): load_file(f) for f in old.glob("cells/*/*.delta.safetensors")}
    assert set(back) == {f for f in kept if "base_model" not in str(f)}
    assert all(torch.allclose(back[f][t].float(), kept[f][t].float(), atol=2e-3) for f in back for t in back[f])
    record = old / "cells" / "cv__retrieval__fold_1_" / "seed0.json"
    tampered = json.loads(record.read_text())
    next(iter(tampered["tasks"].values()))[0]["delta_cos"] += 0.05
    record.write_text(json.dumps(tampered))
    record.with_suffix(".delta.safetensors").unlink()
    assert restore(ws)["retrieval [fold 1]"].startswith(f"refused: {record}")
    assert not record.with_suffix(".delta.safetensors").exists()
    # RQ4 without a main grid (as in `families`): fold 0's generators from scratch (dnd's is the one trained above)
    out4 = tmp_path / "rq4"
    trained = set((ws.experiments / "generators").glob("*/generator.safetensors"))
    r = CliRunner().invoke(
        app,
        [
            *args[:-3],
            str(out4),
            "--only",
            "rq4",
            *sets,
            "--set",
            "experiment.cv_scratch_variants=B",
            "--set",
            "experiment.seen_eval=",
        ],
    )
    assert r.exit_code == 0, r.output
    rq4 = json.loads((out4 / "rq4.json").read_text())
    paired = {t for p in tiny_zoo.preset.pairs for t in p}
    assert {n: g["cell"] for n, g in rq4["generators"].items()} == {"dnd": "dnd [fold 0]", "B": "B [fold 0]"}
    assert set(rq4["generators"]["dnd"]["not_trained_on"]) == paired & set(cv["fold_tasks"][0])
    assert len(set((ws.experiments / "generators").glob("*/generator.safetensors")) - trained) == 1  # B's alone
    pair = next(iter(rq4["pairs"].values()))
    assert {"B: G(δa + δb)", "dnd on mixed prompts", "union LoRA (trained on both tasks)"} <= set(pair["methods"])
    (out4 / "discussion.md").write_text("A note on the composition run.")
    r = CliRunner().invoke(app, ["report", str(out), str(out4), "--out", str(doc)])
    assert r.exit_code == 0, r.output
    text4 = doc.read_text()
    assert "A note on the composition run." in text4.split("## RQ4: composition", 1)[1]  # under its own section
    assert "Not asked" not in _question_lines(text4)["RQ4"] and "Generators: dnd = `dnd [fold 0]`" in text4
    assert "## Cross-validation over tasks" in text4 and (doc.parent / "report_composition.png").exists()
    # a headline run and a warm-variants run sharing its cells: one report, the second adds only what it compares
    head = tmp_path / "headline"
    head.mkdir()
    warm_names = {n for n in cv["methods"] if "(from" in n or "(continued" in n}
    (head / "cv.json").write_text(
        json.dumps(
            {
                **cv,
                "experiment": {**cv["experiment"], "cv_warm_variants": []},
                "methods": {n: m for n, m in cv["methods"].items() if n not in warm_names},
                "comparisons": {k: c for k, c in cv["comparisons"].items() if k.split(" - ")[0] not in warm_names},
                "declared_comparisons": [k for k in cv["declared_comparisons"] if k.split(" - ")[0] not in warm_names],
            }
        )
    )
    (out / "discussion.md").write_text("A note on the warm run.")
    r = CliRunner().invoke(app, ["report", str(head), str(out), "--out", str(doc)])
    assert r.exit_code == 0, r.output
    text = doc.read_text()
    lines, body = _question_lines(text), text.split("## Setup", 1)[1]
    assert "A note on the warm run." in body.split("## δ and end-to-end variants", 1)[1]
    assert "E2E (from dnd) - dnd (continued) (" in lines["δ"] and "E2E" not in lines["RQ2"]
    warm = body.split("## δ and end-to-end variants", 1)[1]
    assert "| dnd - mean of training adapters |" not in warm and "| E2E (from dnd) - dnd (continued) |" in warm
    fold0 = [cv["methods"]["dnd"]["per_task"][t] for t in cv["fold_tasks"][0]]
    assert f"| dnd | {sum(fold0) / len(fold0):.3f} | {len(fold0)} |" in warm  # the rival on the section's tasks
    assert "| dnd, seen |" not in warm and (doc.parent / "report_cv1.png").exists()
    # a run declared but not started is listed with what it adds, and why (its discussion.md); an empty folder is refused
    pending = tmp_path / "pending"
    pending.mkdir()
    dec = json.loads((out / "declared.json").read_text())
    kept = [k for k in dec["declared_comparisons"] if not any(w in k for w in ("(from", "(continued", LOFO))]
    dec["declared_comparisons"] = [*kept, "B - dnd"]
    dec["experiment"] = {**dec["experiment"], "cv_warm_variants": [], "cv_scratch_variants": ["B"], "cv_lofo": []}
    (pending / "declared.json").write_text(json.dumps(dec))
    (pending / "discussion.md").write_text("Needs a GPU.")
    r = CliRunner().invoke(app, ["report", str(head), str(out), str(pending), "--out", str(doc)])
    assert r.exit_code == 0, r.output
    listed = doc.read_text().split("## Declared, not run", 1)[1]
    δ = _question_lines(doc.read_text())["δ"]  # results from the warm run, and B's comparison still to run
    assert δ.endswith(f"More declared in `{pending}`, no results yet.") and "E2E (from dnd)" in δ
    r = CliRunner().invoke(app, ["report", str(head), str(pending), "--out", str(doc)])
    assert r.exit_code == 0, r.output
    assert _question_lines(doc.read_text())["δ"].endswith(
        f"Not answered yet: declared in `{pending}`, no results (below)."
    )
    assert "**B trained from scratch (cross-validation)**" in listed and "1 comparisons not in an earlier" in listed
    assert "Needs a GPU." in listed
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["report", str(head), str(tmp_path / "empty"), "--out", str(doc)])
    assert isinstance(r.exception, ArtifactError) and "empty/cv.json: not found" in str(r.exception)


def _question_lines(text: str) -> dict[str, str]:
    """The report's opening answers, by question id."""
    lead = text.split("## The questions, answered", 1)[1].split("## Setup", 1)[0]
    return {q.id: next(x for x in lead.splitlines() if x.startswith(f"- **{q.id}** — ")) for q in QUESTIONS}


def test_an_answer_names_its_questions_own_tests_among_many():
    """Beyond LIST_ALL comparisons the undetected ones are counted, except the question's own tests (RQ4's decoded
    δ sums), which are named whatever their size."""

    def comp(diff: float) -> dict:
        at = {"diff_mean": diff, "diff_ci": [diff - 0.1, diff + 0.1], "min_detectable": 0.2, "wins": 3, "losses": 4}
        return {"across_tasks": at, "p_holm": 0.5, "verdict": "not detected"}

    comps = {f"m{i} - union": comp(-0.05 * i) for i in range(LIST_ALL + 1)} | {"B: G(δa + δb) - union": comp(-0.01)}
    line = sentence(comps, RQ4.named)
    assert "B: G(δa + δb) - union (" in line and f"Not detected in {LIST_ALL + 1} more of {LIST_ALL + 2}" in line
    assert f"m{LIST_ALL} - union (" in line and "m1 - union (" not in line  # the largest of the rest
    assert "Not detected in" in sentence(comps) and "B: G(δa + δb) - union (" not in sentence(comps)


def test_word_salad_keeps_lengths_and_vocabulary_and_is_seeded():
    like = ["What is 2 plus 3?", "one", "a b c d e f"]
    vocab = ["alpha", "beta", "gamma", "delta"]
    out = word_salad(vocab, like, 7)
    assert [len(x.split()) for x in out] == [5, 1, 6]
    assert {w for x in out for w in x.split()} <= set(vocab)
    assert word_salad(vocab, like, 7) == out and word_salad(vocab, like, 8) != out


def test_a_cell_with_an_unknown_prompt_source_is_refused():
    with pytest.raises(ValueError, match="prompts must be one of own, other, random"):
        Cell("cv", "x", "generator", ("t",), prompts="mine")


def test_declared_comparisons_are_written_before_the_run_and_cannot_change(tiny_zoo, tmp_path):
    res = tmp_path / "r"
    args = ["experiment", "--preset", "tiny", "-w", str(tiny_zoo.ws.root), "--results-dir", str(res)]
    sets = ["--set", "experiment.folds=2", "--set", "experiment.seeds=0"]
    r = CliRunner().invoke(app, [*args, *sets, "--declare-only"])
    assert r.exit_code == 0, r.output
    declared = json.loads((res / "declared.json").read_text())
    assert "dnd - mean of training adapters" in declared["declared_comparisons"]
    assert sorted(t for f in declared["fold_tasks"] for t in f) == sorted(tiny_zoo.preset.pool)
    assert CliRunner().invoke(app, [*args, *sets, "--declare-only"]).exit_code == 0  # the same run: accepted
    r = CliRunner().invoke(app, [*args, *sets, "--set", "experiment.seeds=0,1", "--declare-only"])
    assert r.exit_code != 0 and "differs from the one declared in experiment" in str(r.exception)
    assert json.loads((res / "declared.json").read_text()) == declared  # the declaration is kept as it was
    # a config field added to deltalora after a declaration was written: accepted at its default, refused otherwise
    old = {**declared, "experiment": {k: v for k, v in declared["experiment"].items() if k != "kl_lambdas"}}
    (res / "declared.json").write_text(json.dumps(old))
    assert CliRunner().invoke(app, [*args, *sets, "--declare-only"]).exit_code == 0
    r = CliRunner().invoke(app, [*args, *sets, "--set", "experiment.kl_lambdas=3", "--declare-only"])
    assert r.exit_code != 0 and "differs from the one declared in experiment" in str(r.exception)


def test_rq3_rows_fewer_tasks_and_corrupted_weights_with_true_delta(tiny_zoo):
    ex = dict(folds=2, seeds=(0, 1), cv_rq3=True, rq3_variants=("dnd", "A2-lin"), task_fractions=(0.5,))
    ex |= dict(weight_noise=(1.0,), mislabel=(0.25,))
    preset = tiny_zoo.preset.replace(experiment=dataclasses.replace(tiny_zoo.preset.experiment, **ex))
    cells = {c.name: c for c in cv_cells(preset, {t: "d" for t in preset.pool})}
    fold0 = cells["dnd [fold 0]"]
    assert "A2-lin [fold 0]" in cells and "A2-lin [fold 1]" not in cells  # the first fold only, from scratch
    half = cells["A2-lin, 50% of the training tasks [fold 0]"]
    assert set(half.train) < set(fold0.train) and half.train == cells["dnd, 50% of the training tasks [fold 0]"].train
    noisy = dict(cells["A2-lin, weight noise σ=1, true δ [fold 0]"].changes)
    assert noisy["weight_noise"] == 1.0 and noisy["corrupt_delta"] is False and "warm_from" not in noisy
    assert dict(cells["dnd, 25% mislabelled weights, true δ [fold 0]"].changes)["mislabel_fraction"] == 0.25
    declared = declared_comparisons(preset)
    assert ("A2-lin", "dnd") in declared
    assert ("A2-lin, weight noise σ=1, true δ", "dnd, weight noise σ=1, true δ") in declared
    assert not any(a.startswith("dnd,") and "%" in a for a, _ in declared)  # dnd is the reference, not a variant
    domains = {f"{d}{i}": d for d in "abc" for i in range(d == "c" and 1 or 8)}  # families of 8, 8 and 1
    train = tuple(sorted(domains))
    quarter, half = (task_subset(train, domains, f) for f in (0.25, 0.5))
    assert [sum(domains[t] == d for t in quarter) for d in "abc"] == [2, 2, 1]  # ceil(f·n), every family kept
    assert set(quarter) < set(half) and list(half) == sorted(half)  # nested, in the order given
    with pytest.raises(ConfigError, match="cv_rq3"):
        dataclasses.replace(preset.experiment, rq3_variants=("A2-lin",))


def test_every_cv_variant_is_compared_with_the_baseline_variant_held_out_seen_and_by_family(tiny_zoo):
    ex = dict(folds=2, cv_variants=("dnd", "A2-lin"), cv_lofo=("math",))
    preset = tiny_zoo.preset.replace(experiment=dataclasses.replace(tiny_zoo.preset.experiment, **ex))
    declared = declared_comparisons(preset)
    for a, b in (("A2-lin", "dnd"), ("A2-lin, seen", "dnd, seen"), (f"A2-lin, {LOFO}", f"dnd, {LOFO}")):
        assert (a, b) in declared
    assert (f"A2-lin, {LOFO}", f"retrieval, {LOFO}") in declared and ("dnd", "A2-lin") not in declared
    assert len(declared) == len(set(declared))


def test_variants_from_scratch_on_the_first_fold(tiny_zoo):
    ex = dict(folds=2, seeds=(0, 1, 2), cv_warm_seeds=2, cv_scratch_variants=("B",))
    ex |= dict(cv_rq3=True, rq3_variants=("dnd", "B"), task_fractions=(0.5,), weight_noise=(), mislabel=())
    preset = tiny_zoo.preset.replace(experiment=dataclasses.replace(tiny_zoo.preset.experiment, **ex))
    cells = [c for c in cv_cells(preset, {t: t.split(".")[0] for t in preset.pool}) if c.name.startswith("B")]
    assert [c.name for c in cells] == ["B [fold 0]", "B, 50% of the training tasks [fold 0]"]  # one plain row
    assert "warm_from" not in dict(cells[0].changes) and cells[0].seeds(ex["seeds"]) == (0, 1)
    declared = declared_comparisons(preset)
    assert (
        declared.count(("B", "dnd")) == 1
        and ("B, 50% of the training tasks", "dnd, 50% of the training tasks") in declared
    )
    with pytest.raises(ConfigError, match="cv_scratch_variants"):
        dataclasses.replace(preset.experiment, cv_scratch_variants=("dnd",))


def test_warm_started_rows_ablations_and_their_comparisons(tiny_zoo):
    ex = dict(folds=2, seeds=(0, 1, 2), cv_warm_variants=("A2", "C"), warm_steps=7, warm_long_steps=70)
    ex |= dict(cv_warm_ablations=True, probe_sizes=(1,), lambdas=(3.0,), kl_lambdas=(0.3,), cv_warm_seeds=2)
    ex |= dict(cv_warm_pairs=("C:A2",))
    preset = tiny_zoo.preset.replace(experiment=dataclasses.replace(tiny_zoo.preset.experiment, **ex))
    domains = {t: t.split(".")[0] for t in preset.pool}
    warm = {c.name: c for c in cv_cells(preset, domains) if "(from dnd)" in c.name or "(continued" in c.name}
    assert sorted(warm) == sorted(
        f"{n} [fold 0]"  # the first fold only
        for n in (
            "dnd (continued)",
            "dnd (continued, 70 steps)",
            "A2 (from dnd)",
            "C (from dnd)",
            "A2, δ shuffled across tasks (control) (from dnd)",
            "A2, |P|=1 (from dnd)",
            "A2, λ_δ=3 (from dnd)",
            "C, λ_KL=0.3 (from dnd)",
        )
    )
    for c in warm.values():
        ch = dict(c.changes)
        assert ch["warm_from"] == "dnd" and ch["val_every"] == 0  # each keeps its last step
        assert ch["steps"] == (70 if "70 steps" in c.name else 7) and c.seeds(ex["seeds"]) == (0, 1)
    assert dict(warm["C, λ_KL=0.3 (from dnd) [fold 0]"].changes)["lambda_kl"] == 0.3
    declared = declared_comparisons(preset)
    assert ("A2 (from dnd)", "dnd (continued, 70 steps)") in declared and ("C (from dnd)", "dnd") in declared
    assert ("A2, |P|=1 (from dnd)", "A2 (from dnd)") in declared and ("C (from dnd)", "A2 (from dnd)") in declared
    assert ("C, λ_KL=0.3 (from dnd)", "C (from dnd)") in declared
    with pytest.raises(ConfigError, match="add C to experiment.cv_warm_variants"):
        dataclasses.replace(preset.experiment, cv_warm_variants=("A2",), cv_warm_pairs=())
    with pytest.raises(ConfigError, match="cv_warm_pairs"):
        dataclasses.replace(preset.experiment, cv_warm_pairs=("C:E2E",))


def test_select_compares_candidates_on_validation_only(tiny_zoo, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_zoo.workspace, ws.root)
    delta_stage(tiny_zoo.preset, ws, (5,))
    out = tmp_path / "selection.json"
    sets = ["--set", "tasks.n_val=4", "--set", "experiment.folds=2", "--set", "experiment.steps=4"]
    args = ["select", "--preset", "tiny", "-w", str(ws.root), "--out", str(out), *sets]
    cands = ["--candidate", "generator.head=conv", "--candidate", "generator.head=basis generator.lr=0.01"]
    r = CliRunner().invoke(app, [*args, *cands])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    rows = res["candidates"]
    assert set(rows) == {"generator.head=conv", "generator.head=basis generator.lr=0.01"}
    assert res["chosen"] == min(rows, key=lambda k: rows[k]["val_loss"])
    assert not set(res["train_tasks"]) & set(res["held_out_not_read"]) and res["held_out_not_read"]
    for row in rows.values():
        assert row["val_curve"] and row["val_loss"] == pytest.approx(min(v for _, v in row["val_curve"]), abs=1e-5)
    # the experiments' folder stays deltalora's: the grid runs in the same workspace after a selection
    args_cv = [
        "experiment",
        "--preset",
        "tiny",
        "-w",
        str(ws.root),
        "--results-dir",
        str(tmp_path / "r"),
        "--only",
        "cv",
    ]
    r = CliRunner().invoke(app, [*args_cv, *sets, "--set", "experiment.seeds=0", "--set", "experiment.draws=1"])
    assert r.exit_code == 0, r.output
    # a second call reuses the trained candidates
    monkeypatch.setattr("deltalora.experiments.selection.train_generator", lambda *a, **k: pytest.fail("retrained"))
    r = CliRunner().invoke(app, [*args, *cands])
    assert r.exit_code == 0, r.output
    monkeypatch.undo()
    # candidates with different targets: their losses are not comparable, their behaviour on validation items is
    targets = [
        "--candidate",
        "generator.head=basis",
        "--candidate",
        "generator.head=basis generator.checkpoints_per_run=1",
    ]
    r = CliRunner().invoke(app, [*args, *targets])
    assert r.exit_code != 0 and "rank them with --by accuracy" in str(r.exception)
    r = CliRunner().invoke(app, [*args, *targets, "--by", "accuracy", "--n-val", "3"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    rows = res["candidates"]
    assert res["by"] == "accuracy" and res["chosen"] == max(rows, key=lambda k: rows[k]["val_acc"])
    for row in rows.values():
        assert set(row["val_acc_per_task"]) == set(res["train_tasks"])
        assert row["val_acc"] == pytest.approx(sum(row["val_acc_per_task"].values()) / len(res["train_tasks"]))
        assert all(a * 3 == round(a * 3) for a in row["val_acc_per_task"].values())  # 3 items each
    assert "oracle_val_acc" not in res  # the zoo scored 4 validation items per task, these 3: not the same items
