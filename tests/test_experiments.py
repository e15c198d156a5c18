"""The experiment grid and the report, end to end on the tiny preset (a tiny budget)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
import time

import pytest
import torch
from typer.testing import CliRunner

import deltalora.experiments.composition as composition
import deltalora.experiments.grid as grid
import deltalora.experiments.runner as runner_mod
from deltalora.cli import app
from deltalora.delta.compute import delta_stage
from deltalora.experiments.cells import CellStore
from deltalora.experiments.run import run_experiment
from deltalora.generator.dataset import training_set
from deltalora.generator.encoder import PromptEncoder
from deltalora.io import Busy, build_once, defer_when_busy, file_lock
from deltalora.presets import apply_overrides
from deltalora.workspace import Workspace

RQ_FILES = ("rq1", "rq2", "rq2_lodo", "rq3", "rq4", "ablations")


@pytest.fixture(scope="module")
def ws(tiny_zoo, tmp_path_factory):
    """A private copy of the tiny zoo with δ for the probe sets the grid uses."""
    dst = Workspace(tmp_path_factory.mktemp("exp") / "ws")
    shutil.copytree(tiny_zoo.workspace, dst.root)
    delta_stage(tiny_zoo.preset, dst, (1, 5))
    return dst


@pytest.fixture(scope="module")
def run(ws, tmp_path_factory):
    """The whole grid through the CLI, recording every prompt list that conditions a generator."""
    seen: list[list[str]] = []
    orig = runner_mod.generate_tensors

    def recording(gen, encoder, prompts, seed):
        seen.append(list(prompts))
        return orig(gen, encoder, prompts, seed)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner_mod, "generate_tensors", recording)
    mp.setattr(composition, "generate_tensors", recording)
    results = tmp_path_factory.mktemp("exp_results")
    r = CliRunner().invoke(app, ["experiment", "--preset", "tiny", "-w", str(ws.root), "--results-dir", str(results)])
    mp.undo()
    assert r.exit_code == 0, r.output
    return results, seen


def _load(results, rq):
    return json.loads((results / f"{rq}.json").read_text())


def test_every_rq_file_and_cell_is_written(run, ws, tiny_preset):
    results, _ = run
    for rq in RQ_FILES:
        assert (results / f"{rq}.json").exists(), rq
    ex = tiny_preset.experiment
    rq1 = _load(results, "rq1")
    assert rq1["not_run"] == []
    for v in ex.variants:
        cell = rq1["cells"][v]
        assert cell["seeds_done"] == list(ex.seeds)
        assert cell["overall"]["acc"]["n"] == len(ex.seeds) * ex.draws  # >= 2 seeds x draws adapters per number
        for t in ex.seen_eval:
            assert 0.0 <= cell["per_task"][t]["acc"]["mean"] <= 1.0
        assert cell["loss_curve"], "loss curve recorded"
    # every scored adapter keeps its per-item hits (for paired tests), whose mean is its accuracy
    records = sorted(ws.experiments.glob("cells/rq1__*/seed*.json"))
    assert records
    for rec in records:
        for rows in json.loads(rec.read_text())["tasks"].values():
            for r in rows:
                assert 1 <= len(r["hits"]) <= ex.n_test
                assert sum(r["hits"]) / len(r["hits"]) == pytest.approx(r["acc"])
    oracle, base = rq1["cells"]["oracle (the task's own LoRA)"], rq1["cells"]["base model"]
    assert oracle["overall"]["param_mse"]["mean"] == 0.0 and oracle["overall"]["kl"]["mean"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert oracle["overall"]["delta_cos"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert base["overall"]["delta_cos"]["mean"] == pytest.approx(0.0, abs=1e-6)
    for rq in ("rq1", "rq2", "rq2_lodo"):  # issue 13's baselines run in the CLI's full tiny grid
        rows = _load(results, rq)["cells"]
        for m in (grid.MIXTURE, grid.MULTITASK):
            assert 0.0 <= rows[grid.METHODS[m].label]["overall"]["acc"]["mean"] <= 1.0, (rq, m)
    rq4 = _load(results, "rq4")
    pair = rq4["pairs"]["syn.add+syn.copy"]
    assert {
        "syn.add LoRA",
        "union LoRA (trained on both tasks)",
        "LoRA sum (PEFT cat, rank 2r)",
        "PEFT svd merge (rank r)",
        "B: G(δa + δb)",
        "dnd on mixed prompts",
    } <= set(pair["methods"])
    assert pair["methods"]["B: G(δa + δb)"]["acc_a"]["n"] == len(ex.seeds)
    # behaviour: the union LoRA's δ, measured while scoring, is the zoo's δ of it; the others' cosines are cosines
    assert pair["methods"]["union LoRA (trained on both tasks)"]["delta_cos_union"]["mean"] == pytest.approx(
        1, abs=1e-4
    )
    assert all(-1 <= m["delta_cos_union"]["mean"] <= 1 for m in pair["methods"].values())
    # paired over the (pair, task) units with Holm: each composition against the union LoRA, δ sums against cat
    comps = rq4["comparisons"]
    for key in (
        "LoRA sum (PEFT cat, rank 2r) - union LoRA (trained on both tasks)",
        "B: G(δa + δb) - LoRA sum (PEFT cat, rank 2r)",
        "the scored task's own LoRA - union LoRA (trained on both tasks)",
    ):
        assert (
            comps[key]["across_tasks"]["n_tasks"] == 2
            and comps[key]["p_holm"] >= comps[key]["across_tasks"]["p_wilcoxon"]
        )
    assert not any("0.25·δa" in k for k in comps)  # a lopsided interpolation is not one method across units
    cat = pair["methods"]["LoRA sum (PEFT cat, rank 2r)"]
    union = pair["methods"]["union LoRA (trained on both tasks)"]
    want = (cat["acc_a"]["mean"] + cat["acc_b"]["mean"] - union["acc_a"]["mean"] - union["acc_b"]["mean"]) / 2
    assert comps["LoRA sum (PEFT cat, rank 2r) - union LoRA (trained on both tasks)"]["across_tasks"][
        "diff_mean"
    ] == pytest.approx(want)


def test_no_conditioning_prompt_is_a_scored_item(run, tiny_zoo):
    from deltalora.data.tasks import load_task, resolve_spec

    _, seen = run
    assert seen
    scored = {it.prompt for t in tiny_zoo.preset.pool for it in load_task(resolve_spec(t), tiny_zoo.preset.tasks).test}
    used = {p for prompts in seen for p in prompts}
    assert used and not used & scored


def test_rerun_skips_finished_cells_and_changes_nothing(run, ws, tiny_preset, monkeypatch):
    results, _ = run
    before = {rq: (results / f"{rq}.json").read_text() for rq in RQ_FILES}

    def no_training(*a, **k):
        raise AssertionError("a finished generator was trained again")

    monkeypatch.setattr(runner_mod, "train_generator", no_training)
    run_experiment(tiny_preset, ws, results, progress=False)
    assert {rq: (results / f"{rq}.json").read_text() for rq in RQ_FILES} == before


def test_a_fresh_machine_resumes_from_the_committed_cells(run, ws, tiny_preset, monkeypatch, tmp_path):
    """With the workspace's experiments gone, the compact cell copies in the results folder (δ dropped) are
    enough: nothing is trained or scored again and the result files say the same (but for the loss curves,
    read from generator logs that a fresh machine does not have)."""
    results, _ = run
    committed = sorted((results / "cells").glob("*/*.json"))
    assert committed and all("delta" not in r for f in committed for rs in _load_file(f)["tasks"].values() for r in rs)
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    fresh = Workspace(tmp_path / "fresh")
    shutil.copytree(ws.root, fresh.root, ignore=shutil.ignore_patterns("experiments"))

    def fail(*a, **k):
        raise AssertionError("a committed cell was computed again")

    monkeypatch.setattr(runner_mod.Runner, "_run_seed", fail)
    monkeypatch.setattr(runner_mod, "train_generator", fail)
    parts = [rq for rq in RQ_FILES if rq != "rq4"]
    run_experiment(tiny_preset, fresh, copy, only=parts, progress=False)

    def without_curves(rq, folder):
        out = _load(folder, rq)
        for c in out["cells"].values():
            c.pop("loss_curve", None)
        return out

    assert all(without_curves(rq, copy) == without_curves(rq, results) for rq in parts)


def _load_file(f):
    return json.loads(f.read_text())


def test_report_is_built_from_the_results(run, tmp_path):
    results, _ = run
    out = tmp_path / "report.md"
    r = CliRunner().invoke(app, ["report", str(results), "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    for heading in (
        "## Setup",
        "## RQ1",
        "## RQ2: zero-shot",
        "## RQ2: leave-one-domain-out",
        "## RQ3",
        "## RQ4",
        "## Ablations",
    ):
        assert heading in text
    dnd = _load(results, "rq1")["cells"]["dnd"]["overall"]["acc"]
    assert f"| dnd | {dnd['mean']:.3f} ± {dnd['std']:.3f} |" in text
    for png in ("report_accuracy.png", "report_losses.png", "report_delta_map.png", "report_composition.png"):
        assert (tmp_path / png).stat().st_size > 1000
    rq4 = _load(results, "rq4")["comparisons"]
    lead = text.split("## The questions, answered", 1)[1].split("## Setup", 1)[0].splitlines()
    line = next(x for x in lead if x.startswith("- **RQ4** — "))  # RQ4's answer leads the report too
    assert any(f"{k} (" in line for k in rq4) and "Not asked" not in line
    rq2 = next(x for x in lead if x.startswith("- **RQ2** — "))  # answered by the grid's sections, named
    assert rq2.endswith(
        "answered with seed intervals in 'RQ2: zero-shot generalisation to held-out tasks of seen "
        "domains', 'RQ2: leave-one-domain-out'."
    )
    assert all(f"| {k} |" in text.split("## RQ4")[1] for k in rq4)
    assert "| mean | δ cos to union | n |" in text.split("## RQ4")[1]


def test_shuffled_delta_control_really_permutes_targets(run, ws, tiny_preset):
    cells = grid.plan(
        tiny_preset, {t: "math" if t in ("syn.add", "syn.parity") else "strings" for t in tiny_preset.pool}
    )
    control = next(c for c in cells if "shuffled" in c.name)
    preset = grid.generator_preset(tiny_preset, control, 0)
    assert preset.generator.shuffle_delta
    enc = PromptEncoder()
    shuffled, _ = training_set(preset, ws, list(control.train), None, enc, save_cache=False)
    clean_preset = preset.replace(generator=dataclasses.replace(preset.generator, shuffle_delta=False))
    clean, _ = training_set(clean_preset, ws, list(control.train), None, enc, save_cache=False)
    for i in range(len(clean.paths)):
        src = [j for j in range(len(clean.paths)) if torch.equal(clean.deltas[j], shuffled.deltas[i])]
        assert src and all(clean.ckpt_task[j] != clean.ckpt_task[i] for j in src)


def test_rq3_data_fraction_noise_and_mislabels(ws, tiny_preset):
    enc = PromptEncoder()
    train = ["syn.add", "syn.copy", "syn.first"]
    clean, tok = training_set(tiny_preset, ws, train, None, enc, save_cache=False)
    k = tiny_preset.zoo.keep_last
    half, _ = training_set(
        apply_overrides(tiny_preset, ["generator.data_fraction=0.5"]), ws, train, None, enc, save_cache=False
    )
    assert len(half.paths) == len(train) * math.ceil(0.5 * k)
    assert all(len(h) == max(1, math.ceil(0.5 * len(c))) for h, c in zip(half.prompts, clean.prompts))
    noisy, _ = training_set(
        apply_overrides(tiny_preset, ["generator.weight_noise=1.0"]), ws, train, None, enc, save_cache=False
    )
    assert not torch.allclose(noisy.tokens, clean.tokens)
    assert not torch.allclose(noisy.deltas * noisy.delta_scale, clean.deltas * clean.delta_scale)  # δ re-measured
    mis, _ = training_set(
        apply_overrides(tiny_preset, ["generator.mislabel_fraction=0.5"]), ws, train, None, enc, save_cache=False
    )
    swapped = [i for i in range(len(clean.paths)) if not torch.equal(mis.tokens[i], clean.tokens[i])]
    assert len(swapped) == round(0.5 * len(clean.paths))
    for i in swapped:  # each carries the weights of a checkpoint of another task
        assert any(
            torch.equal(mis.tokens[i], clean.tokens[j]) and clean.ckpt_task[j] != clean.ckpt_task[i]
            for j in range(len(clean.paths))
        )
    assert not torch.equal(mis.deltas, clean.deltas)
    # the same corrupted weights with each checkpoint's true δ: what δ could restore
    for corrupted, change in ((noisy, "weight_noise=1.0"), (mis, "mislabel_fraction=0.5")):
        keep = apply_overrides(tiny_preset, [f"generator.{change}", "generator.corrupt_delta=false"])
        true_delta, _ = training_set(keep, ws, train, None, enc, save_cache=False)
        assert torch.equal(true_delta.tokens, corrupted.tokens)
        assert torch.equal(true_delta.deltas * true_delta.delta_scale, clean.deltas * clean.delta_scale)


def test_unknown_part_is_refused(ws, tmp_path):
    r = CliRunner().invoke(
        app, ["experiment", "--preset", "tiny", "-w", str(ws.root), "--only", "rq9", "--results-dir", str(tmp_path)]
    )
    assert r.exit_code != 0 and "rq9" in str(r.exception or r.output)


def test_report_without_results_names_the_folder(tmp_path):
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code != 0 and str(tmp_path) in str(r.exception or r.output)


def test_claimed_lock_is_exclusive_between_holders(tmp_path):
    """Two experiment processes never take the same cell: a held lock is reported as not ours."""
    with file_lock(tmp_path / "cell.lock") as first:
        with file_lock(tmp_path / "cell.lock") as second:
            assert first and not second
    with file_lock(tmp_path / "cell.lock") as again:
        assert again


def test_rq4_summary_waits_for_methods_another_process_holds(tmp_path):
    """rq4.json is summarised only once every method another process took has its result on disk."""
    pair = tmp_path / "composition" / "a+b"
    held = threading.Event()

    def other_process() -> None:
        with file_lock(pair / "m.lock") as mine:
            assert mine
            held.set()
            time.sleep(0.3)
            (pair / "m.json").write_text("{}")

    t = threading.Thread(target=other_process)
    t.start()
    held.wait()
    composition._settled(tmp_path / "composition")
    assert (pair / "m.json").exists()
    t.join()


def test_scorer_reuses_the_hits_it_measured_for_the_base_and_the_references(ws, tiny_preset, monkeypatch, tmp_path):
    """The base and oracle rows take the hits ``ref()`` measured; a copy of the oracle's tensors (another object)
    is scored afresh and agrees; another scorer (another process) reads the references from the workspace."""
    from deltalora.experiments.scoring import Scorer

    ws = Workspace(shutil.copytree(ws.root, tmp_path / "ws"))  # a cache of its own: nothing scored before
    scorer = Scorer(tiny_preset, ws, n_test=6)
    task = tiny_preset.pool[0]
    calls = []
    real = Scorer._hits
    monkeypatch.setattr(Scorer, "_hits", lambda self, items: calls.append(1) or real(self, items))
    ref = scorer.ref(task)
    n_ref = len(calls)  # one per reference adapter and one for the base model
    base, _ = scorer.score(task, None)
    oracle, _ = scorer.score(task, ref.ref_tensors[0])
    assert len(calls) == n_ref == len(ref.ref_tensors) + 1
    fresh, _ = scorer.score(task, {k: v.clone() for k, v in ref.ref_tensors[0].items()})
    assert len(calls) == n_ref + 1
    assert fresh["hits"] == oracle["hits"] == ref.ref_hits[0] and base["hits"] == ref.base_hits
    scorer.close()
    again = Scorer(tiny_preset, ws, n_test=6)
    cached = again.ref(task)
    assert len(calls) == n_ref + 1  # nothing rescored
    assert cached.ref_hits == ref.ref_hits and cached.base_hits == ref.base_hits
    assert torch.equal(cached.ref_logprobs, ref.ref_logprobs)
    assert again.ref(tiny_preset.pool[1]) and len(calls) > n_ref + 1  # another task is scored, then cached
    again.close()


def test_build_once_builds_for_one_process_and_defers_or_waits_for_the_others(tmp_path):
    """Of processes needing one artifact, one builds; another waits for it, or inside ``defer_when_busy`` is told
    Busy at once; a finished artifact is read without touching its lock."""
    out, lock = tmp_path / "artifact", tmp_path / "artifact.lock"
    building, builds = threading.Event(), []

    def build() -> None:
        builds.append(1)
        building.set()
        time.sleep(0.3)
        out.write_text("built")

    t = threading.Thread(target=build_once, args=(lock, out.exists, build))
    t.start()
    building.wait()
    with pytest.raises(Busy), defer_when_busy():
        build_once(lock, out.exists, build)
    build_once(lock, out.exists, build)  # waits for the other build, then finds it done
    t.join()
    assert out.read_text() == "built" and builds == [1]
    with file_lock(lock) as mine, defer_when_busy():
        assert mine
        build_once(lock, out.exists, build)  # done: no Busy although the lock is held


def test_a_cell_reads_only_its_own_seeds_when_another_run_wrote_more(tmp_path):
    """A run declaring 2 seeds of a cell that another run (sharing the workspace) scored with 3 summarises 2: a
    run's results never depend on what else ran."""
    store = CellStore(tmp_path / "work", tmp_path / "committed")
    two = grid.Cell("cv", "A2-lin [fold 0]", grid.GENERATOR, ("t",), n_seeds=2)
    for seed in (0, 1, 2):
        store.write(two, seed, {"cell": two.name, "seed": seed, "tasks": {"t": [{"acc": seed / 10}]}})
    assert [r["seed"] for r in store.records(two, (0, 1, 2))] == [0, 1]
    every = dataclasses.replace(two, n_seeds=0)
    assert [r["seed"] for r in store.records(every, (0, 1, 2))] == [0, 1, 2]
    shutil.rmtree(tmp_path / "work")  # a fresh machine: the committed copies alone
    assert [r["seed"] for r in store.records(two, (0, 1, 2))] == [0, 1]
