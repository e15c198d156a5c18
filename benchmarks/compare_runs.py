"""Compare two tiny-preset runs file by file: the check that a refactor changed no behaviour.

Capture a run on each commit (same machine, same thread count), then compare::

    out=/tmp/run_a; mkdir -p $out && cd $out
    OMP_NUM_THREADS=1 deltalora run --preset tiny --workspace ws --results-dir results --docs-dir docs
    OMP_NUM_THREADS=1 deltalora experiment --preset tiny --workspace ws --results-dir results/exp
    deltalora report results/exp --out docs/report.md
    # ... the same into /tmp/run_b on the other commit, then:
    python benchmarks/compare_runs.py /tmp/run_a /tmp/run_b

Binary files (adapters, δ, generator weights) must be byte-equal; JSON and JSONL files are compared
after dropping timing fields (names containing "seconds" or "time") and format-version envelopes
("version", "format"); everything else byte for byte. Prints the files that differ; exit code 1 if any.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TIMING = re.compile(r"seconds|time")
ENVELOPE = {"version", "format"}
SKIP_SUFFIXES = {".lock", ".err", ".out"}


def normalised(x):
    """JSON content without timings and version envelopes (a versioned manifest becomes its checkpoint list)."""
    if isinstance(x, dict):
        if {"format", "checkpoints"} <= set(x):
            return normalised(x["checkpoints"])
        return {k: normalised(v) for k, v in x.items() if not TIMING.search(k) and k not in ENVELOPE}
    if isinstance(x, list):
        return [normalised(v) for v in x]
    return x


def same(a: Path, b: Path) -> bool:
    x, y = a.read_bytes(), b.read_bytes()
    if x == y:
        return True
    if a.suffix == ".json":
        return normalised(json.loads(x)) == normalised(json.loads(y))
    if a.suffix == ".jsonl":
        return [normalised(json.loads(ln)) for ln in x.splitlines()] == [
            normalised(json.loads(ln)) for ln in y.splitlines()
        ]
    return False


def main(a: str, b: str) -> int:
    ra, rb = Path(a), Path(b)
    files = {p.relative_to(ra) for p in ra.rglob("*") if p.is_file() and p.suffix not in SKIP_SUFFIXES}
    other = {p.relative_to(rb) for p in rb.rglob("*") if p.is_file() and p.suffix not in SKIP_SUFFIXES}
    differ = sorted(str(p) for p in files & other if p.name != "train_state.pt" and not same(ra / p, rb / p))
    only = sorted(str(p) for p in files ^ other)
    print(f"{len(files & other)} files in both; {len(differ)} differ; {len(only)} in one run only")
    for p in differ:
        print("  differs:", p)
    for p in only:
        print("  in one only:", p)
    return 1 if differ or only else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
