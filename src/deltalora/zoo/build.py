"""Building the reference LoRA zoo: one adapter per (task, seed), K checkpoints each, plus pair adapters.

The layout is the workspace's (``deltalora.workspace``). A killed build rerun with the
same preset skips finished runs and redoes the one it was in; a run is deterministic in
its seed, so the redone checkpoints are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltalora.config import Preset
from deltalora.data.items import Item
from deltalora.data.registry import TaskSpec
from deltalora.data.tasks import Task, load_pool
from deltalora.device import runtime
from deltalora.distributed import barrier, init_distributed
from deltalora.errors import ConfigError
from deltalora.io import atomic_write_json, read_json, remove_stale_tmp, sha256_file
from deltalora.lm.evaluate import hits
from deltalora.lm.models import load_base
from deltalora.outputs import atomic_dir, own_dir
from deltalora.tracking import Curves
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import model_card
from deltalora.zoo.manifest import Checkpoint, Manifest, RunRecord
from deltalora.zoo.training import train_lora


@dataclass(frozen=True)
class Job:
    """One adapter to train: a pool task, or the union of two (``a+b``), on one part of their train splits."""

    name: str
    domain: str
    seed: int
    tasks: tuple[str, ...]
    part: int = 0
    """Which of ``parts`` disjoint slices of the train split it learns from."""
    parts: int = 1

    @property
    def is_pair(self) -> bool:
        """True for an adapter trained on the union of two tasks."""
        return len(self.tasks) > 1

    @property
    def run_id(self) -> str:
        """File-name stem of the run's record."""
        return f"{self.name}__seed{self.seed}" + (f"__part{self.part}" if self.parts > 1 else "")

    @property
    def folder_part(self) -> int | None:
        """The part as the workspace names its folder (None in a zoo of one part)."""
        return self.part if self.parts > 1 else None

    def items(self, tasks: dict[str, Task]) -> list[Item]:
        """The train items of this part (a fixed stride through the already shuffled split: disjoint parts)."""
        return [it for t in self.tasks for it in tasks[t].train[self.part :: self.parts]]


def jobs_for(preset: Preset, domains: dict[str, str]) -> list[Job]:
    """Seed- then part-major order, so an interrupted build has covered every task at least once early.

    Union adapters learn from the first part of each of their two tasks, as the single-task adapters they are
    compared with do.
    """
    n = preset.zoo.parts
    jobs = [Job(t, domains[t], s, (t,), p, n) for s in preset.zoo.seeds for p in range(n) for t in preset.pool]
    jobs += [Job(f"{a}+{b}", "pair", preset.zoo.seeds[0], (a, b), 0, n) for a, b in preset.pairs]
    return jobs


def build_zoo(
    preset: Preset, ws: Workspace, extra: list[TaskSpec] | None = None, tensorboard: Path | None = None
) -> Manifest:
    """Train every missing adapter of the zoo; returns the manifest (all checkpoints).

    Under torchrun / accelerate launch, adapters and base evaluations are sharded by rank;
    each job is deterministic in its seed, so the union equals a single-process build. With
    ``tensorboard``, each run's loss, learning rate and final test accuracy go to ``<dir>/zoo/<run>``.
    Runs on ``preset.runtime``'s device; a zoo may be resumed on another device (the device sets speed only).
    """
    rt = runtime(preset.runtime)
    info = init_distributed(rt.device)
    _check_same_preset(ws, preset)
    tasks = load_pool(preset, extra)
    if info.is_main:  # no rank writes before the barrier below
        own_dir(ws.zoo, "zoo")  # a folder named zoo that deltalora did not write is refused, not filled
        for sub in (ws.zoo, ws.runs, ws.base_evals):
            remove_stale_tmp(sub)
    barrier()  # every rank has checked the old config before rank 0 replaces it
    if info.is_main:
        atomic_write_json(ws.zoo_config, preset.to_dict())
    jobs = info.shard(jobs_for(preset, {n: t.domain for n, t in tasks.items()}))
    todo = [j for j in jobs if not ws.run_record(j.run_id).exists()]
    my_tasks = {n: tasks[n] for n in info.shard(list(tasks))} if preset.zoo.evaluate else {}
    if todo or any(not ws.base_record(n).exists() for n in my_tasks):
        base, tok = load_base(preset.base, rt.device)
        for name, task in tqdm(my_tasks.items(), desc="base accuracy", unit="task", leave=False):
            if not ws.base_record(name).exists():
                t0 = time.perf_counter()
                scored = _score(base, tok, task, preset)
                atomic_write_json(
                    ws.base_record(name),
                    {
                        "task": name,
                        "base_acc": _mean(scored["test"]),
                        "n_test": len(task.test),
                        "base_val_acc": _mean(scored.get("val")),
                        "n_val": len(task.val),
                        "test_hits": scored["test"],
                        "val_hits": scored.get("val", []),
                        "seconds": time.perf_counter() - t0,
                    },
                )
        for job in tqdm(todo, desc=f"zoo (rank {info.rank})" if info.world > 1 else "zoo", unit="adapter"):
            _run_job(job, preset, tasks, base, tok, ws, tensorboard, rt.dtype)
    barrier()
    if info.is_main:
        Manifest.from_runs(ws.runs).to_file(ws.manifest)
    barrier()
    return Manifest.from_file(ws.manifest)


# same adapters whatever their value (speed: same loss and gradients, tested; min_gain: read by the summary
# only), so a zoo may resume under new ones
_SPEED_ONLY = ("micro_batch", "min_shared_prefix", "eval_batch_size", "min_gain")


def _check_same_preset(ws: Workspace, preset: Preset) -> None:
    """Resuming with different hyper-parameters would mix incompatible adapters in one zoo.

    Adding seeds or tasks only adds runs, so ``zoo.seeds`` (and the pool) may change, and so
    may the fields that set speed or selection but not the adapters (``_SPEED_ONLY``).
    """
    f = ws.zoo_config
    if f.exists():
        # read through the config classes, so a field added since (with its default) is no difference
        old = Preset.from_dict(read_json(f, "zoo config")).to_dict()
        new = preset.to_dict()
        for key in ("base", "tasks", "zoo"):
            a, b = old[key], new[key]
            if key == "zoo":
                a = {k: v for k, v in a.items() if k not in ("seeds", *_SPEED_ONLY)}
                b = {k: v for k, v in b.items() if k not in ("seeds", *_SPEED_ONLY)}
            if a != b:
                raise ConfigError(
                    f"{f}: zoo was built with a different {key!r} config; use a new workspace or the same preset"
                )


def _score(model: torch.nn.Module, tok, task: Task, preset: Preset) -> dict[str, list[int]]:
    """0/1 per test item, and per validation item where the task has them (kept for paired intervals)."""
    splits = {"test": task.test, "val": task.val}
    return {
        k: [int(h) for h in hits(model, tok, items, preset.zoo.eval_batch_size, preset.zoo.max_length)]
        for k, items in splits.items()
        if items
    }


def _mean(xs: list[int] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _run_job(
    job: Job,
    preset: Preset,
    tasks: dict[str, Task],
    base: torch.nn.Module,
    tok,
    ws: Workspace,
    tensorboard: Path | None,
    dtype: str,
) -> None:
    items = job.items(tasks)
    steps = preset.zoo.pair_steps if job.is_pair else preset.zoo.steps
    ckpts: list[Checkpoint] = []
    scores: dict[str, float] = {}
    scored: dict[str, dict[str, list[int]]] = {}
    eval_seconds = 0.0
    t0 = time.perf_counter()

    def save(model, step: int, loss: float) -> None:
        nonlocal eval_seconds
        rel = ws.checkpoint(job.name, job.seed, step, job.folder_part)
        with atomic_dir(ws.zoo / rel, "checkpoint", overwrite=True) as tmp:  # a killed run's checkpoint is redone
            model.save_pretrained(tmp, save_embedding_layers=False)  # "auto" would query the Hub
            z = preset.zoo
            about = [
                f"A reference LoRA of the deltalora zoo for the task `{job.name}` ({job.domain}), trained on "
                f"{len(items)} train items with a completion-only loss.",
                "",
                f"- seed {job.seed}, step {step} of {steps}, training loss {loss:.4f}"
                + (f", part {job.part + 1} of {job.parts} of the train split" if job.parts > 1 else ""),
                f"- r={z.rank}, alpha={z.alpha:g}, on {', '.join(z.target_modules)}",
            ]
            (tmp / "README.md").write_text(model_card(preset.base, f"LoRA for `{job.name}`", about))  # PEFT's is empty
            digest = sha256_file(tmp / "adapter_model.safetensors")
        if step == steps and preset.zoo.evaluate:
            t_eval = time.perf_counter()
            for t in job.tasks:
                scored[t] = _score(model, tok, tasks[t], preset)
                scores[t] = _mean(scored[t]["test"])
            eval_seconds = time.perf_counter() - t_eval
        ckpts.append(
            Checkpoint(
                job.name,
                job.domain,
                job.seed,
                step,
                loss,
                str(rel),
                digest,
                final=step == steps,
                part=job.part,
                pair_of=job.tasks if job.is_pair else None,
                test_acc=(scores if job.is_pair else scores[job.tasks[0]]) if scores else None,
            )
        )

    remove_stale_tmp(
        ws.run_adapters(job.name, job.seed, job.folder_part)
    )  # this run's own folder: no other rank writes here
    curves = Curves(tensorboard, f"zoo/{job.run_id}")
    try:
        result = train_lora(base, tok, items, preset.zoo, steps, job.seed, job.run_id, save, curves=curves, dtype=dtype)
        curves.log(steps, **{f"test_acc/{t}": a for t, a in scores.items()})
    finally:
        curves.close()
    RunRecord(
        task=job.name,
        domain=job.domain,
        seed=job.seed,
        tasks=list(job.tasks),
        steps=steps,
        n_train=len(items),
        test_acc=scores,
        val_acc={t: _mean(s.get("val")) for t, s in scored.items() if s.get("val")},
        test_hits={t: s["test"] for t, s in scored.items()},
        part=job.part,
        parts=job.parts,
        train_seconds=result.seconds - eval_seconds,
        eval_seconds=eval_seconds,
        wall_seconds=time.perf_counter() - t0,
        losses=result.losses,
        checkpoints=ckpts,
    ).to_file(ws.run_record(job.run_id))
