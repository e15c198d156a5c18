"""Loading a task by name: its source, validation, de-duplication and the deterministic train/test split."""

from __future__ import annotations

import random
from pathlib import Path

from deltalora.config import Preset, TaskConfig
from deltalora.data.bigbench import bigbench_items, bigbench_task_json
from deltalora.data.items import Item, Task, stable_seed
from deltalora.data.jsonl import load_jsonl_items
from deltalora.data.registry import BUILTIN, TaskSpec
from deltalora.data.synthetic import synthetic_items
from deltalora.errors import TaskError


def resolve_spec(name: str, extra: list[TaskSpec] | None = None) -> TaskSpec:
    """The spec for a task name, or an error listing the known names."""
    known = dict(BUILTIN)
    known.update({s.name: s for s in extra or []})
    if name not in known:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(known))}")
    return known[name]


def load_task(spec: TaskSpec, cfg: TaskConfig) -> Task:
    """Load, validate, deduplicate and split a task deterministically."""
    kind, _, ref = spec.source.partition(":")
    if kind == "bigbench":
        items = bigbench_items(ref, spec.kind, bigbench_task_json(ref))
    elif kind == "jsonl":
        items = load_jsonl_items(Path(ref))
    elif kind == "synthetic":
        items = synthetic_items(ref)
    else:
        raise TaskError(f"task {spec.name}: source {spec.source!r} must start with bigbench:, jsonl: or synthetic:")
    # Duplicate prompts would let a test item appear in train.
    seen: set[str] = set()
    unique = []
    for it, split in items:
        if it.prompt not in seen:
            seen.add(it.prompt)
            unique.append((it, split))
    if len(unique) < cfg.min_items:
        raise TaskError(f"task {spec.name}: {len(unique)} distinct items, need at least {cfg.min_items}")
    train, val, test = split_items(spec.name, unique, cfg)
    domain = ref.split("/", 1)[0] if cfg.family_domains and kind == "bigbench" else spec.domain
    return Task(spec.name, domain, "mc" if unique[0][0].is_mc else "exact", train, test, val)


def split_items(
    name: str, items: list[tuple[Item, str | None]], cfg: TaskConfig
) -> tuple[tuple[Item, ...], tuple[Item, ...], tuple[Item, ...]]:
    """Deterministic (train, val, test) split; items pinned with 'split' keep their side (validation
    comes from the free items after test, so ``n_val=0`` leaves train as it was)."""
    pinned_train = [it for it, s in items if s == "train"]
    pinned_test = [it for it, s in items if s == "test"]
    free = [it for it, s in items if s is None]
    random.Random(stable_seed(cfg.split_seed, name)).shuffle(free)
    # Pinned items always stay on their side; the caps apply to the free items.
    n_test = max(0, min(cfg.max_test, int(len(items) * cfg.max_test_fraction)) - len(pinned_test))
    test = pinned_test + free[:n_test]
    val = free[n_test : n_test + cfg.n_val]
    train = pinned_train + free[n_test + len(val) :][: max(0, cfg.max_train - len(pinned_train))]
    if len(val) < cfg.n_val:
        raise TaskError(f"task {name}: {len(val)} items left for validation, tasks.n_val asks for {cfg.n_val}")
    if not test or not train:
        raise TaskError(f"task {name}: split left {len(train)} train and {len(test)} test items; need both")
    return tuple(train), tuple(val), tuple(test)


def load_pool(preset: Preset, extra: list[TaskSpec] | None = None) -> dict[str, Task]:
    """Every task of the preset's pool, loaded and split."""
    return {name: load_task(resolve_spec(name, extra), preset.tasks) for name in preset.pool}
