"""Hostile inputs (property-based): every loader either returns valid data or raises its own
clear error — never a stray TypeError/KeyError from deep inside, never a silent wrong result."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from deltalora.data.bigbench import bigbench_items
from deltalora.data.items import Item
from deltalora.data.jsonl import load_jsonl_items, load_user_specs
from deltalora.errors import AdapterError, GeneratorError, TaskError
from deltalora.generator.artifact import load_generator
from deltalora.generator.generate import read_prompts
from deltalora.zoo.adapters import check_adapter, read_adapter

EXAMPLES = 150
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
item_like = st.fixed_dictionaries(
    {},
    optional={
        "prompt": json_values | st.text(max_size=30),
        "choices": json_values | st.lists(st.text(max_size=5), max_size=4),
        "answer": json_values | st.text(max_size=5),
        "target": json_values | st.text(max_size=5),
        "split": st.sampled_from(["train", "test", "dev", None, 3]),
    },
)


def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    f = tmp_path / name
    f.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return f


def _valid_items(items):
    for it, split in items:
        assert isinstance(it, Item) and it.prompt.strip() and it.answer.strip()
        assert split in (None, "train", "test")
        if it.choices:
            assert it.answer in it.choices and len(set(it.choices)) == len(it.choices)


@SETTINGS
@given(lines=st.lists(item_like.map(json.dumps) | json_values.map(json.dumps) | st.text(max_size=40), max_size=6))
def test_jsonl_task_loader(tmp_path, lines):
    f = _write(tmp_path, "t.jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        _valid_items(load_jsonl_items(f))
    except TaskError as e:
        assert str(f) in str(e)


@SETTINGS
@given(data=st.binary(max_size=200))
def test_jsonl_task_loader_random_bytes(tmp_path, data):
    f = _write(tmp_path, "t.jsonl", data)
    try:
        _valid_items(load_jsonl_items(f))
    except TaskError as e:
        assert str(f) in str(e)


bigbench_docs = st.fixed_dictionaries(
    {},
    optional={
        "examples": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "input": json_values | st.text(max_size=10),
                    "target": json_values | st.text(max_size=5),
                    "target_scores": json_values
                    | st.dictionaries(
                        st.text(max_size=4),
                        st.integers(0, 1) | st.floats(allow_nan=False) | st.text(max_size=2),
                        max_size=4,
                    ),
                },
            )
            | json_values,
            max_size=5,
        )
        | json_values,
        "task_prefix": json_values,
        "example_input_prefix": json_values,
        "example_output_prefix": json_values,
        "append_choices_to_input": json_values,
        "preferred_score": st.sampled_from(["multiple_choice_grade", "exact_str_match"]) | json_values,
    },
)


@SETTINGS
@given(doc=bigbench_docs | json_values, kind=st.sampled_from([None, "mc", "exact"]))
def test_bigbench_loader(tmp_path, doc, kind):
    f = _write(tmp_path, "task.json", json.dumps(doc))
    try:
        _valid_items(bigbench_items("x/y", kind, f))
    except TaskError as e:
        assert str(f) in str(e)


@SETTINGS
@given(
    doc=json_values
    | st.lists(st.fixed_dictionaries({}, optional={"name": json_values, "domain": json_values, "path": json_values}))
)
def test_user_spec_loader(tmp_path, doc):
    f = _write(tmp_path, "specs.json", json.dumps(doc))
    try:
        specs = load_user_specs(f)
        assert all(s.name and s.domain and s.source.startswith("jsonl:") for s in specs)
    except TaskError as e:
        assert str(f) in str(e)


@SETTINGS
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_prompt_file_loader(tmp_path, data, suffix):
    f = _write(tmp_path, "p" + suffix, data)
    try:
        prompts = read_prompts(f)
        assert prompts and all(isinstance(p, str) and p.strip() for p in prompts)
    except GeneratorError as e:
        assert str(f) in str(e)


tensor_specs = st.dictionaries(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.AB0123456789", min_size=1, max_size=60)
    | st.sampled_from(
        [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
        ]
    ),
    st.tuples(
        st.lists(st.integers(0, 40), min_size=0, max_size=3),
        st.sampled_from(["f32", "f16", "i64", "nan", "inf", "bool"]),
    ),
    min_size=0,
    max_size=4,
)


def _tensor(shape, kind):
    if kind == "i64":
        return torch.zeros(shape, dtype=torch.int64)
    if kind == "bool":
        return torch.zeros(shape, dtype=torch.bool)
    t = torch.randn(shape, dtype=torch.float32 if kind != "f16" else torch.float16)
    if kind in ("nan", "inf") and t.numel():
        t.view(-1)[0] = float(kind)
    return t


@SETTINGS
@given(
    spec=tensor_specs, config=json_values | st.just({"peft_type": "LORA", "r": 2, "base_model_name_or_path": "tiny"})
)
def test_adapter_folder_loader(tmp_path, tiny_base, spec, config):
    model, _ = tiny_base
    folder = tmp_path / "ad"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: _tensor(tuple(shape), kind) for k, (shape, kind) in spec.items()}
    save_file(tensors, folder / "adapter_model.safetensors")
    try:
        _, loaded = check_adapter(model, folder, "tiny")
        for k, t in loaded.items():  # whatever is accepted is a finite 2-D float LoRA tensor
            assert t.is_floating_point() and t.ndim == 2 and torch.isfinite(t).all() and ".lora_" in k
    except AdapterError as e:
        assert str(folder) in str(e)


@SETTINGS
@given(weights=st.binary(max_size=300), header_len=st.integers(0, 2**63 - 1))
def test_adapter_weights_random_bytes_and_huge_header(tmp_path, weights, header_len):
    folder = tmp_path / "ad"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (folder / "adapter_model.safetensors").write_bytes(header_len.to_bytes(8, "little") + weights)
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        read_adapter(folder)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "PWNED",))


def test_pickles_are_never_loaded(tmp_path, tiny_zoo):
    marker = Path(__file__).parent / "PWNED"
    marker.unlink(missing_ok=True)
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        read_adapter(folder)
    # a generator training state that is a malicious pickle is refused by torch.load(weights_only=True)
    from deltalora.delta.compute import delta_stage
    from deltalora.generator.train import train_generator
    from deltalora.presets import apply_overrides

    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    out = tmp_path / "g"
    preset = apply_overrides(tiny_zoo.preset, ["generator.steps=2", "generator.save_every=1"])
    train_generator(preset, tiny_zoo.ws, out, list(preset.pool), progress=False)
    torch.save({"x": _Boom()}, out / "train_state.pt")
    with pytest.raises(GeneratorError, match="train_state.pt"):
        train_generator(preset, tiny_zoo.ws, out, list(preset.pool), progress=False)
    assert not marker.exists()


@SETTINGS
@given(config=json_values)
def test_generator_config_loader(tmp_path, config):
    folder = tmp_path / "g"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"delta_scale": torch.ones(1)}, folder / "generator.safetensors")
    with pytest.raises(GeneratorError, match=str(folder)):
        load_generator(folder)
