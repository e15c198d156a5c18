"""The research questions (RQ1-RQ4), ablations and negative controls as a grid of cached cells.

A *generator run* (config changes, training tasks, seed) is trained once under
``<workspace>/experiments/generators/<id>/`` and shared by every cell that scores it. A
*cell* scores one method on a list of tasks; its result for each generator seed is cached
as ``<workspace>/experiments/cells/<cell>/seed<k>.json``, so a rerun skips finished work
and a killed run resumes (a generator's training resumes from its own checkpoint).

Conditioning prompts always come from a task's train split and scored items from its test
split, so no scored item ever conditions a generator. After every cell the RQ's result
file is rewritten from the cache, so whatever has finished is on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from .assess import Scorer, mean_std
from .config import ConfigError, Preset
from .encoder import PromptEncoder
from .generator import choose_prompts, generate_tensors, load_generator, train_generator
from .io import atomic_write_bytes, atomic_write_json, read_json
from .registry import TaskSpec
from .retrieval import build_retrieval, retrieve
from .tasks import load_task, resolve_spec, stable_seed

RQS = ("rq1", "rq2", "rq2_lodo", "rq3", "rq4", "ablations")
METRICS = ("acc", "param_mse", "delta_dist", "delta_cos", "kl")


@dataclass(frozen=True)
class Cell:
    """One method scored on a list of tasks."""

    rq: str
    """The result file it belongs to (one of ``RQS``)."""
    name: str
    """Row label in the tables."""
    method: str
    """generator | base | oracle | train_avg | retrieval."""
    tasks: tuple[str, ...]
    """Tasks whose test items are scored."""
    train: tuple[str, ...] = ()
    """Training tasks of the generator, the retrieval index or the averaged adapters."""
    changes: tuple[tuple[str, Any], ...] = ()
    """GeneratorConfig fields that differ from the preset (the variant among them)."""
    prompts: str = "own"
    """own: the scored task's train prompts; other: train prompts of a task from another domain."""

    @property
    def id(self) -> str:
        return f"{self.rq}__" + "".join(c if c.isalnum() or c in "._-" else "_" for c in self.name)

    @property
    def seeded(self) -> bool:
        return self.method in ("generator", "retrieval")


def plan(preset: Preset, domains: dict[str, str]) -> list[Cell]:
    """Every cell, most important first (a partial run then still answers RQ1 and RQ2)."""
    ex = preset.experiment
    train = tuple(t for t in preset.pool if t not in ex.held_out)
    seen, held = ex.seen_eval, ex.held_out
    cells: list[Cell] = []
    for rq, tasks in (("rq1", seen), ("rq2", held)):
        cells += [Cell(rq, "base model", "base", tasks), Cell(rq, "oracle (the task's own LoRA)", "oracle", tasks),
                  Cell(rq, "mean of training adapters", "train_avg", tasks, train),
                  Cell(rq, "retrieval", "retrieval", tasks, train)]
    for v in ex.variants:
        cells += [Cell(rq, v, "generator", tasks, train, (("variant", v),)) for rq, tasks in (("rq1", seen), ("rq2", held))]
    if ex.long_steps and "dnd" in ex.variants:  # dnd is cheap per step: also give it the exact-δ variants' wall time
        cells += [Cell(rq, f"dnd, {ex.long_steps} steps (compute-matched)", "generator", tasks, train,
                       (("variant", "dnd"), ("steps", ex.long_steps))) for rq, tasks in (("rq1", seen), ("rq2", held))]
    a = ex.ablation_variant
    # the main grid's generators on the ablation and RQ3 tasks: their scores are shared, nothing is recomputed
    main_rows = [Cell("ablations", f"{v} (main grid{': no δ loss' if v == 'dnd' else ', |P|=5, λ_δ=1'})", "generator",
                      seen + held, train, (("variant", v),)) for v in dict.fromkeys(("dnd", a)) if v in ex.variants]
    main_rows += [Cell("rq3", f"{v}, all data, clean (main grid)", "generator", seen, train, (("variant", v),))
                  for v in ex.rq3_variants if v in ex.variants]
    shuffled = [Cell("ablations", f"{a}, δ shuffled across tasks (control)", "generator", seen + held, train,
                     (("variant", a), ("shuffle_delta", True)))]
    other = [Cell("ablations", f"{v}, prompts of another domain (control)", "generator", seen + held, train,
                  (("variant", v),), prompts="other") for v in ("dnd", a) if v in ex.variants]
    lodo: list[Cell] = []
    if ex.lodo_domain:
        lodo_train = tuple(t for t in preset.pool if domains[t] != ex.lodo_domain)
        lodo_eval = ex.lodo_eval or tuple(t for t in preset.pool if domains[t] == ex.lodo_domain)
        lodo += [Cell("rq2_lodo", "base model", "base", lodo_eval), Cell("rq2_lodo", "oracle (the task's own LoRA)", "oracle", lodo_eval),
                 Cell("rq2_lodo", "mean of training adapters", "train_avg", lodo_eval, lodo_train),
                 Cell("rq2_lodo", "retrieval", "retrieval", lodo_eval, lodo_train)]
        lodo += [Cell("rq2_lodo", v, "generator", lodo_eval, lodo_train, (("variant", v),)) for v in ex.lodo_variants]
    rq3 = {v: [Cell("rq3", f"{v}, {f:.0%} of the data", "generator", seen, train, (("variant", v), ("data_fraction", f)))
               for f in ex.fractions]
              + [Cell("rq3", f"{v}, weight noise σ={s:g}", "generator", seen, train, (("variant", v), ("weight_noise", s)))
                 for s in ex.weight_noise]
              + [Cell("rq3", f"{v}, {m:.0%} mislabelled", "generator", seen, train, (("variant", v), ("mislabel_fraction", m)))
                 for m in ex.mislabel] for v in ex.rq3_variants}
    cheap_rq3 = [c for v, cs in rq3.items() if v in ("dnd", "A1") for c in cs]
    costly_rq3 = [c for v, cs in rq3.items() if v not in ("dnd", "A1") for c in cs]
    sweeps = [Cell("ablations", f"{a}, |P|={p}", "generator", seen + held, train, (("variant", a), ("n_probes", p)))
              for p in ex.probe_sizes]
    sweeps += [Cell("ablations", f"{a}, λ_δ={lam:g}", "generator", seen + held, train, (("variant", a), ("lambda_delta", lam)))
               for lam in ex.lambdas]
    # run order = priority: the negative control and every protocol before the costlier sweeps
    cells += main_rows + shuffled + lodo + cheap_rq3 + other + costly_rq3 + sweeps
    return cells


@contextlib.contextmanager
def claimed(path: Path, block: bool = False) -> Iterator[bool]:
    """An exclusive lock on ``path``; without ``block``, False while another process works on it.

    Lets several ``deltalora experiment`` processes share one grid: each takes the cells
    nobody holds, and revisits the skipped ones at the end (by then usually finished).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def generator_preset(preset: Preset, cell: Cell, seed: int) -> Preset:
    """The preset a cell's generator of this seed is trained with."""
    ex = preset.experiment
    gen = dataclasses.replace(preset.generator, **{"steps": ex.steps, "stage1_steps": ex.steps, "seed": seed, **dict(cell.changes)})
    return preset.replace(generator=gen)


class Runner:
    """Holds the scorer, encoder and caches of one experiment invocation."""

    def __init__(self, preset: Preset, workspace: Path, results_dir: Path, extra: list[TaskSpec] | None = None):
        self.preset, self.ws, self.results_dir, self.extra = preset, workspace, results_dir, extra
        self.root = workspace / "experiments"
        self.tasks = {n: load_task(resolve_spec(n, extra), preset.tasks) for n in preset.pool}
        self.domains = {n: t.domain for n, t in self.tasks.items()}
        self.scorer = Scorer(preset, workspace, preset.experiment.n_test, preset.experiment.n_kl, extra)
        self.encoder = PromptEncoder(workspace / "cache" / "prompt_embeddings.safetensors")
        self._scored: dict[tuple, dict] = {}  # identical adapters (retrieval hits) are scored once
        self._mean_adapters: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    # ---------------------------------------------------------------- generators
    def generator_dir(self, preset: Preset, train: tuple[str, ...]) -> Path:
        key = json.dumps({"generator": dataclasses.asdict(preset.generator), "train": train}, sort_keys=True, default=str)
        return self.root / "generators" / hashlib.sha256(key.encode()).hexdigest()[:16]

    def trained_generator(self, cell: Cell, seed: int) -> Path:
        preset = generator_preset(self.preset, cell, seed)
        out = self.generator_dir(preset, cell.train)
        out.parent.mkdir(parents=True, exist_ok=True)
        # two experiment processes (e.g. --only rq1 and --only rq3) may need the same generator: one trains, one waits
        with claimed(out.parent / f"{out.name}.lock", block=True):
            if not (out / "generator.safetensors").exists():
                train_generator(preset, self.ws, out, list(cell.train), self.extra, progress=False)
        return out

    def retrieval_index(self, train: tuple[str, ...]) -> Path:
        out = self.root / "retrieval" / hashlib.sha256("|".join(train).encode()).hexdigest()[:16]
        with claimed(out.parent / f"{out.name}.lock", block=True):
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
        if key is not None and (task, *key) in self._scored:
            return self._scored[(task, *key)]
        if tensors is None:
            self.scorer.ref(task)  # computed with the adapter enabled, before disabling it
            with self.scorer.model.disable_adapter():
                out = self.scorer.score_active(task)
            out["param_mse"] = self.scorer.param_mse(task, None)
        else:
            out = self.scorer.score(task, tensors)
        out["delta"] = [round(x, 6) for x in self.scorer.last_delta.tolist()]
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
            with claimed(f.with_suffix(".lock"), block=wait) as mine:
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
            gen_dir = self.trained_generator(cell, seed)
            model, tokenizer, _, gconf = load_generator(gen_dir)
            record.update(generator=str(gen_dir), train_seconds=gconf["train_seconds"], n_params=gconf["n_params"])
            n = gconf["preset"]["generator"]["n_prompts"]
            for task in cell.tasks:
                # scores are keyed by generator, prompt source and task, so cells that share them score once
                key = self.root / "scores" / f"{gen_dir.name}__{cell.prompts}__d{ex.draws}n{ex.n_test}__{task}.json"
                if not key.exists():
                    prompts = self.condition_prompts(cell, task)
                    atomic_write_json(key, [
                        self.score(task, generate_tensors(model, tokenizer, self.encoder, prompts, n, stable_seed(task, seed, d)))
                        for d in range(ex.draws)])
                record["tasks"][task] = read_json(key, "experiment scores")
        elif cell.method == "retrieval":
            index = self.retrieval_index(cell.train)
            for task in cell.tasks:
                rows = []
                for d in range(ex.draws):
                    prompts = choose_prompts(self.condition_prompts(cell, task), self.preset.generator.n_prompts,
                                             stable_seed(task, seed, d))
                    hit, folder = retrieve(index, prompts, self.encoder)
                    rows.append({**self.score(task, load_file(folder / "adapter_model.safetensors"), ("retrieval", hit)),
                                 "retrieved": hit})
                record["tasks"][task] = rows
        else:
            for task in cell.tasks:
                record["tasks"][task] = [self.score(task, self.fixed_adapter(cell, task))]
        record["seconds"] = time.perf_counter() - t0
        atomic_write_json(f, record)

    def fixed_adapter(self, cell: Cell, task: str) -> dict[str, torch.Tensor] | None:
        if cell.method == "base":
            return None
        if cell.method == "oracle":
            return self.scorer.ref(task).ref_tensors[0]
        if cell.train not in self._mean_adapters:  # one average per training set, not one per scored task
            finals = [self.scorer.final_adapters(t)[0] for t in cell.train]
            sds = [load_file(self.scorer.root / c["path"] / "adapter_model.safetensors") for c in finals]
            self._mean_adapters[cell.train] = {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0]}
        return self._mean_adapters[cell.train]

    # ---------------------------------------------------------------- results
    def summarize(self, cell: Cell) -> dict | None:
        out_dir = self.root / "cells" / cell.id
        files = sorted(out_dir.glob("seed*.json")) + sorted(out_dir.glob("all.json"))
        if not files:
            return None
        records = [read_json(f, "experiment cell") for f in files]
        per_task = {t: {m: mean_std([r[m] for rec in records for r in rec["tasks"][t]]) for m in METRICS} for t in cell.tasks}
        n_sets = len(records[0]["tasks"][cell.tasks[0]])
        sets = [[statistics.fmean(rec["tasks"][t][d]["acc"] for t in cell.tasks) for d in range(n_sets)] for rec in records]
        overall = {m: mean_std([statistics.fmean(rec["tasks"][t][d][m] for t in cell.tasks) for rec in records for d in range(n_sets)])
                   for m in METRICS}
        summary = {"name": cell.name, "method": cell.method, "changes": dict(cell.changes), "prompts": cell.prompts,
                   "tasks": list(cell.tasks), "seeds_done": [rec["seed"] for rec in records], "overall": overall,
                   "per_seed_acc": [mean_std(s)["mean"] for s in sets], "per_task": per_task}
        if cell.method == "generator":
            summary["train_seconds"] = mean_std([rec["train_seconds"] for rec in records])
            summary["n_params"] = records[0]["n_params"]
            summary["loss_curve"] = _loss_curve(Path(records[0]["generator"]) / "log.jsonl")
        if cell.method == "retrieval":
            summary["retrieved"] = {t: sorted({r["retrieved"] for rec in records for r in rec["tasks"][t]}) for t in cell.tasks}
        return summary

    def write_results(self, cells: list[Cell], rq: str, deltas: dict[str, torch.Tensor]) -> Path:
        ex = self.preset.experiment
        rows, not_run = {}, []
        # tables show the main grid's reference rows first, then cells in run order
        for cell in sorted((c for c in cells if c.rq == rq), key=lambda c: "main grid" not in c.name):
            s = self.summarize(cell)
            if s is None:
                not_run.append(cell.name)
                continue
            rows[cell.name] = s
            for rec_f in sorted((self.root / "cells" / cell.id).glob("*.json"))[:1] if rq in ("rq1", "rq2") else []:
                for t, rs in read_json(rec_f)["tasks"].items():
                    deltas[f"{cell.rq}|{cell.name}|{t}"] = torch.tensor(rs[0]["delta"])
        out = {"rq": rq, "preset": self.preset.name, "base": self.preset.base, "experiment": dataclasses.asdict(ex),
               "generator_steps": ex.steps, "cells": rows, "not_run": not_run, "domains": self.domains}
        f = self.results_dir / f"{rq}.json"
        atomic_write_json(f, out)
        return f


def _loss_curve(log_file: Path, points: int = 100) -> list[list[float]]:
    if not log_file.exists():
        return []
    rows = [json.loads(ln) for ln in log_file.read_text().splitlines() if ln]
    every = max(1, len(rows) // points)
    return [[r["step"], round(r["loss"], 6)] for r in rows[::every]]


def run_experiment(preset: Preset, workspace: str | Path, results_dir: str | Path, only: list[str] | None = None,
                   extra: list[TaskSpec] | None = None, progress: bool = True) -> dict[str, Path]:
    """Run (or resume) every cell of the grid, or only those of the RQs in ``only``; returns the result files."""
    from .composition import run_composition

    unknown = sorted(set(only or ()) - set(RQS))
    if unknown:
        raise ValueError(f"--only: unknown part(s) {unknown}; choose from {', '.join(RQS)}")
    for field in ("held_out", "seen_eval", "lodo_eval"):
        stray = [t for t in getattr(preset.experiment, field) if t not in preset.pool]
        if stray:
            raise ConfigError(f"experiment.{field}: {stray} not in the preset's pool")
    workspace, results_dir = Path(workspace), Path(results_dir)
    runner = Runner(preset, workspace, results_dir, extra)
    cells = plan(preset, runner.domains)
    wanted = set(only or RQS)
    main = [c for c in cells if c.rq in wanted and c.rq in ("rq1", "rq2")]
    # composition right after the main grid: it reuses the main generators
    todo: list = main + (["rq4"] if "rq4" in wanted else []) + [c for c in cells if c.rq in wanted and c not in main]
    atomic_write_json(workspace / "experiments" / "config.json", preset.to_dict())
    deltas: dict[str, torch.Tensor] = {f"ref|{t}": runner.scorer.ref(t).ref_delta for t in preset.pool
                                       if t in {*preset.experiment.seen_eval, *preset.experiment.held_out}}
    files: dict[str, Path] = {}
    skipped: list[Cell] = []
    try:
        bar = tqdm(todo, desc="experiment", unit="cell", disable=not progress)
        for cell in bar:
            if cell == "rq4":
                bar.set_postfix_str("rq4 composition")
                files["rq4"] = run_composition(runner, cells)
                continue
            bar.set_postfix_str(f"{cell.rq}: {cell.name}")
            if not runner.run_cell(cell):
                skipped.append(cell)
            files[cell.rq] = runner.write_results(cells, cell.rq, deltas)
        for cell in skipped:  # held by another process when we passed: wait for it, then take what is left
            runner.run_cell(cell, wait=True)
            files[cell.rq] = runner.write_results(cells, cell.rq, deltas)
        for rq in wanted - {"rq4"}:
            files[rq] = runner.write_results(cells, rq, deltas)
    finally:
        runner.scorer.close()
    atomic_write_bytes(results_dir / "deltas.safetensors", save({k: v.float().contiguous() for k, v in deltas.items()}))
    return files
