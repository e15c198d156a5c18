"""The reference LoRA zoo: PEFT folders, manifest, determinism, resume after interruption, config guard."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import deltalora.zoo.build as zoo_mod
from conftest import leftover_tmp, tree_files
from deltalora.errors import ArtifactError, ConfigError
from deltalora.lm.models import tiny_llama
from deltalora.presets import get_preset
from deltalora.workspace import Workspace
from deltalora.zoo.build import build_zoo
from deltalora.zoo.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, Manifest
from deltalora.zoo.summary import zoo_summary

TASKS = ("syn.add", "syn.copy")


@pytest.fixture(scope="module")
def two_task_preset():
    p = get_preset("tiny").replace(pool=TASKS, pairs=())
    assert p.zoo.keep_last == 2
    return p


@pytest.fixture(scope="module")
def reference_zoo(tmp_path_factory, two_task_preset):
    """An uninterrupted build of 2 tasks x 1 seed x 2 checkpoints."""
    ws = Workspace(tmp_path_factory.mktemp("ref_ws"))
    manifest = build_zoo(two_task_preset, ws)
    return ws, manifest


def adapter_tensors(root, manifest):
    return {c.path: load_file(root / c.path / "adapter_model.safetensors") for c in manifest}


def assert_same_adapters(root_a, root_b, manifest):
    for c in manifest:
        a = root_a / c.path / "adapter_model.safetensors"
        b = root_b / c.path / "adapter_model.safetensors"
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{c.path}: {k} differs"
        assert a.read_bytes() == b.read_bytes(), f"{c.path}: safetensors bytes differ"


def _logits(model, tok, text="7 plus 5 equals"):
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- layout and PEFT folders


def test_zoo_layout_and_manifest(reference_zoo, two_task_preset):
    ws, manifest = reference_zoo
    root = ws.zoo
    assert len(manifest) == 2 * 2  # 2 tasks x 1 seed x keep_last=2
    assert ws.manifest == root / "manifest.json"
    assert json.loads((root / "manifest.json").read_text()) == {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "checkpoints": [c.to_dict() for c in manifest],
    }
    assert Manifest.from_file(root / "manifest.json") == manifest
    assert json.loads((root / "config.json").read_text())["pool"] == list(TASKS)
    steps = two_task_preset.zoo.steps
    domains = {"syn.add": "math", "syn.copy": "strings"}
    for task in TASKS:
        ckpts = sorted((c for c in manifest if c.task == task), key=lambda c: c.step)
        assert [c.step for c in ckpts] == [steps - 1, steps]
        for c in ckpts:
            assert c.domain == domains[task] and c.seed == 0 and c.pair_of is None
            assert isinstance(c.loss, float) and math.isfinite(c.loss)
            assert c.path == f"adapters/{task}/seed0/step{c.step:05d}"
            assert (root / c.path / "adapter_config.json").is_file()
            assert (root / c.path / "adapter_model.safetensors").is_file()
        first, final = ckpts
        assert not first.final and first.test_acc is None and "test_acc" not in first.to_dict()
        assert final.final and 0.0 <= final.test_acc <= 1.0
        run = json.loads((root / "runs" / f"{task}__seed0.json").read_text())
        assert run["checkpoints"] == [c.to_dict() for c in ckpts]
        assert run["test_acc"] == {task: final.test_acc}
        assert len(run["losses"]) == steps and run["losses"][-1] == final.loss and run["losses"][-2] == first.loss
        base = json.loads((root / "base" / f"{task}.json").read_text())
        assert 0.0 <= base["base_acc"] <= 1.0 and base["n_test"] == 16
    assert not leftover_tmp(ws.root)


def test_adapters_load_in_peft_and_change_the_logits(reference_zoo):
    ws, manifest = reference_zoo
    base, tok = tiny_llama()
    ref = _logits(base, tok)
    for c in manifest:
        folder = ws.zoo / c.path
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["base_model_name_or_path"] == "tiny"
        saved = load_file(folder / "adapter_model.safetensors")
        assert all(k.startswith("base_model.model.") for k in saved)
        assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in saved.items())  # B is zero at init
        model = PeftModel.from_pretrained(tiny_llama()[0], str(folder))
        model.eval()
        out = _logits(model, tok)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, ref), f"{c.path} does not change the logits"
    assert torch.equal(_logits(base, tok), ref)


def test_zoo_summary(reference_zoo, two_task_preset):
    ws, manifest = reference_zoo
    rows = zoo_summary(two_task_preset, ws)
    assert [r["task"] for r in rows] == list(TASKS)
    for r in rows:
        final = next(c for c in manifest if c.task == r["task"] and c.final)
        assert r["lora_acc"] == round(final.test_acc, 4)
        assert r["n_test"] == 16 and r["n_train"] > 0
        assert r["gain"] == round(r["lora_acc"] - r["base_acc"], 4)
    assert rows[0]["kind"] == "mc" and rows[1]["kind"] == "exact"


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_adapters(reference_zoo, two_task_preset, tmp_path):
    ws, manifest = reference_zoo
    again = build_zoo(two_task_preset, Workspace(tmp_path))
    assert again == manifest  # losses and test accuracies included
    assert_same_adapters(ws.zoo, Workspace(tmp_path).zoo, manifest)


def test_different_seeds_give_different_adapters(two_task_preset, tmp_path):
    p = two_task_preset.replace(pool=("syn.add",), zoo=dataclasses.replace(two_task_preset.zoo, seeds=(0, 1)))
    ws = Workspace(tmp_path)
    manifest = build_zoo(p, ws)
    finals = {c.seed: c for c in manifest if c.final}
    assert set(finals) == {0, 1}
    t0 = load_file(ws.zoo / finals[0].path / "adapter_model.safetensors")
    t1 = load_file(ws.zoo / finals[1].path / "adapter_model.safetensors")
    assert any(not torch.equal(t0[k], t1[k]) for k in t0)


# ---------------------------------------------------------------- resume


class Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_build_resumes_without_retraining(reference_zoo, two_task_preset, tmp_path, monkeypatch):
    ws_ref, manifest_ref = reference_zoo
    real_atomic_dir = zoo_mod.atomic_dir
    saves = []

    @contextlib.contextmanager
    def flaky_atomic_dir(path, *args, **kwargs):
        # the 4th checkpoint save (syn.copy's final step) is killed after its files are written
        with real_atomic_dir(path, *args, **kwargs) as tmp:
            yield tmp
            saves.append(path)
            if len(saves) == 4:
                assert any(tmp.iterdir())
                raise Interrupt()

    monkeypatch.setattr(zoo_mod, "atomic_dir", flaky_atomic_dir)
    ws = Workspace(tmp_path)
    with pytest.raises(Interrupt):
        build_zoo(two_task_preset, ws)
    monkeypatch.undo()
    root = ws.zoo
    assert not leftover_tmp(tmp_path), "an interrupted build left temporary files"
    assert sorted(f.name for f in (root / "runs").glob("*.json")) == ["syn.add__seed0.json"]
    assert not (root / "adapters/syn.copy/seed0/step00006").exists()
    assert (root / "adapters/syn.copy/seed0/step00005").exists()  # written before the kill

    done = [f for f in tree_files(root).values() if "syn.add" in str(f)]
    mtimes = {f: f.stat().st_mtime_ns for f in done}
    calls = []
    real_run_job = zoo_mod._run_job
    monkeypatch.setattr(
        zoo_mod, "_run_job", lambda job, *a, **k: (calls.append(job.run_id), real_run_job(job, *a, **k))
    )
    manifest = build_zoo(two_task_preset, ws)
    assert calls == ["syn.copy__seed0"]
    assert {f: f.stat().st_mtime_ns for f in done} == mtimes, "finished runs were rewritten"
    assert manifest == manifest_ref
    assert_same_adapters(ws_ref.zoo, root, manifest)
    assert not leftover_tmp(tmp_path)

    calls.clear()
    assert build_zoo(two_task_preset, ws) == manifest_ref
    assert calls == []


def test_interrupt_between_jobs(reference_zoo, two_task_preset, tmp_path, monkeypatch):
    ws_ref, manifest_ref = reference_zoo
    real_run_job = zoo_mod._run_job
    calls = []

    def run_job(job, *a, **k):
        calls.append(job.run_id)
        if len(calls) == 2:
            raise Interrupt()
        return real_run_job(job, *a, **k)

    monkeypatch.setattr(zoo_mod, "_run_job", run_job)
    ws = Workspace(tmp_path)
    with pytest.raises(Interrupt):
        build_zoo(two_task_preset, ws)
    assert calls == ["syn.add__seed0", "syn.copy__seed0"]
    calls.clear()
    monkeypatch.setattr(
        zoo_mod, "_run_job", lambda job, *a, **k: (calls.append(job.run_id), real_run_job(job, *a, **k))
    )
    assert build_zoo(two_task_preset, ws) == manifest_ref
    assert calls == ["syn.copy__seed0"]
    assert_same_adapters(ws_ref.zoo, ws.zoo, manifest_ref)


def test_deleted_run_is_redone(reference_zoo, two_task_preset, tmp_path, monkeypatch):
    ws_ref, manifest_ref = reference_zoo
    ws = Workspace(tmp_path)
    shutil.copytree(ws_ref.zoo, ws.zoo)
    root = ws.zoo
    (root / "runs" / "syn.add__seed0.json").unlink()
    shutil.rmtree(root / "adapters" / "syn.add")
    kept = {f: f.stat().st_mtime_ns for f in (root / "adapters" / "syn.copy").rglob("*") if f.is_file()}
    calls = []
    real_run_job = zoo_mod._run_job
    monkeypatch.setattr(
        zoo_mod, "_run_job", lambda job, *a, **k: (calls.append(job.run_id), real_run_job(job, *a, **k))
    )
    assert build_zoo(two_task_preset, ws) == manifest_ref
    assert calls == ["syn.add__seed0"]
    assert {f: f.stat().st_mtime_ns for f in kept} == kept
    assert_same_adapters(ws_ref.zoo, root, manifest_ref)


def _copy_zoo_and_record_jobs(reference_zoo, tmp_path, monkeypatch) -> list[str]:
    """Copy the reference zoo into tmp_path; the returned list fills with the run ids trained next."""
    ws_ref, _ = reference_zoo
    shutil.copytree(ws_ref.zoo, Workspace(tmp_path).zoo)
    calls: list[str] = []
    real_run_job = zoo_mod._run_job
    monkeypatch.setattr(
        zoo_mod, "_run_job", lambda job, *a, **k: (calls.append(job.run_id), real_run_job(job, *a, **k))
    )
    return calls


def test_extending_the_pool_trains_only_new_tasks(reference_zoo, two_task_preset, tmp_path, monkeypatch):
    calls = _copy_zoo_and_record_jobs(reference_zoo, tmp_path, monkeypatch)
    manifest = build_zoo(two_task_preset.replace(pool=TASKS + ("syn.parity",)), Workspace(tmp_path))
    assert calls == ["syn.parity__seed0"]
    assert {c.task for c in manifest} == {*TASKS, "syn.parity"}


def test_adding_a_seed_trains_only_the_new_seed(reference_zoo, two_task_preset, tmp_path, monkeypatch):
    calls = _copy_zoo_and_record_jobs(reference_zoo, tmp_path, monkeypatch)
    two_seeds = two_task_preset.replace(zoo=dataclasses.replace(two_task_preset.zoo, seeds=(0, 1)))
    manifest = build_zoo(two_seeds, Workspace(tmp_path))
    assert sorted(calls) == sorted(f"{t}__seed1" for t in TASKS)
    assert {(c.task, c.seed) for c in manifest} == {(t, s) for t in TASKS for s in (0, 1)}


# ---------------------------------------------------------------- config guard


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda p: p.replace(zoo=dataclasses.replace(p.zoo, steps=7)), "zoo"),
        (lambda p: p.replace(zoo=dataclasses.replace(p.zoo, rank=4)), "zoo"),
        (lambda p: p.replace(tasks=dataclasses.replace(p.tasks, split_seed=1)), "tasks"),
        (lambda p: p.replace(base="smollm2-135m"), "base"),
    ],
)
def test_rebuild_with_different_config_is_refused(reference_zoo, two_task_preset, tmp_path, monkeypatch, change, key):
    ws_ref, _ = reference_zoo
    ws = Workspace(tmp_path)
    shutil.copytree(ws_ref.zoo, ws.zoo)
    before = (ws.zoo / "config.json").read_bytes()
    monkeypatch.setattr(zoo_mod, "load_base", lambda name: pytest.fail("model loaded before the config check"))
    with pytest.raises(ConfigError) as e:
        build_zoo(change(two_task_preset), ws)
    assert f"'{key}'" in str(e.value) and "config.json" in str(e.value)
    assert (ws.zoo / "config.json").read_bytes() == before


def test_resume_under_speed_only_settings_trains_nothing(reference_zoo, two_task_preset, tmp_path, monkeypatch):
    """micro_batch, prefix sharing, the eval batch and the selection threshold do not change adapters: a built zoo
    resumes under new ones."""
    ws_ref, manifest = reference_zoo
    shutil.copytree(ws_ref.zoo, Workspace(tmp_path).zoo)
    monkeypatch.setattr(zoo_mod, "_run_job", lambda *a: pytest.fail("a finished run was trained again"))
    faster = two_task_preset.replace(
        zoo=dataclasses.replace(
            two_task_preset.zoo, micro_batch=2, min_shared_prefix=0, eval_batch_size=3, min_gain=0.2
        )
    )
    assert build_zoo(faster, Workspace(tmp_path)) == manifest


def test_checkpoint_saving_never_contacts_the_hub(two_task_preset, tmp_path, monkeypatch):
    """The zoo is built offline: saving a checkpoint must not ask the Hugging Face Hub anything.

    PEFT's ``save_pretrained`` defaults to ``save_embedding_layers="auto"``, which looks up
    ``<base_model_name_or_path>/config.json`` on the Hub (here the name "tiny") for every
    checkpoint; ``save_embedding_layers=False`` skips that (the zoo never targets embeddings).
    """
    import peft.utils.save_and_load as sl

    asked = []
    monkeypatch.setattr(sl, "check_file_exists_on_hf_hub", lambda repo, fname, **k: asked.append((repo, fname)))
    build_zoo(two_task_preset.replace(pool=("syn.add",)), Workspace(tmp_path))
    assert asked == [], f"checkpoint saving queried the Hub: {asked[:2]}"


# ---------------------------------------------------------------- atomic writes


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    from deltalora.outputs import atomic_dir

    target = tmp_path / "out"
    with atomic_dir(target, "checkpoint") as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target, "checkpoint", overwrite=True) as tmp:
            (tmp / "a.txt").write_text("second")
            raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "first"  # the old folder is untouched
    assert not leftover_tmp(tmp_path)
    with atomic_dir(target, "checkpoint", overwrite=True) as tmp:
        (tmp / "b.txt").write_text("replaced")
    assert sorted(p.name for p in target.iterdir()) == [".deltalora.json", "b.txt"]


def test_atomic_json_and_read_json_errors(tmp_path):
    from deltalora.io import atomic_write_json, read_json

    f = tmp_path / "sub" / "x.json"
    atomic_write_json(f, {"a": (1, 2)})
    assert read_json(f) == {"a": [1, 2]}
    assert not leftover_tmp(tmp_path)
    with pytest.raises(ArtifactError, match="zoo manifest not found"):
        read_json(tmp_path / "none.json", "zoo manifest")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ArtifactError, match="bad.json: run record is not valid JSON"):
        read_json(tmp_path / "bad.json", "run record")


# ---------------------------------------------------------------- trainer fast path and init


def test_lean_completion_loss_equals_transformers_loss_and_gradient(two_task_preset):
    """Length-sorted micro-batches + LM head on answer positions only == the padded labels= loss."""
    from peft import get_peft_model

    from deltalora.data.tasks import load_task, resolve_spec
    from deltalora.zoo.adapters import lora_config
    from deltalora.zoo.training import completion_batch, completion_loss

    base, tok = tiny_llama()
    torch.manual_seed(0)
    cfg = two_task_preset.zoo
    model = get_peft_model(base, lora_config(cfg.rank, cfg.alpha, cfg.target_modules))
    items = (
        load_task(resolve_spec("syn.copy"), two_task_preset.tasks).train[:5]
        + load_task(resolve_spec("syn.add"), two_task_preset.tasks).train[:4]
    )
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, labels = completion_batch(tok, items, 48)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, params)
    for micro in (1, 4, 9):
        lean = completion_loss(model, tok, items, 48, micro)
        assert lean.item() == pytest.approx(ref.item(), rel=1e-5)
        for g, r in zip(torch.autograd.grad(lean, params), ref_grads):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("micro", [1, 3, 9])
def test_shared_prefix_loss_equals_transformers_loss_and_gradient(two_task_preset, micro):
    """A task prefix run once with its keys/values shared by every row: same loss, same gradient."""
    from peft import get_peft_model

    from deltalora.data.items import Item
    from deltalora.data.tasks import load_task, resolve_spec
    from deltalora.lm.evaluate import encode
    from deltalora.zoo.adapters import lora_config
    from deltalora.zoo.training import completion_batch, completion_loss, shared_prefix_length

    base, tok = tiny_llama()
    torch.manual_seed(0)
    cfg = two_task_preset.zoo
    model = get_peft_model(base, lora_config(cfg.rank, cfg.alpha, cfg.target_modules))
    items = [
        Item("Answer with the copy of the word below, nothing else.\n" + it.prompt, it.answer, it.choices)
        for it in load_task(resolve_spec("syn.copy"), two_task_preset.tasks).train[:9]
    ]
    shared = shared_prefix_length([encode(tok, it.prompt, it.completion(), 96, eos=True) for it in items])
    assert shared >= 50  # the sharing path really runs on this batch
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, labels = completion_batch(tok, items, 96)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, params)
    lean = completion_loss(model, tok, items, 96, micro, min_shared_prefix=8)
    assert lean.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(torch.autograd.grad(lean, params), ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-7)


def test_shared_prefix_stops_before_the_first_supervised_logit():
    from deltalora.zoo.training import shared_prefix_length

    # the last prompt token of the shortest prompt (index 2) predicts its first answer token
    assert shared_prefix_length([([1, 2, 3, 9], 3), ([1, 2, 3, 4, 5, 9], 5)]) == 2
    assert shared_prefix_length([([1, 2, 3, 9], 4), ([1, 2, 7, 4, 9], 4)]) == 2
    assert shared_prefix_length([([5, 2, 9], 2), ([1, 2, 9], 2)]) == 0


@pytest.mark.parametrize("per_task", [False, True])
def test_lora_init_is_shared_across_tasks_unless_asked(two_task_preset, per_task):
    """Same seed -> the same lora_A basis for every task (weight targets share coordinates)."""
    from deltalora.data.tasks import load_task, resolve_spec
    from deltalora.zoo.training import train_lora

    cfg = dataclasses.replace(two_task_preset.zoo, lr=1e-9, warmup_steps=0, keep_last=1, init_per_task=per_task)
    base, tok = tiny_llama()
    first_a = {}
    for task in TASKS:
        items = load_task(resolve_spec(task), two_task_preset.tasks).train

        def grab(model, step, loss, task=task):
            first_a[task] = [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]

        train_lora(base, tok, items, cfg, 1, 0, f"{task}__seed0", grab)
    same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(first_a[TASKS[0]], first_a[TASKS[1]]))
    assert same is not per_task
