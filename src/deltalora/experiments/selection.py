"""Choosing the generator's configuration on validation, before any test item is scored.

Each candidate (a list of ``generator.*`` overrides) is trained on the training tasks of one cross-validation
fold with validation on (``generator.val_every``): draws of every training task's validation-split prompts,
never trained on, against the task's mean checkpoint. The candidate with the lowest best validation loss wins.
Test items and held-out tasks are never read.
"""

from __future__ import annotations

import hashlib
import json
import time

from deltalora.config import Preset
from deltalora.errors import ConfigError
from deltalora.experiments.cv import family_folds
from deltalora.experiments.results import loss_curves
from deltalora.generator.artifact import GeneratorCard
from deltalora.generator.train import train_generator
from deltalora.outputs import own_dir
from deltalora.presets import apply_overrides
from deltalora.workspace import Workspace


def select_generator(
    preset: Preset,
    ws: Workspace,
    domains: dict[str, str],
    candidates: list[list[str]],
    fold: int = 0,
    progress: bool = True,
) -> dict:
    """Train every candidate on the training tasks of cross-validation fold ``fold`` (``experiment.folds``,
    ``fold_seed``) and compare them by validation loss; each generator is kept under
    ``<workspace>/experiments/selection/`` and reused when it is there."""
    ex = preset.experiment
    if ex.folds < 2:
        raise ConfigError("selection trains on one cross-validation fold: set experiment.folds >= 2")
    if not 0 <= fold < ex.folds:
        raise ConfigError(f"--fold must be in [0, {ex.folds - 1}], got {fold}")
    own_dir(ws.experiments, "experiment")  # the experiments' folder: a folder deltalora did not write is refused
    held = family_folds({t: domains[t] for t in preset.pool}, ex.folds, ex.fold_seed)[fold]
    train = [t for t in preset.pool if t not in held]
    rows = {}
    for changes in candidates:
        p = apply_overrides(preset, [f"generator.steps={ex.steps}", *changes])
        if not p.generator.val_every:
            p = apply_overrides(p, [f"generator.val_every={max(1, ex.steps // 20)}"])
        key = json.dumps({"changes": changes, "steps": p.generator.steps, "train": train}, sort_keys=True)
        out = ws.experiments / "selection" / hashlib.sha256(key.encode()).hexdigest()[:16]
        t0 = time.perf_counter()
        if not (out / "config.json").exists():
            train_generator(p, ws, out, train, progress=progress)
        card = GeneratorCard.from_file(out / "config.json")
        rows[" ".join(changes) or "(preset)"] = {
            "changes": changes,
            "folder": str(out),
            "val_loss": card.val_loss,
            "best_step": card.best_step,
            "steps": card.steps_done,
            "train_seconds": round(card.train_seconds, 1),
            "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
            "val_curve": loss_curves(out / "log.jsonl")["val_loss"],
        }
    best = min(rows, key=lambda k: rows[k]["val_loss"])
    return {
        "preset": preset.name,
        "fold": fold,
        "train_tasks": train,
        "held_out_not_read": list(held),
        "candidates": rows,
        "chosen": best,
    }


def read_candidates(text: list[str]) -> list[list[str]]:
    """``--candidate "generator.head=conv generator.lr=3e-3"`` options as lists of overrides."""
    return [c.split() for c in text]
