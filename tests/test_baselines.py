"""Issue 13's baselines: the top-k retrieval mixture (exact ΔW, loads in PEFT) and the multi-task LoRA
(trained on the union, cached), both scored in a tiny RQ2 run."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import deltalora.experiments.multitask as multitask
from deltalora.delta.compute import delta_stage
from deltalora.errors import ConfigError
from deltalora.experiments.config import ExperimentConfig
from deltalora.experiments.grid import METHODS, MULTITASK, Cell, plan
from deltalora.experiments.report import write_report
from deltalora.experiments.run import run_experiment
from deltalora.experiments.runner import Runner
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.mixture import MIXTURE, concat_loras, mixture_weights, write_mixture
from deltalora.generator.retrieval import build_retrieval, retrieve
from deltalora.io import Busy, defer_when_busy, file_lock
from deltalora.workspace import Workspace


@pytest.fixture(scope="module")
def ws(tiny_zoo, tmp_path_factory):
    """A private copy of the tiny zoo with δ of the preset's probe set."""
    dst = Workspace(tmp_path_factory.mktemp("baselines") / "ws")
    shutil.copytree(tiny_zoo.workspace, dst.root)
    delta_stage(tiny_zoo.preset, dst, (tiny_zoo.preset.delta.n_probes,))
    return dst


@pytest.fixture(scope="module")
def preset(tiny_preset):
    """The tiny preset cut to one generator variant, seed and draw: the baselines are what is under test."""
    ex = dataclasses.replace(tiny_preset.experiment, variants=("dnd",), seeds=(0,), draws=1, long_steps=0)
    return tiny_preset.replace(experiment=ex)


def test_concat_is_the_weighted_sum_of_products():
    g = torch.Generator().manual_seed(0)
    sds = [
        {"m.lora_A.weight": torch.randn(r, 5, generator=g), "m.lora_B.weight": torch.randn(7, r, generator=g)}
        for r in (2, 2, 3)
    ]
    w = mixture_weights([0.9, 0.7, 0.2], 0.5)
    assert sum(w) == pytest.approx(1.0) and w[0] > w[1] > w[2] > 0
    mix = concat_loras(sds, w)
    assert mix["m.lora_A.weight"].shape == (7, 5) and mix["m.lora_B.weight"].shape == (7, 7)
    want = sum(wi * sd["m.lora_B.weight"] @ sd["m.lora_A.weight"] for wi, sd in zip(w, sds))
    torch.testing.assert_close(mix["m.lora_B.weight"] @ mix["m.lora_A.weight"], want, atol=1e-6, rtol=0)


def test_mixture_folder_has_the_exact_delta_w_in_peft(tiny_zoo, tiny_base, tmp_path):
    pre, enc = tiny_zoo.preset, PromptEncoder()
    train = ["syn.add", "syn.copy", "syn.first"]
    index = build_retrieval(pre, tiny_zoo.ws, tmp_path / "index", train, encoder=enc)
    prompts = ["12+30=", "copy: abc ->", "first: xyz ->", "7+1="]
    prov = write_mixture(index, prompts, enc, 2, 0.05, tmp_path / "mix")
    assert prov["tasks"][0] == retrieve(index, prompts, enc)[0] and len(prov["tasks"]) == 2
    model = PeftModel.from_pretrained(tiny_base[0], str(tmp_path / "mix"))
    sds = [load_file(index / "adapters" / t / "adapter_model.safetensors") for t in prov["tasks"]]
    scaling = pre.zoo.alpha / pre.zoo.rank
    checked = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        key = name.removeprefix("base_model.model.")
        want = sum(
            w * scaling * sd[f"base_model.model.{key}.lora_B.weight"] @ sd[f"base_model.model.{key}.lora_A.weight"]
            for w, sd in zip(prov["weights"], sds)
        )
        torch.testing.assert_close(module.get_delta_weight("default"), want, atol=1e-6, rtol=0)
        checked += 1
    assert checked == len(sds[0]) // 2


def test_config_validates_the_new_fields():
    for bad in ({"mixture_k": 0}, {"mixture_temperature": 0.0}, {"multitask_step_factor": 0.5}):
        with pytest.raises(ConfigError):
            ExperimentConfig(**bad)


def test_both_baselines_are_planned_for_rq1_rq2_and_lodo(preset):
    domains = {t: "strings" if t in ("syn.copy", "syn.first") else "arith" for t in preset.pool}
    cells = plan(preset, domains)
    for method in (MIXTURE, MULTITASK):
        assert {c.rq for c in cells if c.method == method} == {"rq1", "rq2", "rq2_lodo"}
    assert {c.method for c in cells} <= set(METHODS)


@pytest.fixture(scope="module")
def rq2(ws, preset, tmp_path_factory):
    results = tmp_path_factory.mktemp("baseline_results")
    run_experiment(preset, ws, results, only=["rq2"], progress=False)
    return results


def test_rq2_scores_both_baselines_and_the_report_shows_them(rq2, preset, tmp_path):
    cells = json.loads((rq2 / "rq2.json").read_text())["cells"]
    mix, multi = cells[METHODS[MIXTURE].label], cells[METHODS[MULTITASK].label]
    for c in (mix, multi):
        assert 0.0 <= c["overall"]["acc"]["mean"] <= 1.0
    assert mix["overall"]["param_mse"] is None  # undefined at rank k·r
    assert mix["overall"]["acc"]["n"] == preset.experiment.draws
    (held,) = preset.experiment.held_out
    assert len(mix["retrieved"][held][0].split(" + ")) == preset.experiment.mixture_k  # 3 training tasks, k = 3
    train = [t for t in preset.pool if t not in preset.experiment.held_out]
    assert set(multi["n_train"]) == set(train) and all(n > 0 for n in multi["n_train"].values())
    assert multi["train_seconds"]["mean"] > 0
    out = tmp_path / "report.md"
    write_report(rq2, out)
    text = out.read_text()
    assert f"| {METHODS[MIXTURE].label} |" in text and f"| {METHODS[MULTITASK].label} |" in text


def test_multitask_lora_trains_on_the_union_once(rq2, ws, preset, monkeypatch):
    runner = Runner(preset, ws, rq2)
    try:
        train = tuple(t for t in preset.pool if t not in preset.experiment.held_out)
        folder = runner.root / "multitask" / multitask.multitask_key(preset, train)
        record = json.loads((folder / "record.json").read_text())
        assert record["n_items"] == sum(record["n_train"].values()) and len(record["n_train"]) == len(train)
        assert record["steps"] == multitask.multitask_steps(preset) == 3 * preset.zoo.steps

        def no_training(*a, **k):
            raise AssertionError("the cached multi-task LoRA was trained again")

        monkeypatch.setattr(multitask, "train_lora", no_training)
        assert runner.multitask_adapter(train) == folder
        assert set(load_file(folder / "adapter_model.safetensors")) == set(runner.scorer.swapper.lora_keys())
    finally:
        runner.scorer.close()


def test_a_cell_whose_multitask_lora_another_process_builds_is_deferred_then_taken(rq2, ws, preset):
    """A worker does not idle behind another process's build: the cell is passed over with nothing written, and
    taken once the build's lock is free (the experiment's final pass waits for it instead)."""
    runner = Runner(preset, ws, rq2)
    try:
        train = tuple(t for t in preset.pool if t not in preset.experiment.held_out)[1:]  # a union not built yet
        cell = Cell("rq2", "multi-task LoRA, fewer tasks", MULTITASK, preset.experiment.held_out, train)
        folder = runner.multitask_folder(train)
        building, release = threading.Event(), threading.Event()

        def other_process() -> None:
            with file_lock(folder.parent / f"{folder.name}.lock") as mine:
                assert mine
                building.set()
                release.wait()

        t = threading.Thread(target=other_process)
        t.start()
        building.wait()
        assert not runner.run_cell(cell) and not runner.store.done(cell, None)
        with pytest.raises(Busy), defer_when_busy():
            runner.multitask_adapter(train)
        release.set()
        t.join()
        assert runner.run_cell(cell) and runner.store.done(cell, None)
        assert (folder / "record.json").exists()
    finally:
        runner.scorer.close()
