"""Where each cell's records are kept: whole in the workspace, and compact in the results folder, committed.

A cell's record (one per generator seed, or one for an unseeded cell) holds every adapter's metrics, its per-item
hits and its δ. The workspace keeps it whole; the results folder keeps a copy without δ (``cells/<cell id>/``,
small enough to commit), so a run on a fresh machine, with no workspace, skips every cell finished in git and
the result files are rebuilt from the committed copies.
"""

from __future__ import annotations

from pathlib import Path

from deltalora.experiments.grid import Cell
from deltalora.io import atomic_write_json, read_json

_DROPPED = ("delta",)
"""Row fields left out of the committed copy (δ: 576 numbers per adapter, used only by the report's δ map)."""


class CellStore:
    """Records of cells by seed: the workspace's copy when present, else the committed one."""

    def __init__(self, work: Path, committed: Path | None = None):
        self.work, self.committed = work, committed

    @staticmethod
    def name(seed: int | None) -> str:
        """File name of a seed's record (``all.json`` for a cell run once)."""
        return f"seed{seed}.json" if seed is not None else "all.json"

    def file(self, cell: Cell, seed: int | None) -> Path:
        """The workspace's record of a seed (written by the runner)."""
        return self.work / cell.id / self.name(seed)

    def done(self, cell: Cell, seed: int | None) -> bool:
        """True if either copy of the seed's record exists."""
        return self.file(cell, seed).exists() or (
            self.committed is not None and (self.committed / cell.id / self.name(seed)).exists()
        )

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
            atomic_write_json(self.committed / cell.id / self.name(seed), compact)

    def records(self, cell: Cell) -> list[dict]:
        """The cell's records, one per seed in file-name order (the workspace's where both exist)."""
        names = {f.name for f in (self.work / cell.id).glob("*.json")}
        if self.committed is not None:
            names |= {f.name for f in (self.committed / cell.id).glob("*.json")}
        out = []
        for n in sorted(names, key=lambda n: (n == "all.json", n)):
            f = self.work / cell.id / n
            out.append(read_json(f if f.exists() else self.committed / cell.id / n, "experiment cell"))
        return out
