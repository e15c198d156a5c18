"""``deltalora experiment --restore-delta``: the δ of committed cells scored before their copies kept it.

A cell's committed record without its δ still names every adapter it scored (the generator's seed and draw, the
task retrieved, the tasks mixed), so the δ of those adapters can be measured again without rescoring them. Only
adapters at hand without training are rebuilt: the tasks' own LoRAs, the training adapters' mean, retrieval and
the top-k mixture always; a generator or multi-task LoRA only when the workspace still has it, or with
``--retrain``, which trains it again with the seed it was trained with. Each δ is checked
against the δ cosine its row recorded when it was scored (the cosine to the task's reference δ), so an adapter
that is not the one scored is refused, not stored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from deltalora.config import Preset
from deltalora.data.items import stable_seed
from deltalora.data.registry import TaskSpec
from deltalora.delta.analysis import cos
from deltalora.experiments.cv import CV, cv_cells, declare
from deltalora.experiments.grid import GENERATOR, MULTITASK, Cell
from deltalora.experiments.runner import Runner
from deltalora.generator.artifact import load_generator
from deltalora.generator.generate import generate_tensors
from deltalora.generator.mixture import MIXTURE
from deltalora.generator.retrieval import RETRIEVAL, retrieve
from deltalora.io import read_json
from deltalora.workspace import Workspace

Adapter = dict[str, torch.Tensor] | Path
TOLERANCE = 1e-3
"""Largest difference between a restored adapter's δ cosine and the recorded one (another CPU's float order moves
it by ~1e-6; another adapter, by far more)."""


def restore_deltas(
    preset: Preset,
    ws: Workspace,
    results_dir: Path,
    extra: list[TaskSpec] | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Restore the δ of every cross-validation cell of ``results_dir`` whose committed records lack it; returns
    what happened to each cell (restored, already there, why not). ``retrain``: train the generators and
    multi-task LoRAs the workspace lacks (the same seeds give the same adapters on the same kind of device, which
    the cosine check confirms row by row)."""
    runner = Runner(preset, ws, results_dir, extra)
    declare(preset, runner.domains, results_dir)  # refused unless these are the cells that run declared
    cells = cv_cells(preset, runner.domains)
    out = {}
    try:
        for cell in tqdm(cells, desc="restore δ", unit="cell", disable=not progress):
            out[cell.name] = _restore_cell(runner, cell, retrain)
    finally:
        runner.scorer.close()
    return out


def _restore_cell(runner: Runner, cell: Cell, retrain: bool) -> str:
    """What happened to each seed of a cell, in one line (one phrase when all seeds fared alike)."""
    if cell.rq != CV:
        return "not a cross-validation cell"
    if cell.method == "base":
        return "none needed: the base model's δ is zero"
    said = {seed: _restore_seed(runner, cell, seed, retrain) for seed in cell.seeds(runner.preset.experiment.seeds)}
    if len(set(said.values())) == 1:
        return next(iter(said.values()))
    return "; ".join(f"seed {seed}: {what}" for seed, what in said.items())


def _restore_seed(runner: Runner, cell: Cell, seed: int | None, retrain: bool) -> str:
    f = runner.store.committed_file(cell, seed)
    if not f.exists():
        return "no record in this results folder (not scored yet, or another run's)"
    if runner.store.has_deltas(f):
        return "had its δ"
    source = _source(runner, cell, seed, retrain)
    if source is None:
        return f"kept without δ: its {cell.method} adapter is not in the workspace (--retrain trains it)"
    deltas = {}
    for task, rows in read_json(f, "experiment cell")["tasks"].items():
        deltas[task] = []
        for row, adapter in zip(rows, source(task, len(rows)), strict=True):
            d = runner.scorer.delta(adapter)
            got = cos(d, runner.scorer.ref_delta(task))
            if abs(got - row["delta_cos"]) > TOLERANCE:
                return (
                    f"refused: {f} task {task}: the rebuilt adapter's δ cosine {got:.5f} is not the recorded "
                    f"{row['delta_cos']:.5f}"
                )
            deltas[task].append(d.tolist())
    runner.store.write_deltas(f, deltas)
    return "restored"


def _source(runner: Runner, cell: Cell, seed: int | None, retrain: bool) -> Callable[[str, int], list[Adapter]] | None:
    """How to rebuild, for a task, the adapters its ``n`` rows scored (one per prompt draw, in row order); None
    where that would need training and ``retrain`` is off."""
    if cell.method == GENERATOR:
        folder = runner.trained_generator(cell, seed) if retrain else runner.generator_folder(cell, seed)[1]
        if not (folder / "generator.safetensors").exists():
            return None
        gen = load_generator(folder, runner.scorer.device)
        return lambda task, n: [
            generate_tensors(gen, runner.encoder, runner.condition_prompts(cell, task), stable_seed(task, seed, d))
            for d in range(n)
        ]
    if cell.method == RETRIEVAL:
        index = runner.retrieval_index(cell.train)
        return lambda task, n: [
            load_file(
                retrieve(index, runner.draw(cell, seed, task, d), runner.encoder)[1] / "adapter_model.safetensors"
            )
            for d in range(n)
        ]
    if cell.method == MIXTURE:
        return lambda task, n: [runner.mixture(cell, seed, task, d)[0] for d in range(n)]
    if cell.method == MULTITASK and not retrain and not (runner.multitask_folder(cell.train) / "record.json").exists():
        return None
    return lambda task, n: [runner.fixed_adapter(cell, task)] * n
