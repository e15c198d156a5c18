"""The ``deltalora`` command line: the main job on the tiny preset, task and evaluate verbs, bad input."""

from __future__ import annotations

import json
import re
import sys

import pytest
from typer.testing import CliRunner

from conftest import mc_rows, write_jsonl
from deltalora.cli import app, main
from deltalora.errors import AdapterError, ConfigError, TaskError, UsageError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result.stdout  # progress bars go to stderr


@pytest.fixture(scope="module")
def run_outputs(tmp_path_factory):
    """`deltalora run --preset tiny` into fresh folders (the full tiny pipeline, a few seconds)."""
    tmp = tmp_path_factory.mktemp("cli_run")
    ws, res, docs = tmp / "ws", tmp / "results", tmp / "docs"
    result = invoke("run", "--preset", "tiny", "--workspace", ws, "--results-dir", res, "--docs-dir", docs)
    return result, ws, res, docs


def test_run_writes_results(run_outputs, tiny_preset):
    result, ws, res, docs = run_outputs
    out = ok(result)
    assert '"silhouette_delta"' in out

    zoo = json.loads((res / "zoo_tiny.json").read_text())
    assert zoo["preset"] == "tiny" and zoo["base"] == "tiny"
    assert [r["task"] for r in zoo["tasks"]] == list(tiny_preset.pool)
    for r in zoo["tasks"]:
        for key in ("task", "domain", "n_train", "n_test", "base_acc", "lora_acc", "train_seconds"):
            assert key in r, f"zoo record lacks {key!r}"
        assert 0 <= r["base_acc"] <= 1 and 0 <= r["lora_acc"] <= 1
        assert 0 < r["n_test"] <= tiny_preset.tasks.max_test and 0 < r["n_train"] <= tiny_preset.tasks.max_train
    assert zoo["n_adapter_runs"] == 5 and zoo["n_checkpoints"] == 10  # 4 tasks + 1 pair, 2 checkpoints each
    assert [p["pair"] for p in zoo["pairs"]] == ["syn.add+syn.copy"]
    assert (docs / "zoo_tiny.md").read_text().startswith("| task |")
    assert (docs / "results_tiny.md").read_text().startswith("# Results: `tiny` preset")  # one per preset

    delta = json.loads((res / "delta_tiny.json").read_text())
    for key in ("silhouette_delta", "silhouette_flat_weights", "n_adapters", "n_domains", "additivity"):
        assert key in delta, f"delta report lacks {key!r}"
    assert delta["n_adapters"] == 4 and delta["n_domains"] == 2
    assert -1 <= delta["silhouette_delta"] <= 1 and -1 <= delta["silhouette_flat_weights"] <= 1
    assert set(delta["silhouette_delta_by_probes"]) == {"1", "5", "20"}
    assert delta["silhouette_delta_by_probes"]["5"] == delta["silhouette_delta"]
    assert [r["pair"] for r in delta["additivity"]] == ["syn.add+syn.copy"]
    assert set(delta["additivity_mean"]) == {"cos_sum", "cos_a", "cos_b"}

    png = docs / "delta_map_tiny.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for n in (1, 5, 20):
        assert (ws / "delta" / f"deltas_p{n}.safetensors").exists()


def test_run_again_reuses_the_zoo(run_outputs, monkeypatch):
    _, ws, res, docs = run_outputs
    import deltalora.zoo.build as zoo_mod

    monkeypatch.setattr(zoo_mod, "_run_job", lambda *a, **k: pytest.fail("retrained a finished adapter"))
    before = json.loads((res / "delta_tiny.json").read_text())
    ok(invoke("run", "--preset", "tiny", "--workspace", ws, "--results-dir", res, "--docs-dir", docs))
    after = json.loads((res / "delta_tiny.json").read_text())
    after.pop("delta_seconds_per_adapter", None), before.pop("delta_seconds_per_adapter", None)
    assert after == before


def test_tasks_list():
    out = ok(invoke("tasks", "list", "--preset", "tiny"))
    lines = out.strip().splitlines()
    assert [ln.split()[:3] for ln in lines] == [
        ["syn.add", "math", "synthetic:add"],
        ["syn.parity", "math", "synthetic:parity"],
        ["syn.copy", "strings", "synthetic:copy"],
        ["syn.first", "strings", "synthetic:first"],
    ]


def test_tasks_list_with_user_tasks(tmp_path):
    write_jsonl(tmp_path / "items.jsonl", mc_rows(20))
    spec = tmp_path / "tasks.json"
    spec.write_text(json.dumps([{"name": "my.task", "domain": "mine", "path": "items.jsonl"}]))
    out = ok(invoke("tasks", "list", "--preset", "tiny", "--tasks-file", spec))
    assert out.strip().splitlines()[-1].split()[:2] == ["my.task", "mine"]
    out = ok(invoke("tasks", "show", "my.task", "--preset", "tiny", "--tasks-file", spec))
    assert out.startswith("my.task: domain=mine kind=mc")


def test_tasks_show():
    out = ok(invoke("tasks", "show", "syn.add", "--preset", "tiny", "--n", "3"))
    first = out.splitlines()[0]
    assert (
        first.startswith("syn.add: domain=math kind=mc train=")
        and "test=16" in first
        and "source=synthetic:add" in first
    )
    assert "note: a+b" in out
    assert out.count("[choices: ") == 3
    assert " plus " in out and " equals " in out


def test_evaluate_adapter_matches_the_zoo_record(tiny_zoo):
    ckpt = tiny_zoo.checkpoint("syn.add")
    folder = tiny_zoo.root / ckpt.path
    out = ok(invoke("evaluate", "--task", "syn.add", "--preset", "tiny", "--adapter", folder))
    res = json.loads(out.strip().splitlines()[-1])
    assert res["task"] == "syn.add" and res["split"] == "test" and res["n"] == 16 and res["base"] == "tiny"
    assert res["adapter"] == str(folder)
    assert 0 <= res["accuracy"] <= 1
    assert res["accuracy"] == round(ckpt.test_acc, 4)  # same as measured at the end of training


def test_evaluate_base_matches_the_zoo_record(tiny_zoo):
    out = ok(invoke("evaluate", "--task", "syn.copy", "--preset", "tiny"))
    res = json.loads(out.strip().splitlines()[-1])
    base = json.loads((tiny_zoo.root / "base" / "syn.copy.json").read_text())
    assert res["adapter"] is None and res["accuracy"] == round(base["base_acc"], 4)
    out = ok(invoke("evaluate", "--task", "syn.copy", "--preset", "tiny", "--split", "train"))
    assert json.loads(out.strip().splitlines()[-1])["split"] == "train"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (["run", "--preset", "tiny", "--set", "zoo.nope=1"], ConfigError, "zoo has no field 'nope'"),
        (["zoo", "build", "--preset", "tiny", "--set", "zoo.steps=zero"], ConfigError, "'zero' is not a valid"),
        (["tasks", "list", "--preset", "huge"], ConfigError, "known presets: families, families-gpu, gpu, small, tiny"),
        (["tasks", "show", "no.such", "--preset", "tiny"], TaskError, "known tasks: .*syn.add"),
        (["run", "--preset", "tiny", "--tasks", "syn.add,no.such"], TaskError, "unknown task 'no.such'"),
        (
            ["evaluate", "--task", "syn.add", "--preset", "tiny", "--split", "dev"],
            UsageError,
            "--split must be test, val or train",
        ),
        (["evaluate", "--task", "syn.add", "--preset", "tiny", "--base", "nope"], ConfigError, "unknown model 'nope'"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, args, exc, match):
    result = invoke(*args, *(["--workspace", tmp_path / "ws"] if args[0] in ("run", "zoo") else []))
    assert result.exit_code != 0
    assert isinstance(result.exception, exc), repr(result.exception)
    assert re.search(match, str(result.exception)), str(result.exception)
    assert not (tmp_path / "ws" / "zoo" / "runs").exists()


def test_evaluate_rejects_a_broken_adapter(tmp_path):
    (tmp_path / "adapter").mkdir()
    result = invoke("evaluate", "--task", "syn.add", "--preset", "tiny", "--adapter", tmp_path / "adapter")
    assert result.exit_code != 0 and isinstance(result.exception, AdapterError)
    assert "adapter_config.json" in str(result.exception)


def test_evaluate_rejects_an_adapter_for_another_base(tiny_zoo, tmp_path):
    from deltalora.lm.models import tiny_llama

    model, tok = tiny_llama(seed=1)
    model.save_pretrained(tmp_path / "other_base")
    tok.save_pretrained(tmp_path / "other_base")
    result = invoke(
        "evaluate",
        "--task",
        "syn.add",
        "--preset",
        "tiny",
        "--base",
        tmp_path / "other_base",
        "--adapter",
        tiny_zoo.folder("syn.add"),
    )
    assert result.exit_code != 0 and isinstance(result.exception, AdapterError), repr(result.exception)
    assert "trained on base 'tiny'" in str(result.exception)
    # the same folder as base model works without an adapter
    out = ok(invoke("evaluate", "--task", "syn.add", "--preset", "tiny", "--base", tmp_path / "other_base"))
    assert json.loads(out.strip().splitlines()[-1])["base"] == str(tmp_path / "other_base")


def test_usage_errors_exit_2():
    result = invoke("tasks", "show")  # missing argument
    assert result.exit_code == 2
    assert invoke("nonsense").exit_code == 2


def test_main_reports_user_errors_as_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["deltalora", "run", "--preset", "tiny", "--set", "zoo.nope=1"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override 'zoo.nope=1': zoo has no field 'nope'")
    assert "Traceback" not in err
