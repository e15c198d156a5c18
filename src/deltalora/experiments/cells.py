"""Where each cell's records are kept: whole in the workspace, and compact in the results folder, committed.

A cell's record (one per generator seed, or one for an unseeded cell) holds every adapter's metrics, its per-item
hits and its δ. The workspace keeps it whole; the results folder keeps a compact copy, with δ in float16 beside
the JSON (``cells/<cell id>/``, small enough to commit), so a run on a fresh machine, with no workspace, skips
every cell finished in git and the result files are rebuilt from the committed copies; a run that shares cells
with another run's results folder (``--reuse``) reads that folder's copies too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save

from deltalora.experiments.grid import Cell
from deltalora.io import atomic_write_bytes, atomic_write_json, read_json

_DROPPED = ("delta",)
"""Row fields left out of the committed JSON: δ (hundreds of numbers per adapter) goes beside it in float16."""


def _delta_file(record: Path) -> Path:
    return record.with_suffix(".delta.safetensors")


class CellStore:
    """Records of cells by seed: the workspace's copy when present, else the committed one, else one that another
    run of the same preset committed (``shared``, read only)."""

    def __init__(self, work: Path, committed: Path | None = None, shared: tuple[Path, ...] = ()):
        self.work, self.committed = work, committed
        self.dirs = (work, *([committed] if committed is not None else []), *shared)

    @staticmethod
    def name(seed: int | None) -> str:
        """File name of a seed's record (``all.json`` for a cell run once)."""
        return f"seed{seed}.json" if seed is not None else "all.json"

    def file(self, cell: Cell, seed: int | None) -> Path:
        """The workspace's record of a seed (written by the runner)."""
        return self.work / cell.id / self.name(seed)

    def _found(self, cell: Cell, name: str) -> Path | None:
        return next((d / cell.id / name for d in self.dirs if (d / cell.id / name).exists()), None)

    def done(self, cell: Cell, seed: int | None) -> bool:
        """True if any copy of the seed's record exists."""
        return self._found(cell, self.name(seed)) is not None

    def write(self, cell: Cell, seed: int | None, record: dict) -> None:
        """Write the whole record to the workspace, then its compact copy to the results folder."""
        atomic_write_json(self.file(cell, seed), record)
        if self.committed is not None:
            compact = {
                **record,
                "tasks": {
                    t: [{k: v for k, v in row.items() if k not in _DROPPED} for row in rows]
                    for t, rows in record["tasks"].items()
                },
            }
            f = self.committed_file(cell, seed)
            deltas = {t: [row.get("delta") for row in rows] for t, rows in record["tasks"].items()}
            if all(d is not None for ds in deltas.values() for d in ds):
                self.write_deltas(f, deltas)
            atomic_write_json(f, compact)

    def committed_file(self, cell: Cell, seed: int | None) -> Path:
        """The results folder's compact record of a seed."""
        if self.committed is None:
            raise ValueError("this cell store has no results folder")
        return self.committed / cell.id / self.name(seed)

    @staticmethod
    def has_deltas(f: Path) -> bool:
        """True if the committed record ``f`` has its rows' δ beside it."""
        return _delta_file(f).exists()

    @staticmethod
    def write_deltas(f: Path, deltas: dict[str, list]) -> None:
        """The δ of every row of the committed record ``f`` (per task, one per row, in row order), beside it."""
        # device: cpu - lists written to disk; float16 moves a cosine between them by < 1e-3
        tensors = {t: torch.tensor(ds, dtype=torch.float16) for t, ds in deltas.items() if len(ds)}
        atomic_write_bytes(_delta_file(f), save(tensors))

    def records(self, cell: Cell, seeds: tuple[int, ...]) -> list[dict]:
        """The cell's records of the seeds it runs out of the experiment's ``seeds``, in seed order (the
        workspace's where several copies exist); another run's extra seeds of a shared cell are not read."""
        found = (self._found(cell, self.name(s)) for s in cell.seeds(seeds))
        return [self._read(f) for f in found if f is not None]

    @staticmethod
    def _read(f: Path) -> dict:
        """A record; a committed copy gets its rows' δ back from the file beside it, where one was written."""
        record = read_json(f, "experiment cell")
        if _delta_file(f).exists():
            deltas = load_file(_delta_file(f))
            for t, rows in record["tasks"].items():
                for row, d in zip(rows, deltas[t] if t in deltas else ()):
                    row.setdefault("delta", d.float().tolist())
        return record
