"""The variant table: every caller reads it, so a new variant is one spec in one place."""

from __future__ import annotations

import dataclasses
import json

import pytest
from peft import PeftModel
from typer.testing import CliRunner

from deltalora.cli import app
from deltalora.config import ExperimentConfig, GeneratorConfig
from deltalora.delta.compute import delta_stage
from deltalora.errors import ConfigError
from deltalora.experiments.grid import plan
from deltalora.generator.artifact import load_generator
from deltalora.generator.generate import generate
from deltalora.generator.train import train_generator
from deltalora.generator.variants import VARIANTS, LossTerm, Variant, baseline, weighted_by
from deltalora.lm.models import load_base
from deltalora.presets import apply_overrides


def _l1(s):
    return ((s.pred - s.target) * s.mask).abs().sum((1, 2)) / s.mask.sum()


TOY = Variant("toy", "weight L1 only (a test variant)", (LossTerm("l1", _l1, "lambda_w", uses_delta=False),))


@pytest.fixture
def toy(monkeypatch):
    """The toy variant registered for one test; the table is restored afterwards."""
    monkeypatch.setitem(VARIANTS, TOY.name, TOY)
    return TOY


def test_builtin_table():
    assert list(VARIANTS) == ["dnd", "A1", "A2", "A2-lin", "B", "C", "E2E", "E2E+delta"]
    assert baseline().name == "dnd" and not baseline().uses_delta
    assert [v.name for v in VARIANTS.values() if v.needs_base] == ["A2", "A2-lin", "B", "C", "E2E", "E2E+delta"]
    assert [v.name for v in VARIANTS.values() if not v.in_grid] == ["A2-lin", "E2E", "E2E+delta"]
    assert [v.name for v in VARIANTS.values() if v.linear] == ["A2-lin"]
    assert not VARIANTS["E2E"].uses_delta and VARIANTS["E2E+delta"].uses_delta
    assert ExperimentConfig().variants == ("dnd", "A1", "A2", "B", "C")
    assert [v.name for v in VARIANTS.values() if v.decodes_delta] == ["B"]
    assert [t.name for t in VARIANTS["C"].terms] == ["mse", "delta_exact", "kl"]
    assert VARIANTS["B"].terms[1].weight == "lambda_cons" and VARIANTS["A2"].terms[1].weight == "lambda_delta"
    assert VARIANTS["C"].terms[0].weight == "lambda_reg" and GeneratorConfig().lambda_reg < GeneratorConfig().lambda_kl
    assert weighted_by("lambda_kl").name == "C" and weighted_by("lambda_cons").name == "B"


def test_unknown_variant_is_a_config_error():
    with pytest.raises(ConfigError, match="toy"):
        GeneratorConfig(variant="toy")


def test_a_new_variant_is_one_spec(toy, tiny_zoo, tmp_path):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    preset = apply_overrides(
        tiny_zoo.preset, ["generator.variant=toy", "generator.steps=60", "generator.save_every=30"]
    )
    out = tmp_path / "toy"
    card = train_generator(preset, tiny_zoo.ws, out, list(preset.pool), progress=False)
    assert card.variant == "toy" and card.steps_done == 60
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert set(log[0]) == {"step", "loss", "l1"}
    first, last = (sum(r["l1"] for r in part) / len(part) for part in (log[:10], log[-10:]))
    assert last < first, f"the toy loss did not go down: {first:.4f} -> {last:.4f}"

    # it loads and generates an adapter that PEFT loads, like any variant
    gen = load_generator(out)
    assert gen.card.variant == "toy"
    generate(out, ["7 plus 8 equals", "Is 4 even or odd?"], tmp_path / "adapter")
    base, _ = load_base("tiny")
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))

    # the planner schedules it and the CLI accepts it, with no change anywhere else
    exp = dataclasses.replace(preset.experiment, variants=("dnd", "toy"))
    names = [c.name for c in plan(preset.replace(experiment=exp), {t: "d" for t in preset.pool})]
    assert "toy" in names
    res = CliRunner().invoke(
        app,
        [
            "train-generator",
            "--variant",
            "toy",
            "--preset",
            "tiny",
            "--workspace",
            str(tiny_zoo.ws.root),
            "--set",
            "generator.steps=2",
            "--out",
            str(tmp_path / "cli"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert load_generator(tmp_path / "cli").card.variant == "toy"
