"""Choosing the generator's configuration on validation, before any test item is scored.

Each candidate (a list of ``generator.*`` overrides) is trained on the training tasks of one cross-validation
fold with validation on (``generator.val_every``): draws of every training task's validation-split prompts,
never trained on, against the task's mean target. Candidates are ranked by a criterion of ``CRITERIA``: that
validation loss, or behaviour (accuracy on the training tasks' validation items), the only fair comparison
between candidates whose targets differ. Test items and held-out tasks are never read.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltalora.config import Preset
from deltalora.data.items import stable_seed
from deltalora.data.registry import TaskSpec
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.device import runtime
from deltalora.errors import ConfigError
from deltalora.experiments.cv import family_folds
from deltalora.experiments.results import loss_curves
from deltalora.generator.artifact import GeneratorCard, load_generator
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.generate import generate_tensors
from deltalora.generator.train import train_generator
from deltalora.lm.evaluate import hits
from deltalora.lm.models import load_base
from deltalora.outputs import own_dir
from deltalora.presets import apply_overrides
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import AdapterSwapper
from deltalora.zoo.manifest import Manifest
from deltalora.zoo.summary import zoo_summary


@dataclass(frozen=True)
class Criterion:
    """How candidates are ranked."""

    key: str
    """The candidate row's field compared."""
    best: Callable
    """min or max."""
    needs_scoring: bool
    """True when the field is measured through the base model after training (costs evaluations)."""


CRITERIA: dict[str, Criterion] = {
    # token MSE to each task's mean target: only comparable between candidates with the same targets
    "loss": Criterion("val_loss", min, False),
    # accuracy of adapters generated from train-split prompts, on the training tasks' validation items
    "accuracy": Criterion("val_acc", max, True),
}
"""Selection criteria by name (``deltalora select --by``)."""


def select_generator(
    preset: Preset,
    ws: Workspace,
    domains: dict[str, str],
    candidates: list[list[str]],
    fold: int = 0,
    by: str = "loss",
    n_val: int = 50,
    extra: list[TaskSpec] | None = None,
    progress: bool = True,
) -> dict:
    """Train every candidate on the training tasks of cross-validation fold ``fold`` (``experiment.folds``,
    ``fold_seed``) and rank them by ``CRITERIA[by]`` (accuracy on up to ``n_val`` validation items per training
    task); each generator is kept under ``<workspace>/experiments/selection/`` and reused when it is there."""
    if by not in CRITERIA:
        raise ConfigError(f"--by must be one of {', '.join(CRITERIA)}, got {by!r}")
    crit = CRITERIA[by]
    ex = preset.experiment
    if ex.folds < 2:
        raise ConfigError("selection trains on one cross-validation fold: set experiment.folds >= 2")
    if not 0 <= fold < ex.folds:
        raise ConfigError(f"--fold must be in [0, {ex.folds - 1}], got {fold}")
    own_dir(ws.experiments, "experiment")  # the experiments' folder: a folder deltalora did not write is refused
    held = family_folds({t: domains[t] for t in preset.pool}, ex.folds, ex.fold_seed)[fold]
    train = [t for t in preset.pool if t not in held]
    resolved = {}
    for changes in candidates:
        p = apply_overrides(preset, [f"generator.steps={ex.steps}", *changes])
        if not p.generator.val_every:
            p = apply_overrides(p, [f"generator.val_every={max(1, ex.steps // 20)}"])
        resolved[" ".join(changes) or "(preset)"] = (changes, p)
    targets = {p.generator.checkpoints_per_run for _, p in resolved.values()}
    if by == "loss" and len(targets) > 1:
        raise ConfigError(
            "candidates train on different targets (generator.checkpoints_per_run): their validation losses are "
            "not comparable; rank them with --by accuracy"
        )
    rows = {}
    for name, (changes, p) in resolved.items():
        key = json.dumps({"changes": changes, "steps": p.generator.steps, "train": train}, sort_keys=True)
        out = ws.experiments / "selection" / hashlib.sha256(key.encode()).hexdigest()[:16]
        t0 = time.perf_counter()
        if not (out / "config.json").exists():
            train_generator(p, ws, out, train, progress=progress)
        card = GeneratorCard.from_file(out / "config.json")
        rows[name] = {
            "changes": changes,
            "folder": str(out),
            "val_loss": card.val_loss,
            "best_step": card.best_step,
            "steps": card.steps_done,
            "train_seconds": round(card.train_seconds, 1),
            "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
            "val_curve": loss_curves(out / "log.jsonl")["val_loss"],
        }
    reference = {}
    if crit.needs_scoring:
        accuracy = seen_val_accuracy(
            preset, ws, [Path(r["folder"]) for r in rows.values()], train, n_val, extra, progress
        )
        own = {r["task"]: r for r in zoo_summary(preset, ws, extra) if r["task"] in train}
        # the zoo scored every validation item: the same items only when n_val covers them all
        if all(r["n_val"] <= n_val for r in own.values()):
            reference = {t: own[t]["lora_val_acc"] for t in train}
        for r, acc in zip(rows.values(), accuracy):
            r["val_acc"], r["val_acc_per_task"] = statistics.fmean(acc.values()), acc
            if reference:
                r["val_acc_over_oracle"] = r["val_acc"] / statistics.fmean(reference.values())
    best = crit.best(rows, key=lambda k: rows[k][crit.key])
    return {
        "preset": preset.name,
        "fold": fold,
        "by": by,
        "train_tasks": train,
        "held_out_not_read": list(held),
        "candidates": rows,
        "chosen": best,
        **(
            {"oracle_val_acc": statistics.fmean(reference.values()), "oracle_val_acc_per_task": reference}
            if reference
            else {}
        ),
    }


@torch.inference_mode()
def seen_val_accuracy(
    preset: Preset,
    ws: Workspace,
    gen_dirs: list[Path],
    tasks: list[str],
    n_val: int,
    extra: list[TaskSpec] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Per generator, per training task: accuracy on the task's first ``n_val`` validation items of the adapter
    generated from a seeded draw of its train-split prompts (the prompts a seen task is conditioned on in
    cross-validation; validation items are never trained on, so no scored item conditions)."""
    device = runtime(preset.runtime).device
    base, tok = load_base(preset.base, device)
    first = Manifest.from_file(ws.manifest).finals()[0]
    swapper = AdapterSwapper.like(base, ws.zoo / first.path, preset.base)
    encoder = PromptEncoder(ws.prompt_cache, device=device)
    loaded = [load_task(resolve_spec(t, extra), preset.tasks) for t in tasks]
    no_val = [t.name for t in loaded if not t.val]
    if no_val:
        raise ConfigError(f"--by accuracy scores validation items, but {no_val[0]} has none: set tasks.n_val > 0")
    out: list[dict[str, float]] = []
    bar = tqdm(total=len(gen_dirs) * len(loaded), desc="validation accuracy", unit="task", disable=not progress)
    try:
        for gen_dir in gen_dirs:
            gen = load_generator(gen_dir, device)
            row = {}
            for task in loaded:
                bar.update()
                prompts = [it.prompt for it in task.train]
                swapper.set_tensors(generate_tensors(gen, encoder, prompts, stable_seed(task.name, 0)))
                h = hits(swapper.model, tok, task.val[:n_val], preset.zoo.eval_batch_size, preset.zoo.max_length)
                row[task.name] = statistics.fmean(h)
            out.append(row)
    finally:
        bar.close()
        swapper.unload()
    return out


def read_candidates(text: list[str]) -> list[list[str]]:
    """``--candidate "generator.head=conv generator.lr=3e-3"`` options as lists of overrides."""
    return [c.split() for c in text]
