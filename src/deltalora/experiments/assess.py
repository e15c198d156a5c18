"""``deltalora assess``: generated adapters of trained generators (or a retrieval index) scored on tasks."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from deltalora.config import Preset
from deltalora.data.items import stable_seed
from deltalora.data.registry import TaskSpec
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.experiments.grid import METRICS
from deltalora.experiments.scoring import Scorer, mean_std
from deltalora.generator.artifact import load_generator
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.generate import choose_prompts, generate_tensors
from deltalora.generator.retrieval import is_retrieval, retrieve
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import read_adapter


def assess_generator(
    preset: Preset,
    ws: Workspace,
    gen_dir: str | Path,
    tasks: list[str],
    n_draws: int = 2,
    n_test: int | None = None,
    extra: list[TaskSpec] | None = None,
    encoder: PromptEncoder | None = None,
) -> dict:
    """Per task and overall: accuracy of generated adapters (mean ± std over prompt draws) and
    how close they are to the task's reference checkpoints in weights and in δ. Without an ``encoder``
    a fresh one without a persistent cache is used, so generation time includes encoding the prompts."""
    gen_dir = Path(gen_dir)
    scorer = Scorer(preset, ws, n_test, extra=extra)
    encoder = encoder or PromptEncoder(device=scorer.device)
    gen = None if is_retrieval(gen_dir) else load_generator(gen_dir, scorer.device)
    per_task, gen_seconds = {}, []
    try:
        for name in tqdm(tasks, desc=f"assess {gen_dir.name}", unit="task"):
            prompts = [it.prompt for it in load_task(resolve_spec(name, extra), preset.tasks).train]
            rows = []
            for d in range(n_draws):
                t0 = time.perf_counter()
                if gen is None:
                    _, folder = retrieve(
                        gen_dir, choose_prompts(prompts, min(32, len(prompts)), stable_seed(name, d)), encoder
                    )
                    tensors = read_adapter(folder)[1]
                else:
                    tensors = generate_tensors(gen, encoder, prompts, stable_seed(name, d))
                gen_seconds.append(time.perf_counter() - t0)
                rows.append(scorer.score(name, tensors)[0])
            ref = scorer.ref(name)
            per_task[name] = {k: mean_std([r[k] for r in rows]) for k in METRICS}
            per_task[name]["hits"] = [r["hits"] for r in rows]  # per draw, per item: for paired comparisons
            per_task[name]["reference_acc"] = mean_std(ref.ref_acc)
            per_task[name]["base_acc"] = ref.base_acc
            per_task[name]["n_test"] = len(ref.items)
    finally:
        scorer.close()
    overall = {
        k: mean_std([per_task[t][k]["mean"] for t in tasks])
        for k in ("acc", "reference_acc", "param_mse", "delta_dist", "delta_cos", "kl")
    }
    overall["base_acc"] = mean_std([per_task[t]["base_acc"] for t in tasks])
    return {
        "generator": str(gen_dir),
        "tasks": per_task,
        "overall": overall,
        "n_draws": n_draws,
        "generation_seconds": mean_std(gen_seconds),
    }
