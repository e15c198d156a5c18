"""User tasks: JSONL item files and the JSON spec file that registers them.

One item per line::

    {"prompt": "Q: 2+2?\\nA:", "choices": ["3", "4"], "answer": "4"}   # multiple choice
    {"prompt": "Plural of cat:", "target": "cats"}                      # exact match

Optional per item: ``"split": "train" | "test"`` pins the item to a split. A user task
is registered with a JSON spec file (``--tasks-file``): a list of
``{"name": ..., "domain": ..., "path": "items.jsonl"}`` (path relative to the spec file).
"""

from __future__ import annotations

import json
from pathlib import Path

from deltalora.data.items import Item
from deltalora.data.registry import TaskSpec
from deltalora.errors import TaskError


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
