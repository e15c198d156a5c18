"""Generation: a prompt file -> a PEFT adapter folder that ``peft.PeftModel.from_pretrained`` loads unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltalora.errors import GeneratorError
from deltalora.generator.artifact import LoadedGenerator, load_generator
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.retrieval import is_retrieval, retrieve
from deltalora.io import atomic_write_json, read_json
from deltalora.outputs import atomic_dir, claim_output_dir
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import lora_config, read_adapter

log = logging.getLogger(__name__)


def read_prompts(file: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (strings or objects with 'prompt')."""
    file = Path(file)
    try:
        lines = [ln for ln in file.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise GeneratorError(f"{file}: cannot read prompt file ({e})") from e
    if not lines:
        raise GeneratorError(f"{file}: no prompts (expected one prompt per line, or JSONL)")
    if file.suffix != ".jsonl":
        return [ln.replace("\\n", "\n") for ln in lines]
    prompts = []
    for n, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise GeneratorError(f"{file}: line {n}: not valid JSON ({e.msg})") from e
        p = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(p, str) or not p.strip():
            raise GeneratorError(f"{file}: line {n}: expected a string or an object with a non-empty 'prompt'")
        prompts.append(p)
    return prompts


def choose_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """Exactly n prompts: a seeded subset, or (with a warning) a draw with replacement when too few."""
    rng = random.Random(seed)
    if len(prompts) >= n:
        return rng.sample(prompts, n)
    log.warning("%d prompts given, the generator reads %d: sampling with replacement", len(prompts), n)
    return [rng.choice(prompts) for _ in range(n)]


def write_adapter(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    adapter_config: dict,
    provenance: dict,
    overwrite: bool = False,
    protected: tuple[Path, ...] = (),
) -> Path:
    """A PEFT adapter folder (config + safetensors + provenance), written atomically (``outputs.atomic_dir``)."""
    ac = adapter_config
    cfg = lora_config(ac["r"], ac["lora_alpha"], ac["target_modules"], ac.get("base_model_name_or_path"))
    with atomic_dir(out_dir, "adapter", overwrite=overwrite, protected=protected) as tmp:
        cfg.save_pretrained(str(tmp))
        save_file(
            {k: v.detach().float().contiguous() for k, v in tensors.items()},
            tmp / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
        atomic_write_json(tmp / "provenance.json", provenance)
    return Path(out_dir)


@torch.inference_mode()
def generate_tensors(
    gen: LoadedGenerator, encoder: PromptEncoder, prompts: list[str], seed: int
) -> dict[str, torch.Tensor]:
    """LoRA tensors (PEFT's saved key form) from a seeded draw of the generator's N prompts."""
    chosen = choose_prompts(prompts, gen.card.n_prompts, seed)
    return {k: v[0] for k, v in gen.tokenizer.decode(gen.model(encoder.encode(chosen)[None])).items()}


def _keep_out(gen_dir: Path) -> tuple[Path, ...]:
    """Folders a generated adapter may not be written in: the generator and its workspace's zoo and δ."""
    card = gen_dir / "config.json"
    recorded = read_json(card, "generator config").get("workspace") if card.exists() else None
    return (gen_dir, *Workspace(Path(recorded)).protected) if recorded else (gen_dir,)


def generate(
    gen_dir: str | Path,
    prompts: list[str],
    out_dir: str | Path,
    seed: int = 0,
    encoder: PromptEncoder | None = None,
    overwrite: bool = False,
) -> dict:
    """Prompts -> PEFT adapter folder, for a trained generator or a retrieval index; returns the provenance.

    ``out_dir`` must be new or empty, or (with ``overwrite``) an adapter folder this function wrote.
    """
    gen_dir = Path(gen_dir)
    if not prompts:
        raise GeneratorError("no prompts given")
    protected = _keep_out(gen_dir)
    claim_output_dir(out_dir, "adapter", overwrite=overwrite, protected=protected)  # before any work
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    encoder = encoder or PromptEncoder()
    t0 = time.perf_counter()
    if is_retrieval(gen_dir):
        task, src = retrieve(gen_dir, prompts, encoder)
        seconds = time.perf_counter() - t0
        prov = {
            "generator": str(gen_dir),
            "kind": "retrieval",
            "retrieved_task": task,
            "prompts_sha256": digest,
            "n_prompts_given": len(prompts),
            "seed": seed,
            "generation_seconds": seconds,
        }
        config, tensors = read_adapter(src)
        write_adapter(out_dir, tensors, config, prov, overwrite, protected)
        return prov
    gen = load_generator(gen_dir)
    t0 = time.perf_counter()
    tensors = generate_tensors(gen, encoder, prompts, seed)
    seconds = time.perf_counter() - t0
    prov = {
        "generator": str(gen_dir),
        "kind": "generator",
        "variant": gen.card.variant,
        "prompts_sha256": digest,
        "n_prompts_given": len(prompts),
        "n_prompts_used": gen.card.n_prompts,
        "seed": seed,
        "generation_seconds": seconds,
        "base_model": gen.card.adapter_config["base_model_name_or_path"],
    }
    write_adapter(out_dir, tensors, gen.card.adapter_config, prov, overwrite, protected)
    return prov
