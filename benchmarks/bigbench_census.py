"""Census of BIG-bench task families: distinct single-answer items per subtask, parsed as deltalora parses them.

    python benchmarks/bigbench_census.py [--min-items 200] [--out results/bigbench_census.json]

Reads every ``task.json`` of the ``bigbench==1.0.0`` sdist (downloaded once into deltalora's cache, or
``$DELTALORA_BIGBENCH_SDIST``) with ``deltalora.data.bigbench.bigbench_items`` under each task's own preferred
metric, counts distinct prompts, and lists the families (top-level task folders) with at least four subtasks
of ``--min-items`` items: 200 leaves room for 100 train and 100 test items under ``tasks.max_test_fraction``.
This is the candidate list a families zoo draws from; whether a LoRA moves a task is measured by the zoo build.
"""

from __future__ import annotations

import argparse
import collections
import tarfile
import tempfile
from pathlib import Path

from deltalora.data.bigbench import TASKS_DIR, bigbench_items, sdist_path
from deltalora.errors import TaskError
from deltalora.io import atomic_write_json


def census() -> list[dict]:
    """One row per task file: path, distinct single-answer items, kind (or the parse error)."""
    rows = []
    with tarfile.open(sdist_path()) as tf, tempfile.TemporaryDirectory() as tmp:
        for member in tf:
            if not member.isfile() or TASKS_DIR not in member.name or not member.name.endswith("/task.json"):
                continue
            rel = member.name.split(TASKS_DIR, 1)[1][: -len("/task.json")]
            f = Path(tmp) / "task.json"
            f.write_bytes(tf.extractfile(member).read())
            try:
                items = bigbench_items(rel, None, f)
            except TaskError as e:
                rows.append({"task": rel, "items": 0, "kind": None, "error": str(e).split(": ", 1)[-1][:120]})
                continue
            kind = "mc" if items[0][0].is_mc else "exact"
            rows.append({"task": rel, "items": len({it.prompt for it, _ in items}), "kind": kind})
    return sorted(rows, key=lambda r: r["task"])


def families(rows: list[dict], min_items: int, min_tasks: int = 4) -> dict[str, list[dict]]:
    """Families with at least ``min_tasks`` subtasks of ``min_items`` items, largest first."""
    fam: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        if "/" in r["task"] and r["items"] >= min_items:
            fam[r["task"].split("/", 1)[0]].append(r)
    return dict(sorted(((f, ts) for f, ts in fam.items() if len(ts) >= min_tasks), key=lambda kv: -len(kv[1])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-items", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("results/bigbench_census.json"))
    args = ap.parse_args()
    rows = census()
    fams = families(rows, args.min_items)
    atomic_write_json(
        args.out,
        {
            "sdist": "bigbench==1.0.0",
            "min_items": args.min_items,
            "n_task_files": len(rows),
            "families": {f: [r["task"] for r in ts] for f, ts in fams.items()},
            "tasks": rows,
        },
    )
    for f, ts in fams.items():
        kinds = collections.Counter(r["kind"] for r in ts)
        print(f"{f:32s} {len(ts):4d} subtasks  {dict(kinds)}")
    print(f"{len(fams)} families, {sum(map(len, fams.values()))} subtasks; {len(rows)} task files -> {args.out}")


if __name__ == "__main__":
    main()
