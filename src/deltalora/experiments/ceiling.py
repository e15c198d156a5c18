"""How much a generator could express: the principal directions of the zoo's weight targets, and what a
rank-k reconstruction of a task's adapter is worth in accuracy.

A generator whose output lives in the span of k directions of the training targets can at best produce the
projection of a task's reference adapter on that span. Two spans are measured: all training checkpoints (a
seen task) and all checkpoints but the task's own (a held-out task, the best any decoder linear in those
targets could do without ever seeing it). Rank 0 is the mean adapter, the failure every generator shows
today; the reference adapter itself is the oracle.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from deltalora.config import Preset
from deltalora.data.registry import TaskSpec
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.device import runtime
from deltalora.errors import ArtifactError
from deltalora.generator.basis import principal_basis, project
from deltalora.generator.dataset import zoo_targets
from deltalora.generator.lora_tokens import LoraTokenizer
from deltalora.lm.evaluate import hits
from deltalora.lm.models import load_base
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import AdapterSwapper
from deltalora.zoo.manifest import Manifest


def _accuracy(swapper: AdapterSwapper, lt: LoraTokenizer, tokens: torch.Tensor, items, tok, preset: Preset) -> float:
    """Accuracy on ``items`` of the adapter whose normalised tokens (flattened) are ``tokens``."""
    swapper.set_tensors(lt.decode(tokens.reshape(lt.n_tokens, lt.width)))
    h = hits(swapper.model, tok, items, preset.zoo.eval_batch_size, preset.zoo.max_length)
    return sum(h) / len(h)


def target_ceiling(
    preset: Preset,
    ws: Workspace,
    train_tasks: list[str],
    scored: list[str],
    ranks: tuple[int, ...] = (0, 4, 16, 64),
    n_test: int = 50,
    extra: list[TaskSpec] | None = None,
) -> dict:
    """Explained variance of the training targets and the accuracy of rank-k reconstructions of each ``scored``
    task's final adapter (first seed, first part), with the task's own checkpoints in the span and without."""
    ckpts = [c for c in Manifest.from_file(ws.manifest).singles() if c.task in train_tasks]
    missing = sorted(set(scored) - {c.task for c in ckpts if c.final})
    if missing:
        raise ArtifactError(
            f"{ws.manifest}: scored task(s) {missing} have no final checkpoint among the training tasks"
        )
    config, lt, tokens = zoo_targets(ws, ckpts)
    x = tokens.flatten(1)
    _, _, var = principal_basis(x)
    cum = np.cumsum(var) / var.sum()
    result = {
        "n_checkpoints": len(ckpts),
        "n_tasks": len(set(c.task for c in ckpts)),
        "explained_variance": [round(float(v), 5) for v in cum[:256]],
        "directions_for": {f"{q:.0%}": int(np.searchsorted(cum, q) + 1) for q in (0.5, 0.9, 0.99)},
        "ranks": list(ranks),
        "n_test": n_test,
        "tasks": {},
    }
    base, tok = load_base(preset.base, runtime(preset.runtime).device)
    swapper = AdapterSwapper.like(base, ws.zoo / ckpts[0].path, preset.base)
    task_of = np.array([c.task for c in ckpts])
    try:
        for t in tqdm(scored, desc="ceiling", unit="task"):
            items = load_task(resolve_spec(t, extra), preset.tasks).test[:n_test]
            ref = next(i for i, c in enumerate(ckpts) if c.task == t and c.final and c.part == 0)
            row = {"oracle": _accuracy(swapper, lt, x[ref], items, tok, preset)}
            for view, exclude in (("seen", None), ("held_out", torch.from_numpy(task_of == t))):
                mean, basis, _ = principal_basis(x, exclude)
                row[view] = {
                    str(k): _accuracy(swapper, lt, project(x[ref], mean, basis, k), items, tok, preset) for k in ranks
                }
            result["tasks"][t] = row
    finally:
        swapper.unload()
    for view in ("seen", "held_out"):
        result[f"mean_{view}"] = {
            str(k): float(np.mean([r[view][str(k)] for r in result["tasks"].values()])) for k in ranks
        }
    result["mean_oracle"] = float(np.mean([r["oracle"] for r in result["tasks"].values()]))
    result["adapter_config"] = {k: config[k] for k in ("r", "lora_alpha", "target_modules")}
    return result
