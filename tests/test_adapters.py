"""Adapter folders (validation before compute, swapping) and evaluation (MC scoring, accuracy)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from deltalora.config import ZooConfig
from deltalora.data.items import Item
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.errors import AdapterError
from deltalora.lm.evaluate import (
    accuracy,
    answer_span,
    answer_token_logprobs,
    choice_scores,
    choice_scores_unshared,
    encode,
    greedy_answers,
)
from deltalora.lm.models import load_base, tiny_llama
from deltalora.zoo.adapters import AdapterSwapper, check_adapter, load_adapter, lora_config, read_adapter

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _edit_tensors(folder, fn):
    tensors = load_file(folder / WEIGHTS)
    fn(tensors)
    save_file(tensors, folder / WEIGHTS)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def _first_key(folder, which="lora_A"):
    return sorted(k for k in load_file(folder / WEIGHTS) if f".{which}." in k)[0]


def _has_lora(model):
    return any(".lora_" in n for n, _ in model.named_parameters())


def _logits(model, tok, texts=("3 plus 4 equals", "Repeat: lemonriver\nAnswer:")):
    out = []
    with torch.no_grad():
        for t in texts:
            out.append(model(input_ids=torch.tensor([tok(t).input_ids])).logits)
    return out


# ---------------------------------------------------------------- validation


def test_valid_adapter_passes(adapter_copy, tiny_base):
    model, _ = tiny_base
    config, tensors = check_adapter(model, adapter_copy, "tiny")
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert len(tensors) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert check_adapter(model, adapter_copy, None)[1].keys() == tensors.keys()


@pytest.mark.parametrize("missing", [CONFIG, WEIGHTS])
def test_missing_file(adapter_copy, tiny_base, missing):
    model, _ = tiny_base
    (adapter_copy / missing).unlink()
    with pytest.raises(AdapterError) as e:
        load_adapter(model, adapter_copy, "tiny")
    assert str(adapter_copy / missing) in str(e.value) and "missing" in str(e.value)
    assert not _has_lora(model)


def test_missing_folder(tmp_path, tiny_base):
    with pytest.raises(AdapterError, match="missing"):
        check_adapter(tiny_base[0], tmp_path / "nowhere")


@pytest.mark.parametrize(
    "which, shape_fn",
    [
        ("lora_A", lambda t: (t.shape[0] + 1, t.shape[1])),  # rank disagrees with r
        ("lora_A", lambda t: (t.shape[0], t.shape[1] * 2)),  # in_features disagrees with the base
        ("lora_B", lambda t: (t.shape[0] - 1, t.shape[1])),  # out_features disagrees
    ],
)
def test_wrong_shape(adapter_copy, tiny_base, which, shape_fn):
    model, _ = tiny_base
    key = _first_key(adapter_copy, which)
    shape = {}

    def edit(ts):
        shape["new"] = shape_fn(ts[key])
        ts[key] = torch.zeros(shape["new"])

    _edit_tensors(adapter_copy, edit)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, adapter_copy, "tiny")
    msg = str(e.value)
    assert str(adapter_copy) in msg and key in msg and str(tuple(shape["new"])) in msg
    assert not _has_lora(model)


def test_wrong_base_name(adapter_copy, tiny_base):
    model, _ = tiny_base
    with pytest.raises(AdapterError) as e:
        load_adapter(model, adapter_copy, "smollm2-135m")
    assert "'tiny'" in str(e.value) and "'smollm2-135m'" in str(e.value) and str(adapter_copy) in str(e.value)
    assert not _has_lora(model)
    _edit_config(adapter_copy, base_model_name_or_path="some/other-model")
    with pytest.raises(AdapterError, match="some/other-model"):
        check_adapter(model, adapter_copy, "tiny")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(adapter_copy, tiny_base, bad):
    model, _ = tiny_base
    key = _first_key(adapter_copy, "lora_B")

    def edit(ts):
        ts[key][0, 0] = bad

    _edit_tensors(adapter_copy, edit)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, adapter_copy, "tiny")
    assert "NaN or Inf" in str(e.value) and key in str(e.value) and str(adapter_copy / WEIGHTS) in str(e.value)
    assert not _has_lora(model)


def test_non_lora_peft_type(adapter_copy, tiny_base):
    _edit_config(adapter_copy, peft_type="IA3")
    with pytest.raises(AdapterError) as e:
        check_adapter(tiny_base[0], adapter_copy, "tiny")
    assert "'peft_type'" in str(e.value) and "'IA3'" in str(e.value) and str(adapter_copy / CONFIG) in str(e.value)


def test_malformed_files(adapter_copy, tiny_base):
    model, _ = tiny_base
    (adapter_copy / CONFIG).write_text("{oops")
    with pytest.raises(AdapterError, match="not valid JSON"):
        check_adapter(model, adapter_copy)


def test_unreadable_safetensors(adapter_copy, tiny_base):
    (adapter_copy / WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        check_adapter(tiny_base[0], adapter_copy)


def test_unexpected_key_and_unknown_module(adapter_copy, tiny_base):
    model, _ = tiny_base
    _edit_tensors(adapter_copy, lambda ts: ts.update({"base_model.model.lm_head.bias": torch.zeros(3, 3)}))
    with pytest.raises(AdapterError, match="unexpected key"):
        check_adapter(model, adapter_copy)

    def move(ts):
        ts.pop("base_model.model.lm_head.bias")
        key = _first_key(adapter_copy, "lora_A")
        ts[key.replace("layers.0.", "layers.7.")] = ts.pop(key)

    _edit_tensors(adapter_copy, move)
    with pytest.raises(AdapterError, match="not a linear layer of the base model"):
        check_adapter(model, adapter_copy)


def test_wrong_dtype_or_rank(adapter_copy, tiny_base):
    key = _first_key(adapter_copy, "lora_A")
    _edit_tensors(adapter_copy, lambda ts: ts.update({key: ts[key].flatten()}))
    with pytest.raises(AdapterError, match="2-D float tensor"):
        read_adapter(adapter_copy)


# ---------------------------------------------------------------- loading and swapping


def test_load_adapter_matches_peft(tiny_zoo):
    folder = tiny_zoo.folder("syn.add")
    model, tok = load_base("tiny")
    ours = load_adapter(model, folder, "tiny")
    ref = PeftModel.from_pretrained(tiny_llama()[0], str(folder))
    for a, b in zip(_logits(ours, tok), _logits(ref, tok)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_swapper_matches_fresh_peft_models(tiny_zoo):
    folders = [tiny_zoo.folder("syn.add"), tiny_zoo.folder("syn.copy"), tiny_zoo.folder("syn.add", final=False)]
    base, tok = load_base("tiny")
    base_logits = _logits(base, tok)
    swapper = AdapterSwapper(base, PeftConfig.from_pretrained(str(folders[0])), "tiny")
    for a, b in zip(_logits(swapper.model, tok), base_logits):  # zero-initialised B: still the base
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    got = {}
    for f in folders + folders[:1]:  # swap back to the first one at the end
        got.setdefault(f, []).append(_logits(swapper.load(f), tok))
    for f in folders:
        ref_model = PeftModel.from_pretrained(tiny_llama()[0], str(f))
        ref_model.eval()
        ref = _logits(ref_model, tok)
        for run in got[f]:
            for a, b in zip(run, ref):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(got[folders[0]][0][0], got[folders[1]][0][0])
    # keys in PEFT's saved form, exactly the saved adapter's
    assert set(swapper.lora_keys()) == set(load_file(folders[0] / WEIGHTS))
    unwrapped = swapper.unload()
    assert not _has_lora(unwrapped)
    for a, b in zip(_logits(unwrapped, tok), base_logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_swapper_rejects_adapters_of_other_modules(tiny_zoo, tmp_path):
    base, tok = load_base("tiny")
    cfg = ZooConfig(rank=2, alpha=4.0, target_modules=("q_proj",))
    other = get_peft_model(load_base("tiny")[0], lora_config(cfg.rank, cfg.alpha, cfg.target_modules))
    other.save_pretrained(tmp_path / "q_only", save_embedding_layers=False)
    swapper = AdapterSwapper(base, PeftConfig.from_pretrained(str(tiny_zoo.folder("syn.add"))), "tiny")
    with pytest.raises(AdapterError, match="other modules"):
        swapper.load(tmp_path / "q_only")
    with pytest.raises(AdapterError, match="'tiny'"):
        AdapterSwapper(
            load_base("tiny")[0], PeftConfig.from_pretrained(str(tiny_zoo.folder("syn.add"))), "smollm2-135m"
        ).load(tiny_zoo.folder("syn.add"))


def test_swapper_set_tensors_refuses_partial_or_misshapen_tensors(tiny_zoo):
    """A generated adapter missing a tensor must not silently keep the previous adapter's."""
    swapper = AdapterSwapper(load_base("tiny")[0], PeftConfig.from_pretrained(str(tiny_zoo.folder("syn.add"))), "tiny")
    tensors = load_file(tiny_zoo.folder("syn.add") / WEIGHTS)
    before = {k: v.clone() for k, v in swapper._params.items()}
    first = next(iter(tensors))
    with pytest.raises(AdapterError, match="missing"):
        swapper.set_tensors({k: v for k, v in tensors.items() if k != first})
    with pytest.raises(AdapterError, match=r"unexpected \['extra'\]"):
        swapper.set_tensors({**tensors, "extra": tensors[first]})
    last = list(tensors)[-1]
    with pytest.raises(AdapterError, match="shape"):
        swapper.set_tensors({**tensors, last: tensors[last][:1]})
    for k, p in swapper._params.items():  # nothing was copied
        torch.testing.assert_close(p, before[k], atol=0, rtol=0)
    swapper.set_tensors(tensors)
    for k, p in swapper._params.items():
        torch.testing.assert_close(p, tensors[k], atol=0, rtol=0)
    assert any(not torch.equal(before[k], tensors[k]) for k in tensors)


# ---------------------------------------------------------------- evaluation


def _mixed_mc_items():
    """Items with different numbers of choices and multi-token choices of different lengths."""
    return [
        Item("Pick a colour:", "red", ("red", "blue")),
        Item("The capital of France is", "Paris", ("Paris", "London", "a very long answer indeed", "Rome", "x")),
        Item("2 plus 2 equals", "4", ("4", "22")),
        Item(
            "A much longer prompt that goes on and on about nothing in particular, ending with:",
            "yes",
            ("yes", "no", "maybe so"),
        ),
        Item("Q", "b", ("a", "b", "c")),
    ]


@pytest.fixture(scope="module")
def tiny_tasks(tiny_preset):
    return {n: load_task(resolve_spec(n), tiny_preset.tasks) for n in tiny_preset.pool}


@pytest.mark.parametrize("batch_size", [1, 4, 16, 64])
def test_choice_scores_shared_equals_unshared(tiny_zoo, tiny_tasks, batch_size):
    base, tok = load_base("tiny")
    model = PeftModel.from_pretrained(base, str(tiny_zoo.folder("syn.first")))
    model.eval()
    sets = [_mixed_mc_items(), list(tiny_tasks["syn.add"].test), list(tiny_tasks["syn.first"].test)]
    for items in sets:
        for max_length in (256, 24):  # 24 forces truncation of the longer prompts
            shared = choice_scores(model, tok, items, batch_size, max_length)
            ref = choice_scores_unshared(model, tok, items, batch_size, max_length)
            assert [len(s) for s in shared] == [len(it.choices) for it in items]
            for s, r in zip(shared, ref):
                assert s == pytest.approx(r, abs=1e-4)
    with model.disable_adapter():
        items = list(tiny_tasks["syn.parity"].test)
        for s, r in zip(
            choice_scores(model, tok, items, batch_size), choice_scores_unshared(model, tok, items, batch_size)
        ):
            assert s == pytest.approx(r, abs=1e-4)


def test_choice_scores_are_log_probability_per_byte(tiny_base):
    """A choice's score is its summed log-probability over the bytes of " " + choice (acc_norm)."""
    model, tok = tiny_base
    it = Item("2 plus 2 equals", "4", ("4", "four", "quatre ü"))
    scores = choice_scores(model, tok, [it])[0]
    for c, s in zip(it.choices, scores):
        p = tok(it.prompt).input_ids
        full = p + tok(" " + c, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0], -1)
        total = sum(logp[i - 1, full[i]].item() for i in range(len(p), len(full)))
        assert s == pytest.approx(total / len((" " + c).encode()), abs=1e-4)


def test_answer_token_logprobs_cover_every_answer_token(tiny_base):
    """One row per gold-answer token, items in order and batching aside equal to one unpadded forward each."""
    model, tok = tiny_base
    items = [Item("2 plus 2 equals", "four and more"), Item("a longer prompt, padded less", "5"), Item("x", "y z")]
    rows = answer_token_logprobs(model, tok, items, max_length=48, batch_size=2)
    want = []
    for it in items:
        ids, n_p = encode(tok, it.prompt, it.completion(), 48)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        want.append(logp[n_p - 1 : len(ids) - 1])
    assert torch.allclose(rows, torch.cat(want), atol=1e-5)


def test_accuracy_mc_and_exact(tiny_tasks, tiny_base):
    model, tok = tiny_base
    mc = list(tiny_tasks["syn.add"].test)
    acc = accuracy(model, tok, mc, batch_size=8, max_length=48)
    assert 0.0 <= acc <= 1.0
    scores = choice_scores_unshared(model, tok, mc, 8, 48)
    hits = [it.choices[max(range(len(s)), key=s.__getitem__)] == it.answer for it, s in zip(mc, scores)]
    assert acc == sum(hits) / len(hits)

    ex = list(tiny_tasks["syn.copy"].test)
    acc = accuracy(model, tok, ex, batch_size=5, max_length=48)
    assert 0.0 <= acc <= 1.0
    preds = greedy_answers(model, tok, ex, 5, 48)
    assert len(preds) == len(ex) and all(isinstance(p, str) and "\n" not in p for p in preds)
    assert acc == sum(p == answer_span(it.answer) for p, it in zip(preds, ex)) / len(ex)
    # greedy decoding in batches equals one item at a time
    assert greedy_answers(model, tok, ex, 1, 48) == preds


@pytest.mark.parametrize("use_adapter", [False, True])
def test_greedy_answers_equal_hf_generate(tiny_zoo, tiny_tasks, use_adapter):
    """The hand-written KV-cache loop gives the same tokens as ``generate`` (greedy), one item at a time."""
    model, tok = load_base("tiny")
    if use_adapter:
        model = PeftModel.from_pretrained(model, str(tiny_zoo.folder("syn.copy")))
        model.eval()
    items = list(tiny_tasks["syn.copy"].test[:6]) + [Item("A longer prompt, to pad the others in its batch:", "word")]
    max_new = max(len(tok(" " + it.answer, add_special_tokens=False).input_ids) for it in items) + 2
    ref = []
    for it in items:
        ids = torch.tensor([encode(tok, it.prompt, "", 48 - max_new)[0]])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        ref.append(answer_span(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)))
    assert greedy_answers(model, tok, items, 4, 48) == ref


@pytest.mark.parametrize(
    "text, span",
    [
        ("cats", "cats"),
        ("  cats  ", "cats"),
        ("cats\nmore text", "cats"),
        ("cats. And then", "cats"),
        ("done.", "done"),
        ("3.5", "3.5"),
        ("", ""),
        ("\nleading newline", ""),
    ],
)
def test_answer_span(text, span):
    assert answer_span(text) == span


def test_accuracy_restores_mode_and_rejects_empty(tiny_base, tiny_tasks):
    model, tok = tiny_base
    model.train()
    accuracy(model, tok, list(tiny_tasks["syn.parity"].test[:4]))
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="at least one item"):
        accuracy(model, tok, [])


def test_encode_truncates_prompt_from_the_left(tiny_base):
    _, tok = tiny_base
    ids, n_prompt = encode(tok, "abcdefghij" * 5, " answer", 20, eos=True)
    assert len(ids) == 20
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == " answer"
    assert tok.decode(ids[:n_prompt]).endswith("ghij")
    ids, n_prompt = encode(tok, "short", " a", 64)
    assert tok.decode(ids) == "short a" and tok.decode(ids[:n_prompt]) == "short"
