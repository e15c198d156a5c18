"""Multi-task LoRA baseline (Text-to-LoRA's reference): one LoRA trained with the zoo's own recipe
(``zoo.training.train_lora``, the zoo config's rank, alpha, lr and batch) on the union of the training
tasks' train items, once per set of training tasks.

Its items are what a zoo job over those tasks learns from (``zoo.build.Job.items``: the first part of
each train split, as the zoo's pair adapters), so it sees exactly the data the training tasks' reference
adapters, and hence the generators, were built from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from deltalora.config import Preset
from deltalora.data.tasks import Task
from deltalora.device import runtime
from deltalora.io import atomic_write_json
from deltalora.lm.models import load_base
from deltalora.outputs import atomic_dir
from deltalora.zoo.build import Job
from deltalora.zoo.training import train_lora

KIND = "multitask"
"""The output-folder kind of a trained multi-task LoRA."""


def multitask_steps(preset: Preset) -> int:
    """Optimizer steps of the multi-task LoRA: the zoo's steps x ``experiment.multitask_step_factor``."""
    return max(1, round(preset.zoo.steps * preset.experiment.multitask_step_factor))


def multitask_key(preset: Preset, train: tuple[str, ...]) -> str:
    """A hash of everything the adapter depends on: base, task and zoo configs, steps and training tasks."""
    key = {
        "base": preset.base,
        "tasks": dataclasses.asdict(preset.tasks),
        "zoo": dataclasses.asdict(preset.zoo),
        "steps": multitask_steps(preset),
        "train": list(train),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_multitask(preset: Preset, tasks: dict[str, Task], train: tuple[str, ...], out_dir: str | Path) -> Path:
    """Train the multi-task LoRA into ``out_dir`` (a PEFT folder plus ``record.json``), written atomically:
    a killed run leaves no folder and is redone whole (the run is deterministic in the zoo's first seed)."""
    rt = runtime(preset.runtime)
    job = Job(KIND, KIND, preset.zoo.seeds[0], tuple(train), 0, preset.zoo.parts)
    items = job.items(tasks)
    steps = multitask_steps(preset)
    base, tok = load_base(preset.base, rt.device)  # a fresh base: the scorer's is wrapped by its swapper
    with atomic_dir(out_dir, KIND) as tmp:

        def save(model, step: int, loss: float) -> None:
            if step == steps:  # the zoo's recipe keeps K checkpoints; the baseline is the final one
                model.save_pretrained(tmp, save_embedding_layers=False)  # "auto" would query the Hub

        result = train_lora(base, tok, items, preset.zoo, steps, job.seed, job.run_id, save, dtype=rt.dtype)
        atomic_write_json(
            tmp / "record.json",
            {
                "kind": KIND,
                "tasks": list(train),
                "n_train": {t: len(Job(KIND, KIND, job.seed, (t,), 0, job.parts).items(tasks)) for t in train},
                "n_items": len(items),
                "steps": steps,
                "seed": job.seed,
                "train_seconds": result.seconds,
                "losses": result.losses,
            },
        )
    return Path(out_dir)
