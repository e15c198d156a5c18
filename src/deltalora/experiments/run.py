"""``deltalora experiment``: run (or resume) the grid, most important cells first; composition after the main grid."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from deltalora.config import Preset
from deltalora.data.registry import TaskSpec
from deltalora.errors import ConfigError, UsageError
from deltalora.experiments.composition import composition_generators, run_composition
from deltalora.experiments.cv import CV, cv_cells, declare
from deltalora.experiments.cv_results import write_cv
from deltalora.experiments.grid import RQS, Cell, plan
from deltalora.experiments.results import write_results
from deltalora.experiments.runner import Runner
from deltalora.io import atomic_write_bytes, atomic_write_json
from deltalora.outputs import own_dir
from deltalora.workspace import Workspace

log = logging.getLogger(__name__)


def run_experiment(
    preset: Preset,
    ws: Workspace,
    results_dir: str | Path,
    only: list[str] | None = None,
    extra: list[TaskSpec] | None = None,
    progress: bool = True,
    reuse: list[Path] | None = None,
) -> dict[str, Path]:
    """Run (or resume) every cell of the grid, or only those of the parts in ``only``; returns the result files.
    ``reuse``: results folders of other cross-validation runs of this preset whose committed cells stand in for
    this run's cells of the same name (``cv.check_reuse``)."""
    unknown = sorted(set(only or ()) - set(RQS))
    if unknown:
        raise UsageError(f"--only: unknown part(s) {unknown}; choose from {', '.join(RQS)}")
    for field in ("held_out", "seen_eval", "lodo_eval"):
        stray = [t for t in getattr(preset.experiment, field) if t not in preset.pool]
        if stray:
            raise ConfigError(f"experiment.{field}: {stray} not in the preset's pool")
    results_dir = Path(results_dir)
    own_dir(ws.experiments, "experiment")  # a folder that deltalora did not write is refused, not filled
    runner = Runner(preset, ws, results_dir, extra, reuse or ())
    cells = plan(preset, runner.domains) + cv_cells(preset, runner.domains)
    wanted = set(only or RQS)
    main = [c for c in cells if c.rq in wanted and c.rq in ("rq1", "rq2")]
    rest = [c for c in cells if c.rq in wanted and c not in main]
    if any(c.rq == CV for c in rest):
        declare(preset, runner.domains, results_dir)
    atomic_write_json(ws.experiments / "config.json", preset.to_dict())
    deltas: dict[str, torch.Tensor] = {
        f"ref|{t}": runner.scorer.ref(t).ref_delta
        for t in preset.pool
        if t in {*preset.experiment.seen_eval, *preset.experiment.held_out}
    }
    files: dict[str, Path] = {}

    def results(rq: str) -> None:
        files[rq] = (
            write_cv(preset, runner.store, results_dir, cells, runner.domains)
            if rq == CV
            else write_results(preset, runner.store, results_dir, cells, rq, runner.domains, deltas)
        )

    skipped: list[Cell] = []
    bar = tqdm(total=len(main) + len(rest) + ("rq4" in wanted), desc="experiment", unit="cell", disable=not progress)

    def take(cell: Cell, wait: bool = False) -> bool:
        """Run the cell's free seeds; rewrite its results only if a seed was added: a finished or passed-over cell
        adds nothing, and a rewrite (paired tests, permutations) takes a minute on a CPU."""
        seeds = cell.seeds(preset.experiment.seeds)
        before = sum(runner.store.done(cell, s) for s in seeds)
        complete = runner.run_cell(cell, wait)
        if sum(runner.store.done(cell, s) for s in seeds) > before:
            results(cell.rq)
        return complete

    def run(cell: Cell) -> None:
        bar.set_postfix_str(f"{cell.rq}: {cell.name}")
        if not take(cell):
            skipped.append(cell)
        bar.update()

    t0 = time.perf_counter()
    try:
        for cell in main:
            run(cell)
        log.info("experiment stage main grid (%s): %d cells, %.0f s", preset.runtime.device, len(main), _since(t0))
        if "rq4" in wanted and not (preset.pairs and composition_generators(cells)):
            log.info("experiment: rq4 skipped, the preset has no pairs or no rq1 or cross-validation generators")
            wanted.discard("rq4")
        if "rq4" in wanted:  # right after the main grid: it reuses its generators
            bar.set_postfix_str("rq4 composition")
            files["rq4"] = run_composition(runner, cells)
            bar.update()
            log.info("experiment stage rq4 composition: %.0f s so far", _since(t0))
        for cell in rest:
            run(cell)
        bar.close()
        log.info("experiment stage controls, rq3 and sweeps: %d cells, %.0f s so far", len(rest), _since(t0))
        for cell in skipped:  # held by another process when we passed: wait for it, then take what is left
            take(cell, wait=True)
        for rq in sorted(wanted - {"rq4"}):
            if any(c.rq == rq for c in cells):  # a part without cells (no tasks, no folds) writes no file
                results(rq)
    finally:
        runner.scorer.close()
    atomic_write_bytes(results_dir / "deltas.safetensors", save({k: v.float().contiguous() for k, v in deltas.items()}))
    return files


def _since(t0: float) -> float:
    return time.perf_counter() - t0
