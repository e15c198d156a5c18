"""Training curves for TensorBoard: off by default; with --tensorboard every zoo run and generator logs its losses."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from deltalora.cli import app
from deltalora.tracking import Curves


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_curves_are_off_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    curves = Curves(None, "x")
    curves.log(1, loss=1.0)
    curves.close()
    assert list(tmp_path.iterdir()) == []


def test_zoo_build_and_generator_write_their_curves(tiny_zoo, tmp_path):
    from deltalora.delta.compute import delta_stage

    runner = CliRunner()
    tb, ws = tmp_path / "tb", tmp_path / "ws"
    res = runner.invoke(
        app,
        ["zoo", "build", "--preset", "tiny", "--workspace", str(ws), "--tasks", "syn.add", "--tensorboard", str(tb)],
    )
    assert res.exit_code == 0, res.output
    zoo = scalars(tb / "zoo" / "syn.add__seed0")
    steps = tiny_zoo.preset.zoo.steps
    assert [s for s, _ in zoo["loss"]] == list(range(1, steps + 1))
    assert [s for s, _ in zoo["lr"]] == list(range(1, steps + 1)) and all(v > 0 for _, v in zoo["lr"])
    assert [s for s, _ in zoo["test_acc/syn.add"]] == [steps]

    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    res = runner.invoke(
        app,
        [
            "train-generator",
            "--preset",
            "tiny",
            "--workspace",
            str(tiny_zoo.ws.root),
            "--variant",
            "A1",
            "--set",
            "generator.steps=5",
            "--set",
            "generator.stage1_steps=2",
            "--out",
            str(tmp_path / "g"),
            "--tensorboard",
            str(tb),
        ],
    )
    assert res.exit_code == 0, res.output
    gen = scalars(tb / "generator" / "g")
    assert {"loss", "lr", "loss/mse", "loss/delta_head", "loss/head_fit"} <= set(gen)
    assert [s for s, _ in gen["loss"]] == [1, 2, 3, 4, 5, 6, 7]  # A1's 2 head-only steps, then 5
    assert [s for s, _ in gen["loss/mse"]] == [3, 4, 5, 6, 7]
