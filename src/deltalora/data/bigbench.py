"""BIG-bench task JSON, extracted from the ``bigbench==1.0.0`` sdist and cached.

Only the ``task.json`` files asked for are extracted; the package itself is never
installed (its dependencies are heavy and unneeded). ``$DELTALORA_BIGBENCH_SDIST`` may
point at an already downloaded tarball.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from pathlib import Path

from deltalora.data.items import Item, stable_seed
from deltalora.errors import TaskError
from deltalora.io import atomic_write_bytes
from deltalora.offline import cache_dir, pypi_distribution

REQUIREMENT = "bigbench==1.0.0"
TASKS_DIR = "/bigbench/benchmark_tasks/"
"""The folder of the sdist that holds one folder per task (``<family>/<subtask>/task.json``)."""


def sdist_path() -> Path:
    """The ``bigbench`` sdist: ``$DELTALORA_BIGBENCH_SDIST``, or downloaded once into the cache."""
    env = os.environ.get("DELTALORA_BIGBENCH_SDIST")
    return Path(env) if env else pypi_distribution(REQUIREMENT, sdist=True)


def bigbench_task_json(task_path: str) -> Path:
    """Cached ``task.json`` of a BIG-bench task such as ``arithmetic/2_digit_addition``."""
    target = cache_dir() / "bigbench" / task_path / "task.json"
    if not target.exists():
        extract_bigbench([task_path])
    return target


def extract_bigbench(task_paths: list[str]) -> None:
    """Extract the given tasks' JSON from the sdist in one pass over the archive."""
    root = cache_dir() / "bigbench"
    wanted = {p for p in task_paths if not (root / p / "task.json").exists()}
    if not wanted:
        return
    with tarfile.open(sdist_path()) as tf:
        for member in tf:
            if not member.isfile() or TASKS_DIR not in member.name or not member.name.endswith("/task.json"):
                continue
            rel = member.name.split(TASKS_DIR, 1)[1][: -len("/task.json")]
            if rel in wanted:
                atomic_write_bytes(root / rel / "task.json", tf.extractfile(member).read())
                wanted.discard(rel)
                if not wanted:
                    break
    if wanted:
        raise TaskError(f"BIG-bench sdist {REQUIREMENT} has no task(s): {', '.join(sorted(wanted))}")


def bigbench_items(path: str, kind: str | None, file: Path) -> list[tuple[Item, str | None]]:
    """Items of a BIG-bench ``task.json`` (MC by target scores, or exact match), validated.

    Errors name the file and the example.
    """
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
