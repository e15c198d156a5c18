"""The zoo's typed records: checkpoints, run records and the manifest, each with one reader and writer.

A run record (``zoo/runs/<task>__seed<k>.json``) is written when a run finishes; the
manifest gathers every run's checkpoints. Both carry a format version, so a workspace
written by another version of deltalora is refused with the way out rather than misread.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltalora.errors import ArtifactError
from deltalora.io import atomic_write_json, read_json

MANIFEST_FORMAT = "deltalora.zoo.manifest"
MANIFEST_VERSION = 2
"""Version 1 was a bare JSON list of checkpoints."""


@dataclass(frozen=True)
class Checkpoint:
    """One saved adapter of the zoo."""

    task: str
    """Task name, or ``a+b`` for an adapter trained on the union of two tasks."""
    domain: str
    """The task's domain (``pair`` for a union adapter)."""
    seed: int
    """Seed of the run."""
    step: int
    """Optimizer step at which it was saved."""
    loss: float
    """Training loss of that step."""
    path: str
    """Adapter folder relative to the zoo root."""
    sha256: str
    """Checksum of ``adapter_model.safetensors``, checked before the file is parsed."""
    final: bool
    """True for the last step of its run."""
    pair_of: tuple[str, str] | None = None
    """The two tasks of a union adapter; None for a single task."""
    test_acc: float | dict[str, float] | None = None
    """Test accuracy (final checkpoints only; per task for a union adapter)."""
    part: int = 0
    """Which disjoint part of the train split the run learnt from (0 when the zoo has one part)."""

    @property
    def is_pair(self) -> bool:
        """True for an adapter trained on the union of two tasks."""
        return self.pair_of is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``pair_of`` as a list; ``test_acc`` only where measured)."""
        d = dataclasses.asdict(self)
        d["pair_of"] = list(self.pair_of) if self.pair_of else None
        if self.test_acc is None:
            del d["test_acc"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Checkpoint:
        """Parse one entry; ``where`` names the file in errors."""
        try:
            pair = d.get("pair_of")
            return cls(**{**d, "pair_of": tuple(pair) if pair else None})
        except TypeError as e:
            raise ArtifactError(f"{where}: malformed checkpoint entry ({e})") from e


@dataclass(frozen=True)
class RunRecord:
    """One finished training run (its presence marks the run done)."""

    task: str
    domain: str
    seed: int
    tasks: list[str]
    """The task(s) whose train items it was trained on."""
    steps: int
    n_train: int
    test_acc: dict[str, float]
    """Test accuracy of the final checkpoint on each of ``tasks``."""
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    losses: list[float]
    """Loss of every step."""
    checkpoints: list[Checkpoint] = field(default_factory=list)
    val_acc: dict[str, float] = field(default_factory=dict)
    """Validation accuracy of the final checkpoint (single-task runs of a preset with a validation split)."""
    test_hits: dict[str, list[int]] = field(default_factory=dict)
    """0/1 per test item of the final checkpoint, in the split's order (for paired intervals)."""
    part: int = 0
    """Which of ``parts`` disjoint slices of the train split the run learnt from."""
    parts: int = 1

    def to_file(self, path: Path) -> None:
        """Write atomically."""
        atomic_write_json(path, {**dataclasses.asdict(self), "checkpoints": [c.to_dict() for c in self.checkpoints]})

    @classmethod
    def from_file(cls, path: Path) -> RunRecord:
        """Read and check a run record."""
        raw = read_json(path, "zoo run record")
        try:
            ckpts = [Checkpoint.from_dict(c, str(path)) for c in raw.pop("checkpoints")]
            return cls(**raw, checkpoints=ckpts)
        except (TypeError, KeyError, AttributeError) as e:
            raise ArtifactError(f"{path}: malformed zoo run record ({e})") from e


@dataclass(frozen=True)
class Manifest:
    """Every checkpoint of a zoo, in run order; the queries the pipeline needs."""

    checkpoints: tuple[Checkpoint, ...]

    def __iter__(self):
        return iter(self.checkpoints)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def singles(self) -> list[Checkpoint]:
        """Checkpoints of single-task runs (no union adapters)."""
        return [c for c in self.checkpoints if not c.is_pair]

    def finals(self, task: str | None = None, seed: int | None = None) -> list[Checkpoint]:
        """Final checkpoints of single-task runs, optionally of one task and/or seed."""
        return [c for c in self.singles() if c.final and task in (None, c.task) and seed in (None, c.seed)]

    def union(self, a: str, b: str) -> list[Checkpoint]:
        """Final checkpoints of the adapter trained on the union of ``a`` and ``b``."""
        return [c for c in self.checkpoints if c.final and c.pair_of == (a, b)]

    def within(self, pool: tuple[str, ...]) -> Manifest:
        """Only checkpoints whose task(s) are all in ``pool``."""
        return Manifest(tuple(c for c in self.checkpoints if all(t in pool for t in (c.pair_of or (c.task,)))))

    def to_file(self, path: Path) -> None:
        """Write atomically, with the format version."""
        atomic_write_json(
            path,
            {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "checkpoints": [c.to_dict() for c in self.checkpoints],
            },
        )

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        """Read a manifest; one from another format version is refused with the way out."""
        raw = read_json(path, "zoo manifest (run `deltalora zoo build` first)")
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT or raw.get("version") != MANIFEST_VERSION:
            got = raw.get("version") if isinstance(raw, dict) else 1
            raise ArtifactError(
                f"{path}: zoo manifest of format version {got}, this deltalora reads version "
                f"{MANIFEST_VERSION}; rerun `deltalora zoo build` with the same preset and workspace "
                "(finished runs are kept, the manifest is rewritten)"
            )
        return cls(tuple(Checkpoint.from_dict(c, str(path)) for c in raw["checkpoints"]))

    @classmethod
    def from_runs(cls, runs_dir: Path) -> Manifest:
        """Gather every finished run's checkpoints (the manifest is derived, never edited)."""
        return cls(tuple(c for f in sorted(runs_dir.glob("*.json")) for c in RunRecord.from_file(f).checkpoints))
