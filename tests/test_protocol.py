"""Validation split, zoos of disjoint parts, selection with intervals, and the Delta Activations protocol stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deltalora.cli import app
from deltalora.config import TaskConfig
from deltalora.data.registry import FAMILY_CANDIDATES, FAMILY_PAIRS
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.delta.analysis import cosine_distance, cosine_distance_from_gram, gram
from deltalora.delta.protocol import _additivity
from deltalora.delta.separation import centred, delta_w_gram, nn_accuracy, separation
from deltalora.presets import get_preset
from deltalora.workspace import Workspace
from deltalora.zoo.build import build_zoo
from deltalora.zoo.manifest import Checkpoint
from deltalora.zoo.summary import zoo_results

# ---------------------------------------------------------------- splits and parts


def test_validation_split_is_carved_from_train_and_leaves_test_alone():
    spec = resolve_spec("syn.add")
    plain = load_task(spec, TaskConfig(max_test=16, max_train=64))
    with_val = load_task(spec, TaskConfig(max_test=16, max_train=64, n_val=8))
    assert with_val.test == plain.test and len(with_val.val) == 8 and plain.val == ()
    prompts = [{it.prompt for it in s} for s in (with_val.train, with_val.val, with_val.test)]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert with_val.val == plain.train[:8] and with_val.train[:56] == plain.train[8:]


def test_validation_split_too_large_is_an_error():
    from deltalora.errors import TaskError

    with pytest.raises(TaskError, match="n_val"):
        load_task(resolve_spec("syn.first"), TaskConfig(max_test=16, max_train=64, n_val=500))


def test_family_labels():
    cfg = TaskConfig(family_domains=True)
    assert load_task(resolve_spec("syn.add"), cfg).domain == "math"  # not BIG-bench: its registry domain
    fam = {s.name: s.domain for s in FAMILY_CANDIDATES}
    assert all(name.split(".", 1)[0] == d for name, d in fam.items())
    assert all(fam[a] != fam[b] for a, b in FAMILY_PAIRS)


@pytest.fixture(scope="module")
def parts_zoo(tmp_path_factory):
    p = get_preset("tiny")
    p = p.replace(
        pool=("syn.add", "syn.copy"),
        pairs=(("syn.add", "syn.copy"),),
        tasks=TaskConfig(max_test=16, max_train=64, n_val=8),
        zoo=p.zoo.__class__(**{**p.zoo.__dict__, "parts": 2}),
    )
    ws = Workspace(tmp_path_factory.mktemp("parts"))
    return p, ws, build_zoo(p, ws)


def test_parts_learn_from_disjoint_slices(parts_zoo):
    p, ws, manifest = parts_zoo
    runs = sorted(f.name for f in ws.runs.glob("*.json"))
    assert runs == [
        "syn.add+syn.copy__seed0__part0.json",
        "syn.add__seed0__part0.json",
        "syn.add__seed0__part1.json",
        "syn.copy__seed0__part0.json",
        "syn.copy__seed0__part1.json",
    ]
    task = load_task(resolve_spec("syn.add"), p.tasks)
    n = [json.loads(ws.run_record(f"syn.add__seed0__part{k}").read_text())["n_train"] for k in (0, 1)]
    assert sum(n) == len(task.train) and abs(n[0] - n[1]) <= 1
    finals = manifest.finals("syn.add")
    assert [c.part for c in finals] == [0, 1] and finals[0].path != finals[1].path
    assert "part1" in finals[1].path
    pair = json.loads(ws.run_record("syn.add+syn.copy__seed0__part0").read_text())
    assert pair["n_train"] == n[0] + json.loads(ws.run_record("syn.copy__seed0__part0").read_text())["n_train"]


def test_zoo_results_select_on_validation_with_paired_intervals(parts_zoo, tmp_path):
    p, ws, _ = parts_zoo
    rows = zoo_results(p, ws, tmp_path / "z.json", tmp_path / "z.md")
    z = json.loads((tmp_path / "z.json").read_text())
    assert z["selection"].endswith("validation split (carved from train)")
    base = json.loads(ws.base_record("syn.add").read_text())
    assert len(base["val_hits"]) == 8 and len(base["test_hits"]) == 16
    for r in rows:
        assert r["selected_on"] == "validation" and r["n_val"] == 8
        assert r["passes_min_gain"] == (r["val_gain"] >= p.zoo.min_gain)
        lo, hi = r["gain_ci95"]
        assert lo <= r["gain"] + 1e-9 and r["gain"] - 1e-9 <= hi
    assert z["n_selected"] == sum(r["passes_min_gain"] for r in rows) and z["n_counted"] == 0  # < 100 items
    assert z["n_candidates"] == len(p.pool) == z["n_measured"] == 2
    assert set(z["stage_seconds"]) == {"base_eval", "train", "lora_eval"}
    assert "| syn.add |" in (tmp_path / "z.md").read_text()


# ---------------------------------------------------------------- separation


def test_delta_w_gram_equals_the_materialised_products():
    g = torch.Generator().manual_seed(0)
    adapters = [
        {
            "m.lora_A.weight": torch.randn(3, 7, generator=g),
            "m.lora_B.weight": torch.randn(5, 3, generator=g),
            "n.lora_A.weight": torch.randn(3, 4, generator=g),
            "n.lora_B.weight": torch.randn(2, 3, generator=g),
        }
        for _ in range(4)
    ]
    x = np.stack(
        [
            torch.cat(
                [(a[f"{m}.lora_B.weight"].double() @ a[f"{m}.lora_A.weight"].double()).flatten() for m in "mn"]
            ).numpy()
            for a in adapters
        ]
    )
    np.testing.assert_allclose(delta_w_gram(adapters), gram(x), rtol=1e-10)
    np.testing.assert_allclose(cosine_distance_from_gram(gram(x)), cosine_distance(x), atol=1e-10)
    np.testing.assert_allclose(centred(gram(x)), gram(x - x.mean(0)), atol=1e-9)


def test_separation_beats_its_null_only_when_labels_mean_something():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6))
    x[:6, 0] += 4
    labels = ["a"] * 6 + ["b"] * 6
    d = cosine_distance(x)
    real = separation(d, labels, 200)
    assert real["silhouette"]["value"] > real["silhouette"]["null_p95"] and real["silhouette"]["p"] < 0.05
    assert real["nn_accuracy"]["value"] == nn_accuracy(d, np.array(labels)) > real["nn_accuracy"]["null_p95"]
    noise = separation(cosine_distance(rng.normal(size=(12, 6))), labels, 200)
    assert noise["silhouette"]["p"] > 0.05


def test_additivity_control_uses_a_third_family():
    e = torch.eye(4, dtype=torch.float64)

    def ck(task, part=0, pair=None):
        return Checkpoint(task, "f", 0, 1, 0.0, f"{task}/{part}", "", True, pair, part=part)

    deltas = {"a/0": e[0], "b/0": e[1], "c/0": e[2], "a+b/0": e[0] + e[1]}
    finals = [ck("a"), ck("b"), ck("c"), ck("a+b", pair=("a", "b"))]
    res = _additivity(deltas, finals, {"a": "F", "b": "G", "c": "H"}, seed=0)
    row = res["raw"]["pairs"][0]
    assert row["cos_sum"] == pytest.approx(1.0) and row["cos_control"] == pytest.approx(0.5)


# ---------------------------------------------------------------- the stage, through the CLI


def test_protocol_stage_on_the_tiny_preset(tmp_path):
    ws = tmp_path / "ws"
    common = ["--preset", "tiny", "--workspace", str(ws)]
    runner = CliRunner()
    assert runner.invoke(app, ["zoo", "build", *common]).exit_code == 0
    out, md, png = tmp_path / "p.json", tmp_path / "p.md", tmp_path / "p.png"
    args = ["delta", "protocol", *common, "--set", "protocol.permutations=20", "--set", "protocol.steps=2"]
    res = runner.invoke(app, [*args, "--out", str(out), "--md", str(md), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["families"] == {"math": ["syn.add", "syn.parity"], "strings": ["syn.copy", "syn.first"]}
    for init in ("shared", "independent"):
        assert (ws / "protocol" / init / "zoo" / "manifest.json").exists()
        assert set(r["separation"][init]) == {"delta_p1", "delta_p5", "delta_p20", "flat_weights", "delta_w"}
        s = r["separation"][init]["delta_p5"]["raw"]["task"]
        assert s["n"] == 12 and s["n_labels"] == 4 and -1 <= s["silhouette"]["value"] <= 1
        assert r["additivity"][init]["p5"]["raw"]["pairs"][0]["pair"] == "syn.add+syn.copy"
    # no accuracy was measured for the protocol's LoRAs
    assert not (ws / "protocol" / "shared" / "zoo" / "base").exists() or not any(
        (ws / "protocol" / "shared" / "zoo" / "base").iterdir()
    )
    assert "shared LoRA init, mean removed" in md.read_text() and png.stat().st_size > 0
