"""Retrieval baseline: return the zoo adapter whose task's mean prompt embedding is nearest.

The index folder is self-contained: each training task's mean train-prompt embedding and
a copy of its reference adapter (final checkpoint of the first seed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import Preset
from .encoder import PromptEncoder
from .io import atomic_dir, atomic_write_json, read_json
from .registry import TaskSpec
from .tasks import load_task, resolve_spec
from .zoo import zoo_dir


def is_retrieval(folder: Path) -> bool:
    f = Path(folder) / "config.json"
    return f.exists() and read_json(f).get("kind") == "retrieval"


def build_retrieval(preset: Preset, workspace: str | Path, out_dir: str | Path, train_tasks: list[str],
                    extra: list[TaskSpec] | None = None, encoder: PromptEncoder | None = None) -> Path:
    root = zoo_dir(workspace)
    manifest = read_json(root / "manifest.json", "zoo manifest (run `deltalora zoo build` first)")
    seed = preset.zoo.seeds[0]
    finals = {c["task"]: c["path"] for c in manifest if c["final"] and c["seed"] == seed and not c.get("pair_of")}
    missing = [t for t in train_tasks if t not in finals]
    if missing:
        raise ValueError(f"{root / 'manifest.json'}: no final checkpoint (seed {seed}) for {missing}")
    encoder = encoder or PromptEncoder(Path(workspace) / "cache" / "prompt_embeddings.safetensors")
    means = {t: encoder.encode([it.prompt for it in load_task(resolve_spec(t, extra), preset.tasks).train]).mean(0)
             for t in train_tasks}
    encoder.save()
    with atomic_dir(out_dir) as tmp:
        for t in train_tasks:
            shutil.copytree(root / finals[t], tmp / "adapters" / t)
        save_file({t: m.contiguous() for t, m in means.items()}, tmp / "means.safetensors")
        atomic_write_json(tmp / "config.json", {"kind": "retrieval", "tasks": train_tasks, "preset": preset.to_dict()})
    return Path(out_dir)


def retrieve(index_dir: str | Path, prompts: list[str], encoder: PromptEncoder) -> tuple[str, Path]:
    """The nearest task (cosine of mean prompt embeddings) and its adapter folder."""
    index_dir = Path(index_dir)
    means = load_file(index_dir / "means.safetensors")
    tasks = list(means)
    q = encoder.encode(prompts).mean(0)
    sims = torch.nn.functional.cosine_similarity(torch.stack([means[t] for t in tasks]), q[None], dim=1)
    best = tasks[int(sims.argmax())]
    return best, index_dir / "adapters" / best
