"""Running the grid's cells: trained generators, retrieval indexes and fixed adapters, scored and cached.

Under ``<workspace>/experiments``: ``generators/<id>/`` (one per generator run),
``retrieval/<id>/``, ``mixtures/<index id>/`` (top-k mixture adapters, one per task and prompt draw),
``multitask/<id>/`` (one multi-task LoRA per set of training tasks), ``cells/<cell>/seed<k>.json`` (one per
cell and generator seed) and ``scores/`` (generated adapters' scores shared by the cells that read them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from deltalora.config import Preset
from deltalora.data.items import stable_seed
from deltalora.data.registry import TaskSpec
from deltalora.data.tasks import load_pool
from deltalora.experiments.cells import CellStore
from deltalora.experiments.cv import check_reuse
from deltalora.experiments.grid import GENERATOR, METHODS, MULTITASK, Cell, generator_preset, warm_source
from deltalora.experiments.multitask import multitask_key, train_multitask
from deltalora.experiments.results import loss_curves
from deltalora.experiments.scoring import Scorer
from deltalora.generator.artifact import LoadedGenerator, load_generator
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.generate import choose_prompts, generate_tensors
from deltalora.generator.mixture import MIXTURE, write_mixture
from deltalora.generator.retrieval import RETRIEVAL, build_retrieval, retrieve
from deltalora.generator.train import train_generator
from deltalora.io import Busy, atomic_write_json, build_once, defer_when_busy, file_lock, read_json
from deltalora.workspace import Workspace

_KEYED_WHEN_SET = {"corrupt_delta": True}
"""Generator fields added after experiment runs existed, with their defaults: they enter a generator's folder key
only when set otherwise, so the generators trained before them keep their folders (and their cached scores)."""


class Runner:
    """Holds the scorer, encoder and caches of one experiment invocation."""

    def __init__(
        self,
        preset: Preset,
        ws: Workspace,
        results_dir: Path,
        extra: list[TaskSpec] | None = None,
        reuse: Sequence[Path] = (),
    ):
        self.preset, self.ws, self.results_dir, self.extra = preset, ws, results_dir, extra
        self.root = ws.experiments
        self.tasks = load_pool(preset, extra)
        self.domains = {n: t.domain for n, t in self.tasks.items()}
        shared = tuple(check_reuse(preset, self.domains, d) for d in reuse)  # refused unless the same cells
        self.store = CellStore(self.root / "cells", results_dir / "cells", shared)
        self.scorer = Scorer(preset, ws, preset.experiment.n_test, preset.experiment.n_kl, extra)
        self.encoder = PromptEncoder(ws.prompt_cache, device=self.scorer.device)
        self._scored: dict[tuple, dict] = {}  # identical adapters (retrieval hits) are scored once
        self._mean_adapters: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        self._gen: LoadedGenerator | None = None
        self._vocab: list[str] | None = None  # the pool's train-prompt words, for random-text prompts
        # how each method's cell gets its score rows: one entry per METHODS key (checked here)
        self._rows = {
            GENERATOR: self._generator_rows,
            RETRIEVAL: self._retrieval_rows,
            MIXTURE: self._mixture_rows,
            **{m: self._fixed_rows for m in ("base", "oracle", "train_avg", MULTITASK)},
        }
        assert set(self._rows) == set(METHODS), "every method of grid.METHODS needs its rows here"

    # ---------------------------------------------------------------- generators
    def generator_dir(self, preset: Preset, train: tuple[str, ...]) -> Path:
        """Folder of a generator run, named by a hash of its config and training tasks."""
        gen = {k: v for k, v in dataclasses.asdict(preset.generator).items() if _KEYED_WHEN_SET.get(k, ...) != v}
        key = json.dumps({"generator": gen, "train": train}, sort_keys=True, default=str)
        return self.root / "generators" / hashlib.sha256(key.encode()).hexdigest()[:16]

    def generator_folder(self, cell: Cell, seed: int) -> tuple[Preset, Path]:
        """The preset the cell's generator of this seed is trained with, and its folder (trained or not)."""
        source = warm_source(cell)
        init_from = str(self.generator_folder(source, seed)[1]) if source else ""
        preset = generator_preset(self.preset, cell, seed, init_from)
        return preset, self.generator_dir(preset, cell.train)

    def trained_generator(self, cell: Cell, seed: int) -> Path:
        """The cell's generator of this seed, trained if no process has trained it yet."""
        source = warm_source(cell)
        if source:
            self.trained_generator(source, seed)
        preset, out = self.generator_folder(cell, seed)
        # two experiment processes (e.g. --only rq1 and --only rq3) may need the same generator: one trains it
        build_once(
            out.parent / f"{out.name}.lock",
            (out / "generator.safetensors").exists,
            lambda: train_generator(preset, self.ws, out, list(cell.train), self.extra, progress=False),
        )
        return out

    def retrieval_index(self, train: tuple[str, ...]) -> Path:
        """The retrieval index over these training tasks, built once."""
        out = self.root / "retrieval" / hashlib.sha256("|".join(train).encode()).hexdigest()[:16]
        build_once(
            out.parent / f"{out.name}.lock",
            (out / "config.json").exists,
            lambda: build_retrieval(self.preset, self.ws, out, list(train), self.extra, self.encoder),
        )
        return out

    def multitask_folder(self, train: tuple[str, ...]) -> Path:
        """Folder of the multi-task LoRA over these training tasks (complete when its record.json is there)."""
        return self.root / "multitask" / multitask_key(self.preset, train)

    def multitask_adapter(self, train: tuple[str, ...]) -> Path:
        """The multi-task LoRA over these training tasks, trained if no process has trained it yet."""
        out = self.multitask_folder(train)
        # record.json is written last inside the atomic folder: present means complete
        build_once(
            out.parent / f"{out.name}.lock",
            (out / "record.json").exists,
            lambda: train_multitask(self.preset, self.tasks, train, out),
        )
        return out

    # ---------------------------------------------------------------- prompts
    def condition_prompts(self, cell: Cell, task: str) -> list[str]:
        """The prompts the cell's ``PROMPT_SOURCES`` entry names: train-split prompts of the scored task, of a task
        from another domain, or random text as long as the task's own prompts."""
        own = [it.prompt for it in self.tasks[task].train]
        if cell.prompts == "own":
            return own
        if cell.prompts == "random":
            if self._vocab is None:
                words = {w for t in self.tasks.values() for it in t.train for w in it.prompt.split()}
                self._vocab = sorted(words)
            return word_salad(self._vocab, own, stable_seed("random-prompts", task))
        others = sorted(t for t in self.preset.pool if self.domains[t] != self.domains[task])
        other = others[stable_seed("other-prompts", task) % len(others)]
        return [it.prompt for it in self.tasks[other].train]

    # ---------------------------------------------------------------- scoring
    def score(self, task: str, tensors: dict[str, torch.Tensor] | None, key: tuple | None = None) -> dict:
        """Metrics and δ (as a list) of LoRA tensors on a task (None: the base model); cached by ``key``."""
        if key is not None and (task, *key) in self._scored:
            return self._scored[(task, *key)]
        out = _row(*self.scorer.score(task, tensors))
        if key is not None:
            self._scored[(task, *key)] = out
        return out

    def run_cell(self, cell: Cell, wait: bool = False) -> bool:
        """Score every seed of the cell not on disk yet; False if another process holds one of them or is building
        an artifact one needs (a generator, its linearised-δ Jacobians, a multi-task LoRA): the caller runs other
        cells meanwhile. With ``wait``, block until they are free instead."""
        seeds = cell.seeds(self.preset.experiment.seeds)
        complete = True
        for seed in seeds:
            if self.store.done(cell, seed):
                continue
            f = self.store.file(cell, seed)
            f.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(f.with_suffix(".lock"), block=wait) as mine:
                if not mine:
                    complete = False
                elif not self.store.done(cell, seed):
                    try:
                        with defer_when_busy(not wait):
                            self._run_seed(cell, seed)
                    except Busy:  # nothing of this seed was written; a later pass (or the final wait) takes it
                        complete = False
        return complete

    def _run_seed(self, cell: Cell, seed: int | None) -> None:
        t0 = time.perf_counter()
        record: dict[str, Any] = {"cell": cell.name, "method": cell.method, "seed": seed, "tasks": {}}
        record["tasks"] = {task: self._rows[cell.method](cell, seed, task, record) for task in cell.tasks}
        record["seconds"] = time.perf_counter() - t0
        self.store.write(cell, seed, record)

    def draw(self, cell: Cell, seed: int, task: str, d: int) -> list[str]:
        """The d-th prompt draw of a seed, the same for retrieval and the mixture (paired comparisons)."""
        return choose_prompts(
            self.condition_prompts(cell, task), self.preset.generator.n_prompts, stable_seed(task, seed, d)
        )

    def _generator_rows(self, cell: Cell, seed: int, task: str, record: dict) -> list[dict]:
        ex = self.preset.experiment
        folder = self.trained_generator(cell, seed)
        if self._gen is None or self._gen.folder != folder:  # loaded once per cell and seed, not once per task
            self._gen = load_generator(folder, self.scorer.device)
        gen = self._gen
        record.update(
            generator=str(gen.folder),
            train_seconds=gen.card.train_seconds,
            n_params=gen.card.n_params,
            best_step=gen.card.best_step,
            curves=loss_curves(gen.folder / "log.jsonl"),  # kept in the record: a fresh machine has no log
        )
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
        return read_json(key, "experiment scores")

    def _retrieval_rows(self, cell: Cell, seed: int, task: str, record: dict) -> list[dict]:
        index = self.retrieval_index(cell.train)
        rows = []
        for d in range(self.preset.experiment.draws):
            hit, folder = retrieve(index, self.draw(cell, seed, task, d), self.encoder)
            rows.append(
                {
                    **self.score(task, load_file(folder / "adapter_model.safetensors"), (RETRIEVAL, hit)),
                    "retrieved": hit,
                }
            )
        return rows

    def _mixture_rows(self, cell: Cell, seed: int, task: str, record: dict) -> list[dict]:
        """Per draw, the top-k mixture scored through PEFT's own loading: its rank k·r does not fit the scorer's
        rank-r swapper."""
        rows = []
        for d in range(self.preset.experiment.draws):
            folder, picked = self.mixture(cell, seed, task, d)
            rows.append({**_row(*self.scorer.score_folder(task, folder)), "retrieved": picked})
        return rows

    def mixture(self, cell: Cell, seed: int, task: str, d: int) -> tuple[Path, str]:
        """A draw's top-k mixture, written as a PEFT folder once (kept, so it can be inspected or reloaded), and
        what it mixes ("0.70·task + 0.30·other")."""
        ex, index = self.preset.experiment, self.retrieval_index(cell.train)
        name = f"k{ex.mixture_k}_t{ex.mixture_temperature:g}_{cell.prompts}"
        folder = self.root / "mixtures" / index.name / name / f"{task}__seed{seed}_draw{d}"
        if not (folder / "provenance.json").exists():  # written inside the atomic folder: present means complete
            write_mixture(
                index,
                self.draw(cell, seed, task, d),
                self.encoder,
                ex.mixture_k,
                ex.mixture_temperature,
                folder,
                self.ws.protected,
            )
        prov = read_json(folder / "provenance.json", "mixture provenance")
        return folder, " + ".join(f"{w:.2f}·{t}" for t, w in zip(prov["tasks"], prov["weights"]))

    def _fixed_rows(self, cell: Cell, seed: int | None, task: str, record: dict) -> list[dict]:
        return [self.score(task, self.fixed_adapter(cell, task, record))]

    def fixed_adapter(self, cell: Cell, task: str, record: dict | None = None) -> dict[str, torch.Tensor] | None:
        """The adapter of a baseline cell: none (base), the task's own (oracle), the training adapters' mean, or
        the multi-task LoRA (its training time and items go into ``record``)."""
        if cell.method == "base":
            return None
        if cell.method == "oracle":
            return self.scorer.ref_tensors(task)[0]
        if cell.method == MULTITASK:
            folder = self.multitask_adapter(cell.train)
            if record is not None:
                info = read_json(folder / "record.json", "multi-task LoRA record")
                record.update(adapter=str(folder), train_seconds=info["train_seconds"], n_train=info["n_train"])
            return load_file(folder / "adapter_model.safetensors")
        if cell.train not in self._mean_adapters:  # one average per training set, not one per scored task
            sds = [self.scorer.tensors(self.scorer.final_adapters(t)[0]) for t in cell.train]
            self._mean_adapters[cell.train] = {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0]}
        return self._mean_adapters[cell.train]


def word_salad(vocab: list[str], like: list[str], seed: int) -> list[str]:
    """One string per prompt of ``like``, of as many words, each drawn uniformly from ``vocab`` (seeded)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocab, k=max(1, len(p.split())))) for p in like]


def _row(metrics: dict, delta: torch.Tensor) -> dict:
    """A score row: the scorer's metrics and δ as a rounded list (JSON)."""
    return {**metrics, "delta": [round(x, 6) for x in delta.tolist()]}
