"""Top-k retrieval mixture baseline (the routing baseline of LoraHub / PEFT's Arrow): the k training tasks
nearest to a prompt draw in the retrieval index, their adapters summed exactly as one LoRA.

The sum is exact: with weights w_i, the mixture's A stacks w_i·A_i along the rank and its B
stacks B_i, so B·A = Σ w_i B_i A_i at rank Σ r_i (PEFT's ``add_weighted_adapter(..., "cat")``
semantics, without PEFT's square-root split of the weight). Its ``lora_alpha`` grows with the
rank so the LoRA scaling alpha/r, and hence every ΔW_i, is the one the adapters were trained at.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from deltalora.errors import AdapterError
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.generate import write_adapter
from deltalora.generator.retrieval import adapter_folder, index_base, neighbours
from deltalora.zoo.adapters import read_adapter

MIXTURE = "retrieval_mix"
"""The name the experiment grid gives this baseline."""


def mixture_weights(sims: list[float], temperature: float) -> list[float]:
    """softmax(sim / temperature): positive weights that sum to one (cosines of mean prompt embeddings
    of related tasks are close together, so a temperature well below 1 is what separates them)."""
    top = max(sims)
    e = [math.exp((s - top) / temperature) for s in sims]
    return [x / sum(e) for x in e]


def concat_loras(adapters: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """One LoRA (PEFT's saved key form) whose B·A is Σ w_i B_i A_i: A = rows w_i·A_i, B = columns B_i.

    All adapters must have the same keys (targets); their ranks may differ.
    """
    if len(adapters) != len(weights) or not adapters:
        raise AdapterError(f"{len(adapters)} adapters and {len(weights)} weights: need one weight per adapter")
    keys = set(adapters[0])
    for i, sd in enumerate(adapters[1:], 1):
        if set(sd) != keys:
            raise AdapterError(f"adapter {i} of the mixture targets other modules than adapter 0")
    out = {}
    for key in adapters[0]:
        if ".lora_A." in key:
            out[key] = torch.cat([w * sd[key] for sd, w in zip(adapters, weights)], 0)
        else:
            out[key] = torch.cat([sd[key] for sd in adapters], 1)
    return out


def write_mixture(
    index_dir: str | Path,
    prompts: list[str],
    encoder: PromptEncoder,
    k: int,
    temperature: float,
    out_dir: str | Path,
    protected: tuple[Path, ...] = (),
) -> dict:
    """The mixture of the k tasks nearest to ``prompts`` as a PEFT folder (``write_adapter``); returns
    its provenance (``tasks``, ``weights``, ``similarities``). k above the index's size takes every task."""
    near = neighbours(index_dir, prompts, encoder)[:k]
    tasks, sims = [t for t, _ in near], [s for _, s in near]
    weights = mixture_weights(sims, temperature)
    read = [read_adapter(adapter_folder(index_dir, t)) for t in tasks]
    configs = [c for c, _ in read]
    for t, c in zip(tasks, configs):
        same = (c["r"], c["lora_alpha"], sorted(c["target_modules"])) == (
            configs[0]["r"],
            configs[0]["lora_alpha"],
            sorted(configs[0]["target_modules"]),
        )
        if not same or c.get("use_rslora"):
            raise AdapterError(f"{adapter_folder(index_dir, t)}: its LoRA config differs from the other adapters'")
    r, alpha = configs[0]["r"], configs[0]["lora_alpha"]
    config = {**configs[0], "r": r * len(tasks), "lora_alpha": alpha * len(tasks)}  # same alpha/r scaling
    prov = {
        "kind": MIXTURE,
        "index": str(index_dir),
        "tasks": tasks,
        "weights": weights,
        "similarities": sims,
        "temperature": temperature,
    }
    write_adapter(
        out_dir, concat_loras([sd for _, sd in read], weights), config, prov, index_base(index_dir), False, protected
    )
    return prov
