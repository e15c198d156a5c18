"""Retrieval baseline: return the zoo adapter whose task's mean prompt embedding is nearest.

The index folder is self-contained: each training task's mean train-prompt embedding and
a copy of its reference adapter (final checkpoint of the first seed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltalora.config import Preset
from deltalora.data.registry import TaskSpec
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.device import runtime
from deltalora.errors import ArtifactError
from deltalora.generator.encoder import PromptEncoder
from deltalora.io import atomic_write_json, read_json
from deltalora.outputs import atomic_dir, claim_output_dir
from deltalora.workspace import Workspace
from deltalora.zoo.manifest import Manifest

RETRIEVAL = "retrieval"
"""The name the CLI and the experiment grid give this baseline, beside the generator variants."""


def is_retrieval(folder: Path) -> bool:
    """True for a folder written by ``build_retrieval``."""
    f = Path(folder) / "config.json"
    return f.exists() and read_json(f).get("kind") == RETRIEVAL


def index_tasks(folder: Path) -> list[str]:
    """The training tasks a retrieval index was built over."""
    return read_json(Path(folder) / "config.json", "retrieval index")["tasks"]


def index_base(folder: Path) -> str:
    """The base model (as deltalora names it) of the zoo a retrieval index was built from."""
    return Preset.from_dict(read_json(Path(folder) / "config.json", "retrieval index")["preset"]).base


def build_retrieval(
    preset: Preset,
    ws: Workspace,
    out_dir: str | Path,
    train_tasks: list[str],
    extra: list[TaskSpec] | None = None,
    encoder: PromptEncoder | None = None,
    overwrite: bool = False,
) -> Path:
    """Index the training tasks' final adapters (first zoo seed) by their mean train-prompt embedding.

    ``out_dir`` must be new or empty, or (with ``overwrite``) an index of ours.
    """
    claim_output_dir(out_dir, RETRIEVAL, overwrite=overwrite, protected=ws.protected)  # before any work
    seed = preset.zoo.seeds[0]
    finals = {c.task: c.path for c in Manifest.from_file(ws.manifest).finals(seed=seed)}
    missing = [t for t in train_tasks if t not in finals]
    if missing:
        raise ArtifactError(f"{ws.manifest}: no final checkpoint (seed {seed}) for {missing}")
    encoder = encoder or PromptEncoder(ws.prompt_cache, device=runtime(preset.runtime).device)
    means = {
        t: encoder.encode([it.prompt for it in load_task(resolve_spec(t, extra), preset.tasks).train]).mean(0)
        for t in train_tasks
    }
    encoder.save()
    with atomic_dir(out_dir, RETRIEVAL, overwrite=overwrite, protected=ws.protected) as tmp:
        for t in train_tasks:
            shutil.copytree(ws.zoo / finals[t], tmp / "adapters" / t)
        save_file({t: m.contiguous() for t, m in means.items()}, tmp / "means.safetensors")
        atomic_write_json(
            tmp / "config.json",
            {"kind": RETRIEVAL, "tasks": train_tasks, "preset": preset.to_dict(), "workspace": str(ws.root)},
        )
    return Path(out_dir)


def neighbours(index_dir: str | Path, prompts: list[str], encoder: PromptEncoder) -> list[tuple[str, float]]:
    """Every indexed task with the cosine between its mean prompt embedding and the prompts', nearest first
    (ties keep the index's task order)."""
    means = load_file(Path(index_dir) / "means.safetensors")
    tasks = list(means)
    q = encoder.encode(prompts).mean(0)
    sims = torch.nn.functional.cosine_similarity(torch.stack([means[t] for t in tasks]), q[None], dim=1)
    order = sorted(range(len(tasks)), key=lambda i: -float(sims[i]))
    return [(tasks[i], float(sims[i])) for i in order]


def adapter_folder(index_dir: str | Path, task: str) -> Path:
    """The copy of a task's reference adapter inside an index."""
    return Path(index_dir) / "adapters" / task


def retrieve(index_dir: str | Path, prompts: list[str], encoder: PromptEncoder) -> tuple[str, Path]:
    """The nearest task (cosine of mean prompt embeddings) and its adapter folder."""
    best = neighbours(index_dir, prompts, encoder)[0][0]
    return best, adapter_folder(index_dir, best)
