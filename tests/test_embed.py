"""`delta embed` and `delta neighbours`: δ of arbitrary PEFT LoRA and full fine-tuned folders, and nearest adapters.

δ of a zoo folder equals the zoo path's δ; adapters of other ranks, targets and variants and full
fine-tunes equal an independent computation (one prompt at a time through PEFT / transformers); adapters
that do not fit the base are refused naming the file, through the CLI in one line with exit 2.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from deltalora.cli import main
from deltalora.config import DeltaConfig
from deltalora.delta.compute import delta_stage, load_deltas
from deltalora.delta.embed import DeltaSet, Embedder, embed_folders, index_path, neighbours
from deltalora.delta.probes import probe_prompts
from deltalora.errors import AdapterError, UsageError
from deltalora.lm.models import load_base

P5 = DeltaConfig(n_probes=5, batch_size=5)


@pytest.fixture(scope="module")
def zoo_deltas(tiny_zoo) -> dict[str, torch.Tensor]:
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    return load_deltas(tiny_zoo.ws, 5)


def _independent(folder: Path | None = None, model=None, n: int = 5) -> torch.Tensor:
    """δ one probe at a time, no batching, no deltalora code beyond the base and the prompts."""
    base, tok = load_base("tiny")

    def mean_h(m) -> torch.Tensor:
        with torch.no_grad():
            hs = [
                m(input_ids=torch.tensor([tok(p).input_ids]), output_hidden_states=True).hidden_states[-1][0, -1]
                for p in probe_prompts(n)
            ]
        return torch.stack(hs).float().mean(0)

    h0 = mean_h(base)
    tuned = PeftModel.from_pretrained(base, str(folder)) if folder is not None else model
    return mean_h(tuned.eval()) - h0


def _peft_adapter(folder: Path, seed: int, **lora) -> Path:
    base, _ = load_base("tiny")
    torch.manual_seed(seed)
    m = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: δ would be 0
                p.normal_(0, 0.2)
    m.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    return {
        "r4": _peft_adapter(root / "r4", 1, r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"]),
        "dora": _peft_adapter(
            root / "dora", 2, r=3, lora_alpha=3, target_modules=["q_proj", "down_proj"], use_dora=True
        ),
        "rslora": _peft_adapter(root / "rslora", 3, r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    }


@pytest.fixture(scope="module")
def full_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("full")
    tuned, _ = load_base("tiny")
    torch.manual_seed(4)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tuned.save_pretrained(root / "tuned")
    cfg = dict(vocab_size=tuned.config.vocab_size, num_hidden_layers=2, num_attention_heads=4)
    LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, **cfg)).save_pretrained(root / "wide")
    gpt2 = dict(vocab_size=tuned.config.vocab_size, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(GPT2Config(**gpt2)).save_pretrained(root / "gpt2")
    return {"tuned": root / "tuned", "wide": root / "wide", "gpt2": root / "gpt2", "model": tuned}


# ---------------------------------------------------------------- embed


def test_zoo_folders_equal_the_zoo_delta(tiny_zoo, zoo_deltas, tmp_path):
    folders = [tiny_zoo.root / c.path for c in tiny_zoo.manifest]
    out = tmp_path / "zoo.safetensors"
    entries = embed_folders(folders, out, "tiny", P5)
    got = load_file(out)
    assert list(got) == [str(f) for f in folders]
    for c in tiny_zoo.manifest:
        d = got[str(tiny_zoo.root / c.path)]
        assert d.dtype == torch.float32 and d.shape == (32,)
        assert (d - zoo_deltas[c.path]).abs().max() <= 1e-5, c.path
    index = json.loads(index_path(out).read_text())
    assert index["base"] == "tiny" and index["n_probes"] == 5 and index["probes"] == probe_prompts(5)
    e = index["entries"][0]
    assert (
        e["kind"] == "lora"
        and e["rank"] == tiny_zoo.preset.zoo.rank
        and e["n_probes"] == 5
        and e["trained_on"] == "tiny"
    )
    assert e["target_modules"] == sorted(tiny_zoo.preset.zoo.target_modules) and e["source"] == str(folders[0])
    assert e["delta_norm"] == pytest.approx(float(got[e["key"]].norm()), rel=1e-6) == entries[0].delta_norm


def test_peft_adapters_of_other_ranks_targets_and_variants(peft_adapters, tmp_path):
    out = tmp_path / "peft.safetensors"
    folders = [peft_adapters[k] for k in ("dora", "r4", "rslora")]
    emb = embed_folders(folders, out, "tiny", P5, key_by="name")
    got = load_file(out)
    assert [e.key for e in emb] == ["dora", "r4", "rslora"] and list(got) == ["dora", "r4", "rslora"]
    assert [e.rank for e in emb] == [3, 4, 8] and emb[1].target_modules == ["o_proj", "up_proj"]
    for f in folders:  # any stacking of an earlier adapter would show here
        want = _independent(f)
        assert want.norm() > 1e-3
        assert (got[f.name] - want).abs().max() <= 1e-5, f.name


def test_no_adapter_is_left_on_the_base(peft_adapters):
    emb = Embedder("tiny", DeltaConfig(n_probes=1))
    first = emb.embed(peft_adapters["r4"])[0]
    emb.embed(peft_adapters["dora"])
    assert not any("lora" in n for n, _ in emb.model.named_modules())
    assert torch.equal(emb.embed(peft_adapters["r4"])[0], first)


def test_full_fine_tune_embeds_and_other_architectures_are_refused(full_models, tmp_path):
    emb = Embedder("tiny", P5)
    d, e = emb.embed(full_models["tuned"])
    assert e.kind == "model" and e.rank is None and e.peft_type is None
    assert (d - _independent(model=full_models["model"])).abs().max() <= 1e-5
    for k, field in (("wide", "hidden_size"), ("gpt2", "model_type")):
        with pytest.raises(AdapterError, match=field) as err:
            emb.embed(full_models[k])
        assert str(full_models[k]) in str(err.value)


# ---------------------------------------------------------------- refusals


def _broken(peft_adapters, tmp_path) -> dict[str, Path]:
    """Folders that must be refused, each named by the path the error must contain."""
    src = peft_adapters["r4"]
    tensors = load_file(src / "adapter_model.safetensors")
    first = next(iter(tensors))
    cases = {
        "shape": {**tensors, first: torch.zeros(4, 33)},
        "missing": {k: v for k, v in tensors.items() if k != first},
        "nan": {**tensors, first: torch.full_like(tensors[first], float("nan"))},
        "extra": {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
    }
    out = {}
    for name, t in cases.items():
        shutil.copytree(src, tmp_path / name)
        save_file(t, tmp_path / name / "adapter_model.safetensors")
        out[name] = tmp_path / name
    (tmp_path / "empty").mkdir()
    out["empty"] = tmp_path / "empty"
    shutil.copytree(src, tmp_path / "pickle")
    (tmp_path / "pickle" / "adapter_model.safetensors").rename(tmp_path / "pickle" / "adapter_model.bin")
    out["pickle"] = tmp_path / "pickle"
    shutil.copytree(src, tmp_path / "targets")
    cfg = json.loads((src / "adapter_config.json").read_text())
    (tmp_path / "targets" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["c_attn"]}))
    out["targets"] = tmp_path / "targets"
    return out


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def cli(monkeypatch, capsys, argv: list) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["deltalora", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_adapters_that_do_not_fit_are_refused_naming_the_path(peft_adapters, tmp_path, monkeypatch, capsys):
    emb = Embedder("tiny", DeltaConfig(n_probes=1))
    good = emb.embed(peft_adapters["r4"])[0]
    for name, folder in _broken(peft_adapters, tmp_path / "bad").items():
        with pytest.raises(AdapterError) as err:
            emb.embed(folder)
        assert str(folder) in str(err.value), (name, err.value)
        out = tmp_path / f"{name}.safetensors"
        code, _, text = cli(
            monkeypatch, capsys, ["delta", "embed", "-p", "tiny", "-o", out, peft_adapters["r4"], folder]
        )
        err_lines = error_lines(text)
        assert code == 2 and len(err_lines) == 1 and str(folder) in err_lines[0] and "Traceback" not in text, text
        assert not out.exists() and not index_path(out).exists()  # nothing written unless every folder embeds
    assert torch.equal(emb.embed(peft_adapters["r4"])[0], good)  # refusals leave the base clean


def test_contradictory_options_are_refused(tiny_zoo, peft_adapters, tmp_path, monkeypatch, capsys):
    f, out = peft_adapters["r4"], tmp_path / "x.safetensors"
    for argv in (
        ["delta", "embed", "-p", "tiny", "-o", tmp_path / "x.json", f],
        ["delta", "embed", "-p", "tiny", "-o", out, "--probes", "3", f],
        ["delta", "embed", "-p", "tiny", "-o", out, f, f],
        ["delta", "embed", "-p", "tiny", "-o", tiny_zoo.ws.delta / "x.safetensors", "-w", tiny_zoo.workspace, f],
        ["delta", "neighbours", "-p", "tiny", "--deltas", out, "-w", tiny_zoo.workspace, f],
        ["delta", "neighbours", "-p", "tiny", "-w", tiny_zoo.workspace],
    ):
        code, _, text = cli(monkeypatch, capsys, argv)
        assert code == 2 and len(error_lines(text)) == 1 and "Traceback" not in text, (argv, text)
    with pytest.raises(UsageError, match="--probes 5, not 1"):
        DeltaSet({}, {}, "tiny", 5, "f").resolved(None, 1, "tiny", 5)


# ---------------------------------------------------------------- neighbours


def test_neighbours_of_a_zoo_adapter_in_its_workspace(tiny_zoo, zoo_deltas, monkeypatch, capsys):
    c = tiny_zoo.checkpoint("syn.add")
    argv = ["delta", "neighbours", "-p", "tiny", "-w", tiny_zoo.workspace, tiny_zoo.root / c.path, "-k", "3"]
    code, out, _ = cli(monkeypatch, capsys, [*argv, "--json"])
    res = json.loads(out)
    assert code == 0 and res["base"] == "tiny" and res["n_probes"] == 5 and len(res["neighbours"]) == 3
    top = res["neighbours"][0]
    assert top["key"] == c.path and top["task"] == "syn.add" and top["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert [r["cosine"] for r in res["neighbours"]] == sorted((r["cosine"] for r in res["neighbours"]), reverse=True)
    code, out, _ = cli(monkeypatch, capsys, argv)
    assert code == 0 and len(out.splitlines()) == 4 and "syn.add" in out.splitlines()[1]


def test_neighbours_in_an_embed_file(peft_adapters, full_models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "set.safetensors"
    folders = [peft_adapters["r4"], peft_adapters["dora"], full_models["tuned"]]
    code, _, _ = cli(monkeypatch, capsys, ["delta", "embed", "-p", "tiny", "--probes", "1", "-o", out, *folders])
    assert code == 0 and json.loads(index_path(out).read_text())["entries"][2]["kind"] == "model"
    key = str(peft_adapters["r4"])
    code, text, _ = cli(monkeypatch, capsys, ["delta", "neighbours", "--deltas", out, "--query-key", key, "--json"])
    res = json.loads(text)  # base and probes come from the file, not the (small) default preset
    assert code == 0 and res["base"] == "tiny" and res["n_probes"] == 1
    assert {r["key"] for r in res["neighbours"]} == {str(folders[1]), str(folders[2])}  # not itself
    assert all(r["task"] is None for r in res["neighbours"])
    dset = DeltaSet.from_file(out)
    assert neighbours(dset, dset.deltas[key], k=1)[0] == {"key": key, "task": None, "cosine": pytest.approx(1.0)}
    code, _, text = cli(monkeypatch, capsys, ["delta", "neighbours", "--deltas", out, "--base", "smollm2-135m", key])
    assert code == 2 and "measured with --base tiny" in error_lines(text)[0]
