"""Running the grid's cells: trained generators, retrieval indexes and fixed adapters, scored and cached.

Under ``<workspace>/experiments``: ``generators/<id>/`` (one per generator run),
``retrieval/<id>/``, ``cells/<cell>/seed<k>.json`` (one per cell and generator seed) and
``scores/`` (generated adapters' scores shared by the cells that read them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from deltalora.config import Preset
from deltalora.data.items import stable_seed
from deltalora.data.registry import TaskSpec
from deltalora.data.tasks import load_pool
from deltalora.experiments.grid import Cell, generator_preset
from deltalora.experiments.scoring import Scorer
from deltalora.generator.artifact import load_generator
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.generate import choose_prompts, generate_tensors
from deltalora.generator.retrieval import RETRIEVAL, build_retrieval, retrieve
from deltalora.generator.train import train_generator
from deltalora.io import atomic_write_json, file_lock, read_json
from deltalora.workspace import Workspace


class Runner:
    """Holds the scorer, encoder and caches of one experiment invocation."""

    def __init__(self, preset: Preset, ws: Workspace, results_dir: Path, extra: list[TaskSpec] | None = None):
        self.preset, self.ws, self.results_dir, self.extra = preset, ws, results_dir, extra
        self.root = ws.experiments
        self.tasks = load_pool(preset, extra)
        self.domains = {n: t.domain for n, t in self.tasks.items()}
        self.scorer = Scorer(preset, ws, preset.experiment.n_test, preset.experiment.n_kl, extra)
        self.encoder = PromptEncoder(ws.prompt_cache, device=self.scorer.device)
        self._scored: dict[tuple, dict] = {}  # identical adapters (retrieval hits) are scored once
        self._mean_adapters: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    # ---------------------------------------------------------------- generators
    def generator_dir(self, preset: Preset, train: tuple[str, ...]) -> Path:
        """Folder of a generator run, named by a hash of its config and training tasks."""
        key = json.dumps(
            {"generator": dataclasses.asdict(preset.generator), "train": train}, sort_keys=True, default=str
        )
        return self.root / "generators" / hashlib.sha256(key.encode()).hexdigest()[:16]

    def trained_generator(self, cell: Cell, seed: int) -> Path:
        """The cell's generator of this seed, trained if no process has trained it yet."""
        preset = generator_preset(self.preset, cell, seed)
        out = self.generator_dir(preset, cell.train)
        out.parent.mkdir(parents=True, exist_ok=True)
        # two experiment processes (e.g. --only rq1 and --only rq3) may need the same generator: one trains, one waits
        with file_lock(out.parent / f"{out.name}.lock", block=True):
            if not (out / "generator.safetensors").exists():
                train_generator(preset, self.ws, out, list(cell.train), self.extra, progress=False)
        return out

    def retrieval_index(self, train: tuple[str, ...]) -> Path:
        """The retrieval index over these training tasks, built once."""
        out = self.root / "retrieval" / hashlib.sha256("|".join(train).encode()).hexdigest()[:16]
        with file_lock(out.parent / f"{out.name}.lock", block=True):
            if not (out / "config.json").exists():
                build_retrieval(self.preset, self.ws, out, list(train), self.extra, self.encoder)
        return out

    # ---------------------------------------------------------------- prompts
    def condition_prompts(self, cell: Cell, task: str) -> list[str]:
        """Train-split prompts of the scored task, or (control) of a task from another domain."""
        if cell.prompts == "own":
            return [it.prompt for it in self.tasks[task].train]
        others = sorted(t for t in self.preset.pool if self.domains[t] != self.domains[task])
        other = others[stable_seed("other-prompts", task) % len(others)]
        return [it.prompt for it in self.tasks[other].train]

    # ---------------------------------------------------------------- scoring
    def score(self, task: str, tensors: dict[str, torch.Tensor] | None, key: tuple | None = None) -> dict:
        """Metrics and δ (as a list) of LoRA tensors on a task (None: the base model); cached by ``key``."""
        if key is not None and (task, *key) in self._scored:
            return self._scored[(task, *key)]
        out, delta = self.scorer.score(task, tensors)
        out["delta"] = [round(x, 6) for x in delta.tolist()]
        if key is not None:
            self._scored[(task, *key)] = out
        return out

    def run_cell(self, cell: Cell, wait: bool = False) -> bool:
        """Score every seed of the cell not on disk yet; False if another process holds one of them
        (with ``wait``, block until it is free instead)."""
        out_dir, ex = self.root / "cells" / cell.id, self.preset.experiment
        seeds = ex.seeds if cell.seeded else (None,)
        complete = True
        for seed in seeds:
            f = out_dir / (f"seed{seed}.json" if seed is not None else "all.json")
            if f.exists():
                continue
            with file_lock(f.with_suffix(".lock"), block=wait) as mine:
                if not mine:
                    complete = False
                elif not f.exists():
                    self._run_seed(cell, seed, f)
        return complete

    def _run_seed(self, cell: Cell, seed: int | None, f: Path) -> None:
        ex = self.preset.experiment
        t0 = time.perf_counter()
        record: dict[str, Any] = {"cell": cell.name, "method": cell.method, "seed": seed, "tasks": {}}
        if cell.method == "generator":
            gen = load_generator(self.trained_generator(cell, seed), self.scorer.device)
            record.update(generator=str(gen.folder), train_seconds=gen.card.train_seconds, n_params=gen.card.n_params)
            for task in cell.tasks:
                # scores are keyed by generator, prompt source and task, so cells that share them score once
                key = self.root / "scores" / f"{gen.folder.name}__{cell.prompts}__d{ex.draws}n{ex.n_test}__{task}.json"
                if not key.exists():
                    prompts = self.condition_prompts(cell, task)
                    atomic_write_json(
                        key,
                        [
                            self.score(task, generate_tensors(gen, self.encoder, prompts, stable_seed(task, seed, d)))
                            for d in range(ex.draws)
                        ],
                    )
                record["tasks"][task] = read_json(key, "experiment scores")
        elif cell.method == RETRIEVAL:
            index = self.retrieval_index(cell.train)
            for task in cell.tasks:
                rows = []
                for d in range(ex.draws):
                    prompts = choose_prompts(
                        self.condition_prompts(cell, task), self.preset.generator.n_prompts, stable_seed(task, seed, d)
                    )
                    hit, folder = retrieve(index, prompts, self.encoder)
                    rows.append(
                        {
                            **self.score(task, load_file(folder / "adapter_model.safetensors"), (RETRIEVAL, hit)),
                            "retrieved": hit,
                        }
                    )
                record["tasks"][task] = rows
        else:
            for task in cell.tasks:
                record["tasks"][task] = [self.score(task, self.fixed_adapter(cell, task))]
        record["seconds"] = time.perf_counter() - t0
        atomic_write_json(f, record)

    def fixed_adapter(self, cell: Cell, task: str) -> dict[str, torch.Tensor] | None:
        """The adapter of a baseline cell: none (base), the task's own (oracle), or the training adapters' mean."""
        if cell.method == "base":
            return None
        if cell.method == "oracle":
            return self.scorer.ref(task).ref_tensors[0]
        if cell.train not in self._mean_adapters:  # one average per training set, not one per scored task
            sds = [self.scorer.tensors(self.scorer.final_adapters(t)[0]) for t in cell.train]
            self._mean_adapters[cell.train] = {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0]}
        return self._mean_adapters[cell.train]
