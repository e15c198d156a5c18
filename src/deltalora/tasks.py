"""Tasks: items, sources (BIG-bench JSON, user JSONL, synthetic), validation and splits.

User JSONL schema, one item per line::

    {"prompt": "Q: 2+2?\\nA:", "choices": ["3", "4"], "answer": "4"}   # multiple choice
    {"prompt": "Plural of cat:", "target": "cats"}                      # exact match

Optional per item: ``"split": "train" | "test"`` pins the item to a split. A user task
is registered with a JSON spec file (``--tasks-file``): a list of
``{"name": ..., "domain": ..., "path": "items.jsonl"}`` (path relative to the spec file).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .bigbench import bigbench_task_json
from .config import TaskConfig
from .registry import BUILTIN, TaskSpec


class TaskError(ValueError):
    """A task source is malformed or unknown; the message names file, item and field."""


@dataclass(frozen=True)
class Item:
    """One scored example: ``choices`` empty means exact match on ``answer``."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()

    @property
    def is_mc(self) -> bool:
        return bool(self.choices)

    def completion(self) -> str:
        """The trained continuation: a leading space keeps BPE word boundaries."""
        return " " + self.answer


@dataclass(frozen=True)
class Task:
    name: str
    domain: str
    kind: str
    train: tuple[Item, ...]
    test: tuple[Item, ...]


def stable_seed(*parts: object) -> int:
    """A seed derived from the parts, stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


# ---------------------------------------------------------------- sources

def _bigbench_items(path: str, kind: str | None, file: Path) -> list[tuple[Item, str | None]]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"{file}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise TaskError(f"{file}: expected a BIG-bench task object with field 'examples'")
    examples = data.get("examples")
    if not isinstance(examples, list) or not examples:
        raise TaskError(f"{file}: field 'examples' must be a non-empty list")
    fields = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: "}
    for key, default in fields.items():
        fields[key] = data.get(key, default)
        if not isinstance(fields[key], str):
            raise TaskError(f"{file}: field {key!r} must be a string")
    append = data.get("append_choices_to_input", True)
    if not isinstance(append, bool):
        raise TaskError(f"{file}: field 'append_choices_to_input' must be true or false")
    kind = kind or ("exact" if data.get("preferred_score") == "exact_str_match" else "mc")
    task_prefix, in_prefix, out_prefix = fields.values()
    if task_prefix and not task_prefix[-1].isspace():
        task_prefix += "\n"
    items = []
    for i, ex in enumerate(examples):
        where = f"{file}: example {i}"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise TaskError(f"{where}: field 'input' must be a string")
        if kind == "mc":
            scores = ex.get("target_scores")
            if not isinstance(scores, dict) or not scores:
                raise TaskError(f"{where}: field 'target_scores' must be a non-empty object for a multiple-choice task")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
                raise TaskError(f"{where}: field 'target_scores' must map each choice to a number")
            if not all(c.strip() for c in scores):
                raise TaskError(f"{where}: field 'target_scores' has an empty choice")
            best = max(scores.values())
            correct = [c for c, v in scores.items() if v == best]
            if len(correct) != 1:
                continue  # several right answers: not a single-answer MC item
            choices = list(scores)
            # BIG-bench often lists the right answer first; shuffle so position teaches nothing.
            random.Random(stable_seed(path, i)).shuffle(choices)
            text = in_prefix + ex["input"]
            if append:
                text += "".join(f"\n  choice: {c}" for c in choices)
            item = Item(prompt=(task_prefix + text + out_prefix).strip(), answer=correct[0], choices=tuple(choices))
        else:
            target = ex.get("target")
            if isinstance(target, list):
                target = target[0] if target else None
            if not isinstance(target, str) or not target.strip():
                raise TaskError(f"{where}: field 'target' must be a non-empty string for an exact-match task")
            item = Item(prompt=(task_prefix + in_prefix + ex["input"] + out_prefix).strip(), answer=target.strip())
        if not item.prompt:
            raise TaskError(f"{where}: empty prompt (field 'input' and the prefixes are all blank)")
        items.append((item, None))
    if not items:
        raise TaskError(f"{file}: no single-answer items")
    return items


def load_jsonl_items(file: Path) -> list[tuple[Item, str | None]]:
    """Items of a user JSONL file, validated; each error names the file, line and field."""
    try:
        lines = Path(file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{file}: cannot read task file ({e})") from e
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}: line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: expected a JSON object with 'prompt' and 'choices'+'answer' or 'target'")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise TaskError(f"{where}: field 'prompt' must be a non-empty string")
        split = obj.get("split")
        if split not in (None, "train", "test"):
            raise TaskError(f"{where}: field 'split' must be 'train' or 'test', got {split!r}")
        if "choices" in obj:
            choices = obj["choices"]
            if not isinstance(choices, list) or not choices:
                raise TaskError(f"{where}: field 'choices' must be a non-empty list of strings")
            if not all(isinstance(c, str) and c.strip() for c in choices):
                raise TaskError(f"{where}: field 'choices' must hold only non-empty strings")
            if len(set(choices)) != len(choices):
                raise TaskError(f"{where}: field 'choices' has duplicates")
            answer = obj.get("answer")
            if answer not in choices:
                raise TaskError(f"{where}: field 'answer' ({answer!r}) must be one of 'choices' {choices}")
            item = Item(prompt=prompt.rstrip(), answer=answer, choices=tuple(choices))
        else:
            target = obj.get("target")
            if not isinstance(target, str) or not target.strip():
                raise TaskError(f"{where}: field 'target' must be a non-empty string (or give 'choices' and 'answer')")
            item = Item(prompt=prompt.rstrip(), answer=target.strip())
        items.append((item, split))
    if not items:
        raise TaskError(f"{file}: no items (expected one JSON object per line)")
    kinds = {it.is_mc for it, _ in items}
    if len(kinds) > 1:
        raise TaskError(f"{file}: mixes multiple-choice and exact-match items; use one kind per task")
    return items


_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "chair", "grape", "house",
          "zebra", "mango", "olive", "queen", "robot", "sugar", "table", "water", "yacht", "bread")


def _synthetic_items(gen: str) -> list[tuple[Item, str | None]]:
    rng = random.Random(stable_seed("synthetic", gen))
    items = []
    for _ in range(96):
        if gen == "add":
            a, b = rng.randrange(20), rng.randrange(20)
            choices = [str(a + b + d) for d in (0, 1, -1, 2)]
            rng.shuffle(choices)
            items.append(Item(f"{a} plus {b} equals", str(a + b), tuple(choices)))
        elif gen == "parity":
            n = rng.randrange(100)
            items.append(Item(f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd", ("even", "odd")))
        elif gen == "copy":
            w = rng.choice(_WORDS) + rng.choice(_WORDS)
            items.append(Item(f"Repeat: {w}\nAnswer:", w))
        elif gen == "first":
            w = rng.choice(_WORDS)
            letters = sorted({w[0], *rng.sample("abcdefghijklmnopqrstuvwxyz", 3)})[:4]
            if w[0] not in letters:
                letters[-1] = w[0]
            items.append(Item(f"First letter of {w}:", w[0], tuple(letters)))
        else:
            raise TaskError(f"unknown synthetic generator {gen!r}; known: add, parity, copy, first")
    return [(it, None) for it in items]


# ---------------------------------------------------------------- registry access

def load_user_specs(spec_file: str | Path) -> list[TaskSpec]:
    """Task specs from a user JSON file: ``[{"name", "domain", "path"}, ...]``."""
    spec_file = Path(spec_file)
    try:
        raw = json.loads(spec_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TaskError(f"{spec_file}: cannot read tasks file ({e})") from e
    if not isinstance(raw, list):
        raise TaskError(f"{spec_file}: expected a JSON list of {{'name', 'domain', 'path'}} objects")
    specs = []
    for i, obj in enumerate(raw):
        for key in ("name", "domain", "path"):
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str) or not obj[key]:
                raise TaskError(f"{spec_file}: entry {i}: field {key!r} must be a non-empty string")
        path = (spec_file.parent / obj["path"]).resolve()
        specs.append(TaskSpec(obj["name"], obj["domain"], f"jsonl:{path}", note=obj.get("note", "")))
    return specs


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
        items = _bigbench_items(ref, spec.kind, bigbench_task_json(ref))
    elif kind == "jsonl":
        items = load_jsonl_items(Path(ref))
    elif kind == "synthetic":
        items = _synthetic_items(ref)
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
    return Task(spec.name, spec.domain, "mc" if unique[0][0].is_mc else "exact", *split_items(spec.name, unique, cfg))


def split_items(name: str, items: list[tuple[Item, str | None]], cfg: TaskConfig) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
    """Deterministic train/test split; items pinned with 'split' keep their side."""
    pinned_train = [it for it, s in items if s == "train"]
    pinned_test = [it for it, s in items if s == "test"]
    free = [it for it, s in items if s is None]
    random.Random(stable_seed(cfg.split_seed, name)).shuffle(free)
    # Pinned items always stay on their side; the caps apply to the free items.
    n_test = max(0, min(cfg.max_test, int(len(items) * cfg.max_test_fraction)) - len(pinned_test))
    test = pinned_test + free[:n_test]
    train = pinned_train + free[n_test:][: max(0, cfg.max_train - len(pinned_train))]
    if not test or not train:
        raise TaskError(f"task {name}: split left {len(train)} train and {len(test)} test items; need both")
    return tuple(train), tuple(test)
