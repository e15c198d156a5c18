"""The workspace: one folder that holds every artifact of a pipeline run, laid out in one place.

::

    <root>/
      tasks.json                          tasks prepare: the pool's tasks and split sizes
      zoo/config.json                     resolved preset of the zoo build
      zoo/adapters/<task>/seed<k>/[part<p>/]step<s>/  PEFT adapter folders
      zoo/runs/<task>__seed<k>[__part<p>].json  one record per finished run (its presence = done)
      zoo/base/<task>.json                base-model accuracy and per-item hits (test, validation)
      zoo/manifest.json                   every checkpoint (typed: ``deltalora.zoo.manifest``)
      delta/deltas_p<n>.safetensors       δ of every checkpoint for a probe set of size n
      delta/timing_p<n>.json, config.json
      cache/prompt_embeddings.safetensors sentence-encoder cache
      cache/linear_delta/<key>.safetensors  first-order δ at training checkpoints (variant A2-lin)
      cache/references/<key>.safetensors    a task's reference and base-model scores on its test items
      generators/<name>/                  generators trained by ``train-generator``
      experiments/                        the research grid's cells, scores and generators
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """Every path of one run under ``root``; nothing else builds workspace paths."""

    root: Path
    """The workspace folder (``runs/<preset>`` unless the user names one)."""

    @classmethod
    def of(cls, folder: str | Path | None, preset_name: str) -> Workspace:
        """The workspace in ``folder``, or the default ``runs/<preset_name>``."""
        return cls(Path(folder) if folder is not None else Path("runs") / preset_name)

    # ---------------------------------------------------------------- tasks
    @property
    def tasks_file(self) -> Path:
        """``tasks prepare``'s table of the pool."""
        return self.root / "tasks.json"

    # ---------------------------------------------------------------- zoo
    @property
    def zoo(self) -> Path:
        """Root of the zoo; manifest paths are relative to it."""
        return self.root / "zoo"

    @property
    def zoo_config(self) -> Path:
        """The resolved preset the zoo was built with."""
        return self.zoo / "config.json"

    @property
    def manifest(self) -> Path:
        """The zoo manifest."""
        return self.zoo / "manifest.json"

    @property
    def runs(self) -> Path:
        """Run records (one per finished run)."""
        return self.zoo / "runs"

    @property
    def base_evals(self) -> Path:
        """Base-model accuracy records (one per task)."""
        return self.zoo / "base"

    def run_record(self, run_id: str) -> Path:
        """The record of one finished run."""
        return self.runs / f"{run_id}.json"

    def base_record(self, task: str) -> Path:
        """The base model's accuracy on one task."""
        return self.base_evals / f"{task}.json"

    def run_adapters(self, name: str, seed: int, part: int | None = None) -> Path:
        """Folder of one run's checkpoints (``part``: of a zoo whose tasks are split into parts)."""
        return self.zoo / self.checkpoint(name, seed, 0, part).parent

    def checkpoint(self, name: str, seed: int, step: int, part: int | None = None) -> Path:
        """A checkpoint folder relative to the zoo root, as the manifest records it."""
        run = Path("adapters") / name / f"seed{seed}"
        return (run if part is None else run / f"part{part}") / f"step{step:05d}"

    # ---------------------------------------------------------------- δ
    @property
    def delta(self) -> Path:
        """Folder of the Delta Activations."""
        return self.root / "delta"

    def deltas(self, n_probes: int, rank: int | None = None) -> Path:
        """δ of every checkpoint for a probe set; ``rank`` names a distributed rank's part file."""
        part = "" if rank is None else f".rank{rank}"
        return self.delta / f"deltas_p{n_probes}{part}.safetensors"

    def delta_timing(self, n_probes: int) -> Path:
        """Seconds per adapter of the last δ computation."""
        return self.delta / f"timing_p{n_probes}.json"

    @property
    def delta_config(self) -> Path:
        """Probe set of the δ files."""
        return self.delta / "config.json"

    # ---------------------------------------------------------------- generators and experiments
    @property
    def prompt_cache(self) -> Path:
        """Cache of sentence embeddings of prompts."""
        return self.root / "cache" / "prompt_embeddings.safetensors"

    @property
    def reference_cache(self) -> Path:
        """Cache of each task's reference and base-model scores on its test items, one file per task and setting."""
        return self.root / "cache" / "references"

    @property
    def linear_delta_cache(self) -> Path:
        """Cache of first-order δ (Jacobians at training checkpoints), one file per targets, basis and probes."""
        return self.root / "cache" / "linear_delta"

    def generator(self, name: str) -> Path:
        """Default folder of a generator trained by ``train-generator``."""
        return self.root / "generators" / name

    @property
    def protected(self) -> tuple[Path, Path]:
        """Folders no output a user names may be written in or replace: the zoo and δ."""
        return self.zoo, self.delta

    @property
    def experiments(self) -> Path:
        """Root of the experiment grid's cache."""
        return self.root / "experiments"
