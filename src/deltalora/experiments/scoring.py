"""Scoring adapters against the zoo: accuracy, parameter MSE, δ distance and cosine, KL to the reference.

Conditioning prompts are drawn from a task's train split only; accuracy is measured on
its test split, so no scored item ever conditions a generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from deltalora.config import Preset
from deltalora.data.items import Item
from deltalora.data.registry import TaskSpec
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.delta.analysis import cos
from deltalora.delta.compute import load_deltas
from deltalora.delta.probes import DeltaProbe
from deltalora.device import runtime
from deltalora.errors import ArtifactError
from deltalora.io import atomic_write_bytes
from deltalora.lm.evaluate import answer_token_logprobs, hits
from deltalora.lm.models import load_base
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import AdapterSwapper, check_adapter
from deltalora.zoo.manifest import Checkpoint, Manifest

_SCORED = "scored"
"""PEFT name of an adapter folder loaded for scoring beside the swapper's ``default``."""


def mean_std(xs: list[float]) -> dict:
    """Mean, population std and n of a list, to 4 significant digits (MSEs are ~1e-4)."""

    def sig(x: float) -> float:
        return float(f"{x:.4g}")

    return {"mean": sig(statistics.fmean(xs)), "std": sig(statistics.pstdev(xs)) if len(xs) > 1 else 0.0, "n": len(xs)}


@dataclass
class TaskRef:
    """What every adapter scored on a task is compared with, computed once."""

    items: list[Item]
    """The scored test items (the first n_test of the test split)."""
    ref_tensors: list[dict[str, torch.Tensor]]
    """The task's final reference adapters (one per zoo seed)."""
    ref_delta: torch.Tensor
    """Their mean δ."""
    ref_logprobs: torch.Tensor
    """Log-distributions of the first reference adapter at every gold-answer token of the KL items."""
    kl_items: list[Item]
    """Test items on whose answer tokens the KL to the reference is measured."""
    ref_hits: list[list[int]]
    """Per-item hits of each reference adapter (reused when the oracle row scores the first one)."""
    base_hits: list[int]
    """Per-item hits of the base model (reused by the base row)."""

    @property
    def ref_acc(self) -> list[float]:
        """Accuracy of each reference adapter."""
        return [statistics.fmean(h) for h in self.ref_hits]

    @property
    def base_acc(self) -> float:
        """Accuracy of the base model."""
        return statistics.fmean(self.base_hits)


class Scorer:
    """Scores LoRA tensors (or the PEFT model as it is) on a task's test items, against the
    task's reference adapters: accuracy, parameter MSE, δ distance and cosine, and the KL
    from the reference to the adapter at the answer position. The model runs on
    ``preset.runtime``'s device, always in fp32; LoRA tensors and δ are handled on the CPU."""

    def __init__(
        self,
        preset: Preset,
        ws: Workspace,
        n_test: int | None = None,
        n_kl: int = 8,
        extra: list[TaskSpec] | None = None,
    ):
        self.preset, self.ws, self.n_test, self.n_kl, self.extra = preset, ws, n_test, n_kl, extra
        self.manifest = Manifest.from_file(ws.manifest)
        self.deltas = load_deltas(ws, preset.delta.n_probes)
        self.device = runtime(preset.runtime).device
        base, self.tok = load_base(preset.base, self.device)
        first = self.manifest.finals()[0]
        self.swapper = AdapterSwapper.like(base, ws.zoo / first.path, preset.base)
        self.model = self.swapper.model
        self.probe = DeltaProbe(self.tok, preset.delta)
        with self.model.disable_adapter():
            self.probe.set_base(self.model)
        self._refs: dict[str, TaskRef] = {}
        self._ref_tensors: dict[str, list[dict[str, torch.Tensor]]] = {}

    def final_adapters(self, task: str) -> list[Checkpoint]:
        """The task's final reference checkpoints, one per zoo seed."""
        return self.manifest.finals(task)

    def tensors(self, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        """A checkpoint's LoRA tensors."""
        return load_file(self.ws.zoo / ckpt.path / "adapter_model.safetensors")

    def ref_tensors(self, name: str) -> list[dict[str, torch.Tensor]]:
        """The LoRA tensors of the task's final reference adapters (read once: the oracle row is scored as the
        same object, so its hits are not measured twice)."""
        if name not in self._ref_tensors:
            refs = self.final_adapters(name)
            if not refs:
                raise ArtifactError(f"{self.ws.manifest}: no final reference adapter for task {name}")
            self._ref_tensors[name] = [self.tensors(c) for c in refs]
        return self._ref_tensors[name]

    def ref_delta(self, name: str) -> torch.Tensor:
        """The mean δ of the task's final reference adapters, from the zoo's δ."""
        return torch.stack([self.deltas[c.path] for c in self.final_adapters(name)]).mean(0)

    def ref(self, name: str) -> TaskRef:
        """The task's reference (computed on first use)."""
        if name not in self._refs:
            task = load_task(resolve_spec(name, self.extra), self.preset.tasks)
            items = list(task.test[: self.n_test] if self.n_test else task.test)
            tensors = self.ref_tensors(name)
            kl_items = items[: self.n_kl]
            ref_hits, base_hits, ref_lp = self._reference_scores(
                name, self.final_adapters(name), tensors, items, kl_items
            )
            self._refs[name] = TaskRef(items, tensors, self.ref_delta(name), ref_lp, kl_items, ref_hits, base_hits)
        return self._refs[name]

    def _reference_scores(
        self, name: str, refs: list[Checkpoint], tensors: list[dict[str, torch.Tensor]], items, kl_items
    ) -> tuple[list[list[int]], list[int], torch.Tensor]:
        """Each reference's and the base model's hits and the first reference's answer log-probabilities, read from
        the workspace's cache when this task, these checkpoints and this scoring setting were scored before (every
        experiment process, and every restart of one, would otherwise rescore them)."""
        z = self.preset.zoo
        key = {
            "task": name,
            "items": [[it.prompt, it.answer] for it in items],
            "n_kl": len(kl_items),
            "refs": [c.sha256 for c in refs],
            "base": self.preset.base,
            "scoring": [z.eval_batch_size, z.max_length, str(self.device)],
        }
        f = self.ws.reference_cache / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]}.safetensors"
        if f.exists():
            with safe_open(f, "pt", device="cpu") as cached:
                hits_of = json.loads(cached.metadata()["hits"])
                return hits_of["ref"], hits_of["base"], cached.get_tensor("ref_logprobs").to(self.device)
        ref_hits = []
        for t in tensors:
            self.swapper.set_tensors(t)
            ref_hits.append(self._hits(items))
        self.swapper.set_tensors(tensors[0])
        ref_lp = self._logprobs(kl_items)
        with self.model.disable_adapter():
            base_hits = self._hits(items)
        f.parent.mkdir(parents=True, exist_ok=True)
        hits_of = json.dumps({"ref": ref_hits, "base": base_hits})
        atomic_write_bytes(f, save({"ref_logprobs": ref_lp.detach().cpu().contiguous()}, metadata={"hits": hits_of}))
        return ref_hits, base_hits, ref_lp

    def _hits(self, items) -> list[int]:
        z = self.preset.zoo
        return [int(h) for h in hits(self.model, self.tok, items, z.eval_batch_size, z.max_length)]

    @torch.inference_mode()
    def _logprobs(self, items: list[Item]) -> torch.Tensor:
        return answer_token_logprobs(self.model, self.tok, items, self.preset.zoo.max_length)

    @contextlib.contextmanager
    def active(self, adapter: dict[str, torch.Tensor] | Path | None) -> Iterator[None]:
        """The PEFT model with ``adapter`` active: rank-r LoRA tensors of the zoo's layout (swapped in), a PEFT
        adapter folder of any rank on the zoo's targets (loaded by PEFT beside the swapper's ``default`` and
        removed again, e.g. a rank-k·r mixture), or None (the base model)."""
        if adapter is None:
            with self.model.disable_adapter():
                yield
        elif isinstance(adapter, dict):
            self.swapper.set_tensors(adapter)
            yield
        else:
            check_adapter(self.swapper.model.base_model.model, adapter, self.preset.base)
            try:
                # PEFT's default device is the first GPU whenever one exists
                self.model.load_adapter(str(adapter), adapter_name=_SCORED, torch_device=str(self.device))
                self.model.set_adapter(_SCORED)
                yield
            finally:
                self.model.set_adapter("default")
                if _SCORED in self.model.peft_config:
                    self.model.delete_adapter(_SCORED)

    def delta(self, adapter: dict[str, torch.Tensor] | Path | None) -> torch.Tensor:
        """δ of an adapter (as ``active`` takes it), on the CPU, without scoring it."""
        with self.active(adapter):
            return self.probe.delta(self.model).cpu()

    def score(self, name: str, tensors: dict[str, torch.Tensor] | None) -> tuple[dict[str, float], torch.Tensor]:
        """Metrics and δ of rank-r LoRA tensors of the zoo's layout on task ``name`` (None: the base model)."""
        ref = self.ref(name)  # computed before the swap: it sets the reference tensors itself
        # the hits of the base model and the task's own references were measured by ref(): not measured twice
        known = (
            ref.base_hits
            if tensors is None
            else next((h for t, h in zip(ref.ref_tensors, ref.ref_hits) if t is tensors), None)
        )
        with self.active(tensors):
            out, delta = self.score_active(name, known)
        out["param_mse"] = self.param_mse(name, tensors)
        return out, delta

    def score_folder(self, name: str, folder: str | Path) -> tuple[dict[str, float | None], torch.Tensor]:
        """Metrics and δ of a PEFT adapter folder of any rank on the zoo's targets; its parameter MSE is None (A
        and B of another rank have no element-wise counterpart in the reference)."""
        self.ref(name)
        with self.active(Path(folder)):
            out, delta = self.score_active(name)
        return {**out, "param_mse": None}, delta

    def param_mse(self, name: str, tensors: dict[str, torch.Tensor] | None) -> float:
        """Mean squared difference to each reference adapter (None: the base model, a zero update)."""
        refs = self.ref(name).ref_tensors
        return statistics.fmean(
            statistics.fmean(((r[k] - (tensors[k] if tensors else 0)) ** 2).mean().item() for k in r) for r in refs
        )

    def score_active(self, name: str, hits: list[int] | None = None) -> tuple[dict[str, float], torch.Tensor]:
        """Metrics and δ of the PEFT model with whatever adapter is active now (e.g. a merged one); ``hits``, when
        this exact model's per-item hits are already known, are used instead of scoring the items again."""
        ref = self.ref(name)
        delta = self.probe.delta(self.model).cpu()
        lp = self._logprobs(ref.kl_items)
        kl = (ref.ref_logprobs.exp() * (ref.ref_logprobs - lp)).sum(-1).mean().item()
        scored = hits if hits is not None else self._hits(ref.items)  # per item: paired tests on the same items
        return {
            "acc": statistics.fmean(scored),
            "hits": scored,
            "delta_dist": (delta - ref.ref_delta).norm().item(),
            "delta_cos": cos(delta, ref.ref_delta),
            "kl": kl,
        }, delta

    def close(self) -> None:
        """Take the PEFT layers off the base model."""
        self.swapper.unload()
