"""BIG-bench task JSON, extracted from the ``bigbench==1.0.0`` sdist and cached.

Only the ``task.json`` files asked for are extracted; the package itself is never
installed (its dependencies are heavy and unneeded). ``$DELTALORA_BIGBENCH_SDIST`` may
point at an already downloaded tarball.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from .io import atomic_write_bytes
from .offline import cache_dir, pypi_distribution

REQUIREMENT = "bigbench==1.0.0"
_MARKER = "/bigbench/benchmark_tasks/"


def _sdist() -> Path:
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
    with tarfile.open(_sdist()) as tf:
        for member in tf:
            if not member.isfile() or _MARKER not in member.name or not member.name.endswith("/task.json"):
                continue
            rel = member.name.split(_MARKER, 1)[1][: -len("/task.json")]
            if rel in wanted:
                atomic_write_bytes(root / rel / "task.json", tf.extractfile(member).read())
                wanted.discard(rel)
                if not wanted:
                    break
    if wanted:
        from .tasks import TaskError

        raise TaskError(f"BIG-bench sdist {REQUIREMENT} has no task(s): {', '.join(sorted(wanted))}")
