"""The grid's result files: one JSON per research question, rewritten from the cell cache after every cell."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import torch

from deltalora.config import Preset
from deltalora.errors import ArtifactError
from deltalora.experiments.cells import CellStore
from deltalora.experiments.grid import GENERATOR, METHODS, METRICS, Cell
from deltalora.experiments.scoring import mean_std
from deltalora.io import atomic_write_json, read_json

RESULTS_VERSION = 1
"""Format version of ``rq*.json`` and ``ablations.json``."""


def summarize(records: list[dict], cell: Cell) -> dict | None:
    """Mean ± std of every metric over the cell's adapter sets (its seeds' ``records``), per task and overall; None
    if nothing ran."""
    if not records:
        return None
    per_task = {
        t: {m: _mean_std([r[m] for rec in records for r in rec["tasks"][t]]) for m in METRICS} for t in cell.tasks
    }
    n_sets = len(records[0]["tasks"][cell.tasks[0]])
    sets = [[statistics.fmean(rec["tasks"][t][d]["acc"] for t in cell.tasks) for d in range(n_sets)] for rec in records]
    overall = {
        m: _mean_std([_fmean([rec["tasks"][t][d][m] for t in cell.tasks]) for rec in records for d in range(n_sets)])
        for m in METRICS
    }
    summary = {
        "name": cell.name,
        "method": cell.method,
        "changes": dict(cell.changes),
        "prompts": cell.prompts,
        "tasks": list(cell.tasks),
        "seeds_done": [rec["seed"] for rec in records],
        "overall": overall,
        "per_seed_acc": [mean_std(s)["mean"] for s in sets],
        "per_task": per_task,
    }
    if all("train_seconds" in rec for rec in records):  # generators and the multi-task LoRA
        summary["train_seconds"] = mean_std([rec["train_seconds"] for rec in records])
    if cell.method == GENERATOR:
        summary["n_params"] = records[0]["n_params"]
        curves = records[0].get("curves") or loss_curves(Path(records[0]["generator"]) / "log.jsonl")
        summary["loss_curve"] = curves["loss"]
    if "n_train" in records[0]:
        summary["n_train"] = records[0]["n_train"]
    if METHODS[cell.method].picks:
        summary["retrieved"] = {
            t: sorted({r["retrieved"] for rec in records for r in rec["tasks"][t]}) for t in cell.tasks
        }
    return summary


def _fmean(xs: list[float | None]) -> float | None:
    """The mean, or None where a metric is undefined for the method (a mixture's parameter MSE)."""
    return None if any(x is None for x in xs) else statistics.fmean(xs)


def _mean_std(xs: list[float | None]) -> dict | None:
    """``mean_std``, or None where the metric is undefined for the method (the report shows a dash)."""
    return None if any(x is None for x in xs) else mean_std(xs)


def write_results(
    preset: Preset,
    store: CellStore,
    results_dir: Path,
    cells: list[Cell],
    rq: str,
    domains: dict[str, str],
    deltas: dict[str, torch.Tensor],
) -> Path:
    """``<results_dir>/<rq>.json`` from the cells of ``rq`` that have run (the rest listed as not run);
    adds the first adapter set's δ of the RQ1/RQ2 cells to ``deltas`` (for the report's δ map)."""
    ex = preset.experiment
    rows, not_run = {}, []
    # tables show the main grid's reference rows first, then cells in run order
    for cell in sorted((c for c in cells if c.rq == rq), key=lambda c: "main grid" not in c.name):
        records = store.records(cell, ex.seeds)  # read once: each read loads the committed copies' δ sidecars
        s = summarize(records, cell)
        if s is None:
            not_run.append(cell.name)
            continue
        rows[cell.name] = s
        for t, rs in records[0]["tasks"].items() if rq in ("rq1", "rq2") else ():
            if "delta" in rs[0]:  # the workspace's whole record; a committed copy has no δ
                # device: cpu - δ read back from a cell's JSON, bound for a file
                deltas[f"{cell.rq}|{cell.name}|{t}"] = torch.tensor(rs[0]["delta"])
    out = {
        "rq": rq,
        "version": RESULTS_VERSION,
        "preset": preset.name,
        "base": preset.base,
        "experiment": dataclasses.asdict(ex),
        "generator_steps": ex.steps,
        "cells": rows,
        "not_run": not_run,
        "domains": domains,
    }
    f = results_dir / f"{rq}.json"
    atomic_write_json(f, out)
    return f


def read_results(results_dir: Path) -> dict[str, dict]:
    """Every result file of a folder by part name (``rq1`` ... ``ablations``); files from before versioning are
    version 1; a newer version is refused with the file named."""
    files = sorted(results_dir.glob("rq*.json")) + sorted(results_dir.glob("ablations.json"))
    out = {}
    for f in files:
        r = read_json(f, "experiment results")
        if r.get("version", 1) != RESULTS_VERSION:
            raise ArtifactError(
                f"{f}: results of format version {r.get('version')}, this deltalora reads version {RESULTS_VERSION}"
            )
        out[f.stem] = r
    return out


def loss_curves(log_file: Path, points: int = 100) -> dict[str, list[list[float]]]:
    """A generator's training loss (about ``points`` steps of it) and every validation loss, as [step, value]
    pairs, from its ``log.jsonl`` (empty where the log is gone, e.g. on a fresh machine)."""
    if not log_file.exists():
        return {"loss": [], "val_loss": []}
    rows = [json.loads(ln) for ln in log_file.read_text().splitlines() if ln]
    every = max(1, len(rows) // points)
    return {
        "loss": [[r["step"], round(r["loss"], 6)] for r in rows[::every]],
        "val_loss": [[r["step"], round(r["val_loss"], 6)] for r in rows if "val_loss" in r],
    }
