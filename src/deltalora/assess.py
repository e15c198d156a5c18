"""Scoring generated adapters against the zoo: accuracy, parameter MSE, δ distance and cosine.

Conditioning prompts are drawn from a task's train split only; accuracy is measured on
its test split, so no scored item ever conditions the generator.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from peft import PeftConfig
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .adapters import AdapterSwapper, read_adapter
from .analysis import cos
from .config import Preset
from .delta import DeltaProbe, load_deltas
from .encoder import PromptEncoder
from .evaluate import accuracy
from .generator import choose_prompts, generate_tensors, load_generator
from .io import read_json
from .models import load_base
from .registry import TaskSpec
from .retrieval import is_retrieval, retrieve
from .tasks import load_task, resolve_spec, stable_seed
from .zoo import zoo_dir


_SAME_ITEMS_CACHE: dict[tuple, float] = {}


def mean_std(xs: list[float]) -> dict:
    sig = lambda x: float(f"{x:.4g}")  # noqa: E731 - 4 significant digits: MSEs are ~1e-4
    return {"mean": sig(statistics.fmean(xs)), "std": sig(statistics.pstdev(xs)) if len(xs) > 1 else 0.0, "n": len(xs)}


def _same_items_acc(swapper: AdapterSwapper, tok, preset: Preset, items, key: tuple, tensors) -> float:
    """Accuracy of given tensors (or of the model as it is, for None) on ``items``, once per process."""
    if key not in _SAME_ITEMS_CACHE:
        if tensors is not None:
            swapper.set_tensors(tensors)
        _SAME_ITEMS_CACHE[key] = accuracy(swapper.model, tok, items, preset.zoo.eval_batch_size, preset.zoo.max_length)
    return _SAME_ITEMS_CACHE[key]


def assess_generator(preset: Preset, workspace: str | Path, gen_dir: str | Path, tasks: list[str], n_draws: int = 2,
                     n_test: int | None = None, extra: list[TaskSpec] | None = None) -> dict:
    """Per task and overall: accuracy of generated adapters (mean ± std over prompt draws) and
    how close they are to the task's reference checkpoints in weights and in δ."""
    workspace, gen_dir = Path(workspace), Path(gen_dir)
    root = zoo_dir(workspace)
    manifest = read_json(root / "manifest.json", "zoo manifest")
    deltas = load_deltas(workspace, preset.delta.n_probes)
    base, tok = load_base(preset.base)
    encoder = PromptEncoder()  # no persistent cache: generation time includes encoding the prompts
    retrieval = is_retrieval(gen_dir)
    if not retrieval:
        model, tokenizer, _, gconf = load_generator(gen_dir)
        n_prompts = gconf["preset"]["generator"]["n_prompts"]
    finals = [c for c in manifest if c["final"] and not c.get("pair_of")]
    swapper = AdapterSwapper(base, PeftConfig.from_pretrained(str(root / finals[0]["path"])), preset.base)
    probe = DeltaProbe(tok, preset.delta)
    with swapper.model.disable_adapter():
        probe.set_base(swapper.model)
    per_task, gen_seconds = {}, []
    try:
        for name in tqdm(tasks, desc=f"assess {gen_dir.name}", unit="task"):
            task = load_task(resolve_spec(name, extra), preset.tasks)
            test = task.test[:n_test] if n_test else task.test
            refs = [c for c in finals if c["task"] == name]
            ref_tensors = [load_file(root / c["path"] / "adapter_model.safetensors") for c in refs]
            ref_delta = torch.stack([deltas[c["path"]] for c in refs]).mean(0)
            rows = []
            for d in range(n_draws):
                prompts = [it.prompt for it in task.train]
                t0 = time.perf_counter()
                if retrieval:
                    _, folder = retrieve(gen_dir, choose_prompts(prompts, min(32, len(prompts)), stable_seed(name, d)), encoder)
                    tensors = read_adapter(folder)[1]
                else:
                    tensors = generate_tensors(model, tokenizer, encoder, prompts, n_prompts, stable_seed(name, d))
                gen_seconds.append(time.perf_counter() - t0)
                swapper.set_tensors(tensors)
                acc = accuracy(swapper.model, tok, test, preset.zoo.eval_batch_size, preset.zoo.max_length)
                delta = probe.delta(swapper.model)
                mse = statistics.fmean(statistics.fmean(((tensors[k] - r[k]) ** 2).mean().item() for k in r) for r in ref_tensors)
                rows.append({"acc": acc, "param_mse": mse, "delta_dist": (delta - ref_delta).norm().item(),
                             "delta_cos": cos(delta, ref_delta)})
            # References and the base are scored on the same items as the generated adapters.
            ref_acc = [_same_items_acc(swapper, tok, preset, test, ("ref", str(root / c["path"]), len(test)), t)
                       for c, t in zip(refs, ref_tensors)]
            with swapper.model.disable_adapter():
                base_acc = _same_items_acc(swapper, tok, preset, test, ("base", str(root), name, len(test)), None)
            per_task[name] = {k: mean_std([r[k] for r in rows]) for k in rows[0]}
            per_task[name]["reference_acc"] = mean_std(ref_acc)
            per_task[name]["base_acc"] = base_acc
            per_task[name]["n_test"] = len(test)
    finally:
        swapper.unload()
    overall = {k: mean_std([per_task[t][k]["mean"] for t in tasks]) for k in ("acc", "reference_acc", "param_mse", "delta_dist", "delta_cos")}
    overall["base_acc"] = mean_std([per_task[t]["base_acc"] for t in tasks])
    return {"generator": str(gen_dir), "tasks": per_task, "overall": overall, "n_draws": n_draws,
            "generation_seconds": mean_std(gen_seconds)}
