"""Where each cell's records are kept: whole in the workspace, and compact in the results folder, committed.

A cell's record (one per generator seed, or one for an unseeded cell) holds every adapter's metrics, its per-item
hits and its δ. The workspace keeps it whole; the results folder keeps a copy without δ (``cells/<cell id>/``,
small enough to commit), so a run on a fresh machine, with no workspace, skips every cell finished in git and
the result files are rebuilt from the committed copies; a run that shares cells with another run's results folder
(``--reuse``) reads that folder's copies too.
"""

from __future__ import annotations

from pathlib import Path

from deltalora.experiments.grid import Cell
from deltalora.io import atomic_write_json, read_json

_DROPPED = ("delta",)
"""Row fields left out of the committed copy (δ: 576 numbers per adapter, used only by the report's δ map)."""


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
            atomic_write_json(self.committed / cell.id / self.name(seed), compact)

    def records(self, cell: Cell) -> list[dict]:
        """The cell's records, one per seed in file-name order (the workspace's where several copies exist)."""
        names = {f.name for d in self.dirs for f in (d / cell.id).glob("*.json")}
        return [
            read_json(self._found(cell, n), "experiment cell")
            for n in sorted(names, key=lambda n: (n == "all.json", n))
        ]
