"""Delta Activations: probe set, batching, the differentiable path, resumable zoo deltas, and analysis."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file

import deltalora.delta.compute as delta_mod
from deltalora.config import DeltaConfig
from deltalora.delta.analysis import additivity, cosine_distance, silhouette
from deltalora.delta.compute import compute_zoo_deltas
from deltalora.delta.probes import DeltaProbe, probe_prompts
from deltalora.errors import ArtifactError
from deltalora.lm.models import load_base
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import AdapterSwapper
from deltalora.zoo.manifest import Checkpoint, Manifest

FIRST_PROBE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nPlease provide a response. Input:Input.\n\n### Response:"
)


# ---------------------------------------------------------------- probes


def test_probe_prompt_sets():
    p1, p5, p20 = probe_prompts(1), probe_prompts(5), probe_prompts(20)
    assert (len(p1), len(p5), len(p20)) == (1, 5, 20)
    assert p1[0] == FIRST_PROBE
    assert p5[0] == FIRST_PROBE and p20[:5] == p5  # nested sets
    assert len(set(p20)) == 20
    for p in p20:
        assert p.endswith("\n\n### Response:") and "\n\n### Instruction:\n" in p
    with pytest.raises(ValueError, match="1, 5 or 20"):
        probe_prompts(3)


def _last_state(model, tok, prompt):
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].float()


@pytest.fixture
def trained(tiny_zoo):
    """Base model, tokenizer and a trained adapter folder (syn.add, final)."""
    base, tok = load_base("tiny")
    return base, tok, tiny_zoo.folder("syn.add")


def test_delta_batched_equals_unbatched(trained):
    base, tok, folder = trained
    probes = {bs: DeltaProbe(tok, DeltaConfig(n_probes=5, batch_size=bs)) for bs in (1, 2, 5)}
    probe20 = {bs: DeltaProbe(tok, DeltaConfig(n_probes=20, batch_size=bs)) for bs in (20, 7)}
    for p in [*probes.values(), *probe20.values()]:
        p.set_base(base)
    # base mean equals the mean of unpadded one-prompt forwards
    ref_base = torch.stack([_last_state(base, tok, q) for q in probe_prompts(5)]).mean(0)
    torch.testing.assert_close(probes[5].base_mean, ref_base, atol=1e-5, rtol=0)

    model = PeftModel.from_pretrained(base, str(folder))
    model.eval()
    ref = torch.stack([_last_state(model, tok, q) for q in probe_prompts(5)]).mean(0) - ref_base
    deltas = {bs: p.delta(model) for bs, p in probes.items()}
    assert deltas[5].shape == (32,)
    assert deltas[5].abs().max() > 1e-4  # a trained adapter moves the activations
    for bs, d in deltas.items():
        torch.testing.assert_close(d, deltas[1], atol=1e-5, rtol=0, msg=f"batch_size={bs}")
    torch.testing.assert_close(deltas[5], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(probe20[20].delta(model), probe20[7].delta(model), atol=1e-5, rtol=0)


def test_delta_of_base_is_zero(tiny_base):
    base, tok = tiny_base
    probe = DeltaProbe(tok, DeltaConfig(n_probes=5, batch_size=5))
    probe.set_base(base)
    assert torch.count_nonzero(probe.delta(base)) == 0


def test_differentiable_delta_matches_and_has_gradients(trained):
    base, tok, folder = trained
    probe = DeltaProbe(tok, DeltaConfig(n_probes=5, batch_size=5))
    probe.set_base(base)
    swapper = AdapterSwapper(base, PeftConfig.from_pretrained(str(folder)), "tiny")
    saved = load_file(folder / "adapter_model.safetensors")
    assert set(saved) == set(swapper.lora_keys())
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in saved)
    tensors = {k: v.clone().requires_grad_(True) for k, v in saved.items()}

    # the wrapper still holds its zero-initialised B: δ must come from the given tensors alone
    d_tensors = probe.delta_of_tensors(swapper.model, tensors)
    assert d_tensors.requires_grad
    assert torch.count_nonzero(probe.delta(swapper.model)) == 0
    d_plain = probe.delta(swapper.load(folder))
    assert d_plain.abs().max() > 1e-4
    torch.testing.assert_close(d_tensors.detach(), d_plain, atol=1e-5, rtol=0)

    d_tensors.pow(2).sum().backward()
    for k, t in tensors.items():
        assert t.grad is not None, f"no gradient for {k}"
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {k}"
        assert t.grad.abs().sum() > 0, f"zero gradient for {k}"
    # the wrapper's own parameters are untouched by the functional call
    assert all(p.grad is None for p in swapper.model.parameters())
    swapper.unload()


# ---------------------------------------------------------------- zoo deltas


def _ws_on_zoo(tiny_zoo, folder) -> Workspace:
    """A fresh workspace in ``folder`` whose zoo is the session's tiny zoo (its δ files are its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zoo").symlink_to(tiny_zoo.root, target_is_directory=True)
    return Workspace(folder)


def test_compute_zoo_deltas_resumes(tiny_zoo, tmp_path, monkeypatch):
    base, tok = load_base("tiny")
    cfg = DeltaConfig(n_probes=5, batch_size=5)
    manifest = list(tiny_zoo.manifest)
    ws = _ws_on_zoo(tiny_zoo, tmp_path / "ws")
    out = ws.delta

    first = compute_zoo_deltas(base, tok, ws, manifest[:3], cfg, base_name="tiny", save_every=2)
    assert set(first) == {c.path for c in manifest[:3]}
    assert not any(".lora_" in n for n, _ in base.named_parameters())  # the base is unwrapped again

    loaded = []
    real_load = AdapterSwapper.load
    monkeypatch.setattr(
        AdapterSwapper,
        "load",
        lambda self, folder, sha256=None: (loaded.append(folder), real_load(self, folder, sha256))[1],
    )
    full = compute_zoo_deltas(base, tok, ws, manifest, cfg, base_name="tiny")
    assert len(loaded) == len(manifest) - 3  # only the new checkpoints
    assert set(full) == {c.path for c in manifest}
    for k, v in first.items():
        assert torch.equal(full[k], v)

    # a third call computes nothing and returns the stored values
    monkeypatch.setattr(delta_mod, "AdapterSwapper", lambda *a, **k: pytest.fail("recomputed finished deltas"))
    again = compute_zoo_deltas(base, tok, ws, manifest, cfg, base_name="tiny")
    assert again.keys() == full.keys() and all(torch.equal(again[k], full[k]) for k in full)
    stored = load_file(out / "deltas_p5.safetensors")
    assert stored.keys() == full.keys()
    meta = json.loads((out / "config.json").read_text())
    assert meta["delta"] == {"n_probes": 5, "batch_size": 5} and meta["probes"] == probe_prompts(5)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # resumed values equal a fresh computation of everything
    monkeypatch.undo()
    fresh = compute_zoo_deltas(
        load_base("tiny")[0], tok, _ws_on_zoo(tiny_zoo, tmp_path / "fresh"), manifest, cfg, base_name="tiny"
    )
    for k in fresh:
        torch.testing.assert_close(full[k], fresh[k], atol=1e-6, rtol=0)
    # different checkpoints have different deltas
    vals = [fresh[c.path] for c in manifest]
    assert all(not torch.equal(vals[0], v) for v in vals[1:])


def test_load_deltas_missing(tmp_path):
    with pytest.raises(ArtifactError, match="--probes 20"):
        delta_mod.load_deltas(Workspace(tmp_path), 20)


# ---------------------------------------------------------------- analysis


def test_cosine_distance_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8))
    d = cosine_distance(x)
    assert d.shape == (6, 6)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    np.testing.assert_allclose(d, d.T, atol=1e-12)
    assert (d >= 0).all() and (d <= 1).all()
    np.testing.assert_allclose(cosine_distance(x * np.array([[3.0], [0.5], [1], [2], [7], [1e-3]])), d, atol=1e-9)
    e = cosine_distance(np.array([[1.0, 0], [2.0, 0], [0, 1.0], [-1.0, 0], [-1.0, 1.0]]))
    assert e[0, 1] == pytest.approx(0.0, abs=1e-12)  # same direction
    assert e[0, 2] == pytest.approx(1.0)  # orthogonal
    assert e[0, 3] == pytest.approx(1.0)  # opposite: clipped to 1
    assert e[0, 4] == pytest.approx(1.0)  # obtuse: clipped to 1
    assert e[2, 4] == pytest.approx(1 - np.sqrt(0.5))
    z = cosine_distance(np.array([[0.0, 0.0], [1.0, 0.0]]))  # a zero vector gives no NaN
    assert np.isfinite(z).all()


def test_silhouette_separates_clusters():
    rng = np.random.default_rng(0)
    centers = np.eye(3, 16) * 10
    x = np.concatenate([c + rng.normal(scale=0.5, size=(5, 16)) for c in centers])
    labels = [d for d in ("a", "b", "c") for _ in range(5)]
    assert silhouette(x, labels) > 0.5
    shuffled = list(rng.permutation(labels))
    assert silhouette(x, shuffled) < silhouette(x, labels)
    with pytest.raises(ValueError, match="at least 2 labels"):
        silhouette(x, ["a"] * 15)
    with pytest.raises(ValueError):
        silhouette(x[:3], ["a", "b", "c"])


def test_additivity_rows():
    da, db = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    deltas = {
        "a/f": da,
        "b/f": db,
        "a/early": torch.tensor([5.0, 5.0, 5.0]),
        "ab/f": da + db,
        "b/s1": torch.tensor([0.0, 0.0, 1.0]),
        "ab2/f": torch.tensor([1.0, 1.0, 1.0]),
    }

    def ckpt(task, seed, path, final, pair_of):
        return Checkpoint(
            task=task, domain="d", seed=seed, step=1, loss=0.0, path=path, sha256="", final=final, pair_of=pair_of
        )

    manifest = Manifest(
        (
            ckpt("a", 0, "a/early", False, None),
            ckpt("a", 0, "a/f", True, None),
            ckpt("b", 0, "b/f", True, None),
            ckpt("b", 1, "b/s1", True, None),
            ckpt("a+b", 0, "ab/f", True, ("a", "b")),
            ckpt("a+b", 0, "ab/early", False, ("a", "b")),  # not final
            ckpt("a+c", 0, "ab2/f", True, ("a", "c")),  # no δ for c
        )
    )
    rows = additivity(deltas, manifest)
    assert len(rows) == 1
    r = rows[0]
    assert r["pair"] == "a+b"
    assert r["cos_sum"] == pytest.approx(1.0)
    assert r["cos_a"] == pytest.approx(round(1 / np.sqrt(5), 4))
    assert r["cos_b"] == pytest.approx(round(2 / np.sqrt(5), 4))
    assert additivity(deltas, Manifest(tuple(m for m in manifest if m.task != "a"))) == []


def test_additivity_on_zoo_deltas(tiny_zoo, tmp_path):
    base, tok = load_base("tiny")
    ws = _ws_on_zoo(tiny_zoo, tmp_path / "ws")
    deltas = compute_zoo_deltas(base, tok, ws, list(tiny_zoo.manifest), DeltaConfig(5, 5), base_name="tiny")
    rows = additivity(deltas, tiny_zoo.manifest)
    assert [r["pair"] for r in rows] == ["syn.add+syn.copy"]
    for k in ("cos_sum", "cos_a", "cos_b"):
        assert -1.0 <= rows[0][k] <= 1.0
