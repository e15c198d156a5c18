"""Scoring generated adapters against the zoo: accuracy, parameter MSE, δ distance and cosine.

Conditioning prompts are drawn from a task's train split only; accuracy is measured on
its test split, so no scored item ever conditions the generator.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
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
from .evaluate import accuracy, answer_logprobs
from .generator import choose_prompts, generate_tensors, load_generator
from .io import read_json
from .models import load_base
from .registry import TaskSpec
from .retrieval import is_retrieval, retrieve
from .tasks import load_task, resolve_spec, stable_seed
from .zoo import zoo_dir


def mean_std(xs: list[float]) -> dict:
    sig = lambda x: float(f"{x:.4g}")  # noqa: E731 - 4 significant digits: MSEs are ~1e-4
    return {"mean": sig(statistics.fmean(xs)), "std": sig(statistics.pstdev(xs)) if len(xs) > 1 else 0.0, "n": len(xs)}


@dataclass
class TaskRef:
    """What every adapter scored on a task is compared with, computed once."""

    items: list
    """The scored test items (the first n_test of the test split)."""
    ref_tensors: list[dict[str, torch.Tensor]]
    """The task's final reference adapters (one per zoo seed)."""
    ref_delta: torch.Tensor
    """Their mean δ."""
    ref_logprobs: torch.Tensor
    """Answer-position log-distribution of the first reference adapter on the KL prompts."""
    kl_prompts: list[str]
    ref_acc: list[float]
    base_acc: float


class Scorer:
    """Scores LoRA tensors (or the PEFT model as it is) on a task's test items, against the
    task's reference adapters: accuracy, parameter MSE, δ distance and cosine, and the KL
    from the reference to the adapter at the answer position."""

    def __init__(self, preset: Preset, workspace: str | Path, n_test: int | None = None, n_kl: int = 8,
                 extra: list[TaskSpec] | None = None):
        self.preset, self.n_test, self.n_kl, self.extra = preset, n_test, n_kl, extra
        self.root = zoo_dir(workspace)
        self.manifest = read_json(self.root / "manifest.json", "zoo manifest")
        self.deltas = load_deltas(workspace, preset.delta.n_probes)
        self.finals = [c for c in self.manifest if c["final"] and not c.get("pair_of")]
        base, self.tok = load_base(preset.base)
        self.swapper = AdapterSwapper(base, PeftConfig.from_pretrained(str(self.root / self.finals[0]["path"])), preset.base)
        self.model = self.swapper.model
        self.probe = DeltaProbe(self.tok, preset.delta)
        with self.model.disable_adapter():
            self.probe.set_base(self.model)
        self._refs: dict[str, TaskRef] = {}

    def final_adapters(self, task: str) -> list[dict]:
        return [c for c in self.finals if c["task"] == task]

    def ref(self, name: str) -> TaskRef:
        if name not in self._refs:
            task = load_task(resolve_spec(name, self.extra), self.preset.tasks)
            items = task.test[: self.n_test] if self.n_test else task.test
            refs = self.final_adapters(name)
            if not refs:
                raise ValueError(f"{self.root / 'manifest.json'}: no final reference adapter for task {name}")
            tensors = [load_file(self.root / c["path"] / "adapter_model.safetensors") for c in refs]
            kl_prompts = [it.prompt for it in items[: self.n_kl]]
            ref_acc = []
            for t in tensors:
                self.swapper.set_tensors(t)
                ref_acc.append(self._acc(items))
            self.swapper.set_tensors(tensors[0])
            ref_lp = self._logprobs(kl_prompts)
            with self.model.disable_adapter():
                base_acc = self._acc(items)
            self._refs[name] = TaskRef(items, tensors, torch.stack([self.deltas[c["path"]] for c in refs]).mean(0),
                                       ref_lp, kl_prompts, ref_acc, base_acc)
        return self._refs[name]

    def _acc(self, items) -> float:
        return accuracy(self.model, self.tok, items, self.preset.zoo.eval_batch_size, self.preset.zoo.max_length)

    @torch.inference_mode()
    def _logprobs(self, prompts: list[str]) -> torch.Tensor:
        return answer_logprobs(self.model, self.tok, prompts, self.preset.zoo.max_length)

    def score(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of rank-r LoRA tensors of the zoo's layout on task ``name``."""
        self.ref(name)  # computed before the swap: it sets the reference tensors itself
        self.swapper.set_tensors(tensors)
        out = self.score_active(name)
        out["param_mse"] = self.param_mse(name, tensors)
        return out

    def param_mse(self, name: str, tensors: dict[str, torch.Tensor] | None) -> float:
        """Mean squared difference to each reference adapter (None: the base model, a zero update)."""
        refs = self.ref(name).ref_tensors
        return statistics.fmean(statistics.fmean(((r[k] - (tensors[k] if tensors else 0)) ** 2).mean().item() for k in r)
                                for r in refs)

    def score_active(self, name: str) -> dict[str, float]:
        """Metrics of the PEFT model with whatever adapter is active now (e.g. a merged one)."""
        ref = self.ref(name)
        delta = self.last_delta = self.probe.delta(self.model)
        lp = self._logprobs(ref.kl_prompts)
        kl = (ref.ref_logprobs.exp() * (ref.ref_logprobs - lp)).sum(-1).mean().item()
        return {"acc": self._acc(ref.items), "delta_dist": (delta - ref.ref_delta).norm().item(),
                "delta_cos": cos(delta, ref.ref_delta), "kl": kl}

    def close(self) -> None:
        self.swapper.unload()


def assess_generator(preset: Preset, workspace: str | Path, gen_dir: str | Path, tasks: list[str], n_draws: int = 2,
                     n_test: int | None = None, extra: list[TaskSpec] | None = None) -> dict:
    """Per task and overall: accuracy of generated adapters (mean ± std over prompt draws) and
    how close they are to the task's reference checkpoints in weights and in δ."""
    workspace, gen_dir = Path(workspace), Path(gen_dir)
    scorer = Scorer(preset, workspace, n_test, extra=extra)
    encoder = PromptEncoder()  # no persistent cache: generation time includes encoding the prompts
    retrieval = is_retrieval(gen_dir)
    if not retrieval:
        model, tokenizer, _, gconf = load_generator(gen_dir)
        n_prompts = gconf["preset"]["generator"]["n_prompts"]
    per_task, gen_seconds = {}, []
    try:
        for name in tqdm(tasks, desc=f"assess {gen_dir.name}", unit="task"):
            prompts = [it.prompt for it in load_task(resolve_spec(name, extra), preset.tasks).train]
            rows = []
            for d in range(n_draws):
                t0 = time.perf_counter()
                if retrieval:
                    _, folder = retrieve(gen_dir, choose_prompts(prompts, min(32, len(prompts)), stable_seed(name, d)), encoder)
                    tensors = read_adapter(folder)[1]
                else:
                    tensors = generate_tensors(model, tokenizer, encoder, prompts, n_prompts, stable_seed(name, d))
                gen_seconds.append(time.perf_counter() - t0)
                rows.append(scorer.score(name, tensors))
            ref = scorer.ref(name)
            per_task[name] = {k: mean_std([r[k] for r in rows]) for k in rows[0]}
            per_task[name]["reference_acc"] = mean_std(ref.ref_acc)
            per_task[name]["base_acc"] = ref.base_acc
            per_task[name]["n_test"] = len(ref.items)
    finally:
        scorer.close()
    overall = {k: mean_std([per_task[t][k]["mean"] for t in tasks]) for k in ("acc", "reference_acc", "param_mse", "delta_dist", "delta_cos", "kl")}
    overall["base_acc"] = mean_std([per_task[t]["base_acc"] for t in tasks])
    return {"generator": str(gen_dir), "tasks": per_task, "overall": overall, "n_draws": n_draws,
            "generation_seconds": mean_std(gen_seconds)}
