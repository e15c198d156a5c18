"""The reference LoRA zoo: one adapter per (task, seed), K checkpoints each, plus pair adapters.

Layout under ``<workspace>/zoo``::

    config.json                      resolved preset
    adapters/<task>/seed<k>/step<s>/ PEFT adapter folders (written atomically)
    runs/<task>__seed<k>.json        one record per finished run (its presence = done)
    base/<task>.json                 base-model test accuracy, computed once
    manifest.json                    every checkpoint: task, domain, seed, step, loss, ...

A killed build rerun with the same preset skips finished runs and redoes the one it was
in; a run is deterministic in its seed, so the redone checkpoints are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Preset
from .evaluate import accuracy
from .distributed import barrier, init_distributed
from .io import atomic_dir, atomic_write_json, read_json, remove_stale_tmp, sha256_file
from .models import load_base
from .registry import TaskSpec
from .tasks import Task, load_task, resolve_spec
from .training import train_lora


@dataclass(frozen=True)
class Job:
    """One adapter to train: a pool task, or the union of two (``a+b``)."""

    name: str
    domain: str
    seed: int
    tasks: tuple[str, ...]

    @property
    def is_pair(self) -> bool:
        return len(self.tasks) > 1

    @property
    def run_id(self) -> str:
        return f"{self.name}__seed{self.seed}"


def zoo_dir(workspace: str | Path) -> Path:
    return Path(workspace) / "zoo"


def jobs_for(preset: Preset, domains: dict[str, str]) -> list[Job]:
    """Seed-major order, so an interrupted build has covered every task at least once early."""
    jobs = [Job(t, domains[t], s, (t,)) for s in preset.zoo.seeds for t in preset.pool]
    jobs += [Job(f"{a}+{b}", "pair", preset.zoo.seeds[0], (a, b)) for a, b in preset.pairs]
    return jobs


def load_pool(preset: Preset, extra: list[TaskSpec] | None = None) -> dict[str, Task]:
    return {name: load_task(resolve_spec(name, extra), preset.tasks) for name in preset.pool}


def build_zoo(preset: Preset, workspace: str | Path, extra: list[TaskSpec] | None = None) -> list[dict]:
    """Train every missing adapter of the zoo; returns the manifest (all checkpoints).

    Under torchrun / accelerate launch, adapters and base evaluations are sharded by rank;
    each job is deterministic in its seed, so the union equals a single-process build.
    """
    info = init_distributed()
    root = zoo_dir(workspace)
    _check_same_preset(root, preset)
    tasks = load_pool(preset, extra)
    if info.is_main:  # no rank writes before the barrier below
        for sub in (root, root / "runs", root / "base"):
            remove_stale_tmp(sub)
    barrier()  # every rank has checked the old config before rank 0 replaces it
    if info.is_main:
        atomic_write_json(root / "config.json", preset.to_dict())
    jobs = info.shard(jobs_for(preset, {n: t.domain for n, t in tasks.items()}))
    todo = [j for j in jobs if not (root / "runs" / f"{j.run_id}.json").exists()]
    my_tasks = {n: tasks[n] for n in info.shard(list(tasks))}
    if todo or any(not (root / "base" / f"{n}.json").exists() for n in my_tasks):
        base, tok = load_base(preset.base)
        for name, task in tqdm(my_tasks.items(), desc="base accuracy", unit="task", leave=False):
            if not (root / "base" / f"{name}.json").exists():
                t0 = time.perf_counter()
                acc = accuracy(base, tok, task.test, preset.zoo.eval_batch_size, preset.zoo.max_length)
                atomic_write_json(root / "base" / f"{name}.json",
                                  {"task": name, "base_acc": acc, "n_test": len(task.test), "seconds": time.perf_counter() - t0})
        for job in tqdm(todo, desc=f"zoo (rank {info.rank})" if info.world > 1 else "zoo", unit="adapter"):
            _run_job(job, preset, tasks, base, tok, root)
    barrier()
    if info.is_main:
        write_manifest(root)
    barrier()
    return read_json(root / "manifest.json", "zoo manifest")


# same loss and gradients whatever their value (tested), so a zoo may resume under new ones
_SPEED_ONLY = ("micro_batch", "min_shared_prefix", "eval_batch_size")


def _check_same_preset(root: Path, preset: Preset) -> None:
    """Resuming with different hyper-parameters would mix incompatible adapters in one zoo.

    Adding seeds or tasks only adds runs, so ``zoo.seeds`` (and the pool) may change, and so
    may the fields that set speed but not the adapters (``_SPEED_ONLY``).
    """
    f = root / "config.json"
    if f.exists():
        old = read_json(f, "zoo config")
        new = _jsonable(preset.to_dict())
        for key in ("base", "tasks", "zoo"):
            a, b = dict(old.get(key) or {}) if key != "base" else old.get(key), new[key]
            if key == "zoo":
                a = {k: v for k, v in a.items() if k not in ("seeds", *_SPEED_ONLY)}
                b = {k: v for k, v in b.items() if k not in ("seeds", *_SPEED_ONLY)}
            if a != b:
                raise ValueError(f"{f}: zoo was built with a different {key!r} config; use a new workspace or the same preset")


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def _run_job(job: Job, preset: Preset, tasks: dict[str, Task], base: torch.nn.Module, tok, root: Path) -> None:
    items = [it for t in job.tasks for it in tasks[t].train]
    steps = preset.zoo.pair_steps if job.is_pair else preset.zoo.steps
    ckpts: list[dict] = []
    scores: dict[str, float] = {}
    eval_seconds = 0.0
    t0 = time.perf_counter()

    def save(model, step: int, loss: float) -> None:
        rel = Path("adapters") / job.name / f"seed{job.seed}" / f"step{step:05d}"
        with atomic_dir(root / rel) as tmp:
            model.save_pretrained(tmp, save_embedding_layers=False)  # "auto" would query the Hub
            digest = sha256_file(tmp / "adapter_model.safetensors")
        ckpts.append({"task": job.name, "domain": job.domain, "seed": job.seed, "step": step, "loss": loss,
                      "path": str(rel), "sha256": digest, "final": step == steps,
                      "pair_of": list(job.tasks) if job.is_pair else None})
        if step == steps:
            nonlocal eval_seconds
            t_eval = time.perf_counter()
            for t in job.tasks:
                scores[t] = accuracy(model, tok, tasks[t].test, preset.zoo.eval_batch_size, preset.zoo.max_length)
            eval_seconds = time.perf_counter() - t_eval

    remove_stale_tmp(root / "adapters" / job.name / f"seed{job.seed}")  # this run's own folder: no other rank writes here
    result = train_lora(base, tok, items, preset.zoo, steps, job.seed, job.run_id, save)
    ckpts[-1]["test_acc"] = scores[job.tasks[0]] if not job.is_pair else scores
    atomic_write_json(root / "runs" / f"{job.run_id}.json", {
        "task": job.name, "domain": job.domain, "seed": job.seed, "tasks": list(job.tasks), "steps": steps,
        "n_train": len(items), "test_acc": scores, "train_seconds": result.seconds - eval_seconds, "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - t0, "losses": result.losses, "checkpoints": ckpts,
    })


def write_manifest(root: Path) -> list[dict]:
    """Gather every finished run's checkpoints into ``manifest.json``."""
    manifest = [c for f in sorted((root / "runs").glob("*.json")) for c in read_json(f, "zoo run record")["checkpoints"]]
    atomic_write_json(root / "manifest.json", manifest)
    return manifest


def zoo_summary(preset: Preset, workspace: str | Path, extra: list[TaskSpec] | None = None) -> list[dict]:
    """One record per task: sizes, base and LoRA test accuracy (mean over seeds), train time."""
    root = zoo_dir(workspace)
    rows = []
    for name in preset.pool:
        base_f = root / "base" / f"{name}.json"
        runs = [read_json(f, "zoo run record") for f in sorted((root / "runs").glob(f"{name}__seed*.json"))]
        if not base_f.exists() or not runs:
            continue
        task = load_task(resolve_spec(name, extra), preset.tasks)
        accs = [r["test_acc"][name] for r in runs]
        base_acc = read_json(base_f, "base accuracy")["base_acc"]
        lora_acc = sum(accs) / len(accs)
        rows.append({
            "task": name, "domain": task.domain, "kind": task.kind, "n_train": len(task.train), "n_test": len(task.test),
            "base_acc": round(base_acc, 4), "lora_acc": round(lora_acc, 4), "lora_acc_per_seed": [round(a, 4) for a in accs],
            "gain": round(lora_acc - base_acc, 4),
            "train_seconds": round(sum(r["train_seconds"] for r in runs) / len(runs), 1),
            "wall_seconds_all_seeds": round(sum(r["wall_seconds"] for r in runs), 1),
        })
    return rows
