"""Delta Activations: δ_f = mean_{x in P} h_f(x) − h_base(x), h = final-layer hidden state at the last token.

The default probe set is the paper's 5 Alpaca-style prompts, fp32, no chat template.
Probes are batched with left padding and explicit position ids, which gives the same h
as one prompt at a time (tested). Base activations are computed once; adapters are
swapped into one PEFT wrapper by weights. ``DeltaProbe.delta_of_tensors`` runs the same
forward through ``torch.func.functional_call`` so LoRA tensors inside an autograd graph
(a generator's output) get an exact, differentiable δ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftConfig
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .adapters import AdapterSwapper
from .config import DeltaConfig
from .evaluate import pad_left
from .distributed import barrier, init_distributed
from .io import atomic_write_bytes, atomic_write_json, remove_stale_tmp

PREAMBLES = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The task described below requires a response that completes the request accurately.",
    "Below is a description of a task. Provide a response that aligns with the requirements.",
    "The following instruction outlines a task. Generate a response that meets the specified request.",
    "You are given an instruction and input. Write a response that completes the task as requested.",
)
# The paper's (instruction, input) pair first; the 20-probe set adds three generic pairs
# of the same shape (our choice: the paper defines only the 5-probe set).
INSTRUCTIONS = (
    ("Please provide a response.", "Input."),
    ("Answer the question below.", "Question."),
    ("Complete the following text.", "Text."),
    ("Solve the problem.", "Problem."),
)
TEMPLATE = "{preamble}\n\n### Instruction:\n{task} Input:{input}\n\n### Response:"


def probe_prompts(n: int) -> list[str]:
    """1 (first preamble), 5 (the paper's set) or 20 (5 preambles x 4 instructions) probes."""
    if n not in (1, 5, 20):
        raise ValueError(f"probe set size must be 1, 5 or 20, got {n}")
    pairs = INSTRUCTIONS if n == 20 else INSTRUCTIONS[:1]
    prompts = [TEMPLATE.format(preamble=p, task=t, input=i) for t, i in pairs for p in PREAMBLES]
    return prompts[:n]


class DeltaProbe:
    """Tokenised probe batches and the base model's mean activation."""

    def __init__(self, tok: PreTrainedTokenizerBase, cfg: DeltaConfig):
        ids = [tok(p, add_special_tokens=True).input_ids for p in probe_prompts(cfg.n_probes)]
        self.batches = [pad_left(ids[i: i + cfg.batch_size], tok.pad_token_id) for i in range(0, len(ids), cfg.batch_size)]
        self.n = len(ids)
        self.base_mean: torch.Tensor | None = None

    def mean_activation(self, model: torch.nn.Module, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean last-token final-layer state over the probes; ``params`` overrides named parameters."""
        total = 0
        for ids, mask, pos in self.batches:
            kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                          logits_to_keep=1, use_cache=False)
            out = torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False) if params else model(**kwargs)
            total = total + out.hidden_states[-1][:, -1, :].float().sum(0)
        return total / self.n

    def set_base(self, base: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            self.base_mean = self.mean_activation(base).clone()
        return self.base_mean

    def delta(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return self.mean_activation(model) - self.base_mean

    def delta_of_tensors(self, peft_model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """δ for LoRA tensors given in PEFT's saved key form; differentiable in ``tensors``."""
        params = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
        return self.mean_activation(peft_model, params) - self.base_mean


def delta_dir(workspace: str | Path) -> Path:
    return Path(workspace) / "delta"


def compute_zoo_deltas(base: torch.nn.Module, tok: PreTrainedTokenizerBase, zoo_root: Path, manifest: Sequence[dict],
                       cfg: DeltaConfig, out_dir: Path, base_name: str | None = None, save_every: int = 25) -> dict[str, torch.Tensor]:
    """δ for every checkpoint of the manifest; resumable (finished ones are kept on disk).

    Under torchrun the checkpoints are sharded by rank; each rank writes its own part
    file and rank 0 merges them.
    """
    info = init_distributed()
    out_file = out_dir / f"deltas_p{cfg.n_probes}.safetensors"
    merged = load_file(out_file) if out_file.exists() else {}
    mine = info.shard([c for c in manifest if c["path"] not in merged])
    part_file = out_file if info.world == 1 else out_dir / f"deltas_p{cfg.n_probes}.rank{info.rank}.safetensors"
    remove_stale_tmp(out_dir, prefix=f".{part_file.name}.")
    done = dict(merged) if info.world == 1 else (load_file(part_file) if part_file.exists() else {})
    todo = [c for c in mine if c["path"] not in done]
    if todo:
        probe = DeltaProbe(tok, cfg)
        probe.set_base(base)
        swapper = AdapterSwapper(base, PeftConfig.from_pretrained(str(zoo_root / todo[0]["path"])), base_name)
        try:
            t0 = time.perf_counter()
            for i, c in enumerate(tqdm(todo, desc=f"delta (|P|={cfg.n_probes})", unit="adapter"), 1):
                done[c["path"]] = probe.delta(swapper.load(zoo_root / c["path"], c.get("sha256"))).contiguous()
                if i % save_every == 0 or i == len(todo):
                    _save_deltas(part_file, done)
            seconds = time.perf_counter() - t0
        finally:
            swapper.unload()
        if info.is_main:
            atomic_write_json(out_dir / f"timing_p{cfg.n_probes}.json",
                              {"n_adapters": len(todo), "seconds": seconds, "seconds_per_adapter": seconds / len(todo)})
    barrier()
    if info.world > 1 and info.is_main:
        parts = sorted(out_dir.glob(f"deltas_p{cfg.n_probes}.rank*.safetensors"))
        for f in parts:
            merged.update(load_file(f))
        _save_deltas(out_file, merged)
        for f in parts:
            f.unlink()
    if info.is_main:
        atomic_write_json(out_dir / "config.json", {"delta": {"n_probes": cfg.n_probes, "batch_size": cfg.batch_size},
                                                    "probes": probe_prompts(cfg.n_probes)})
    barrier()
    return load_file(out_file) if out_file.exists() else done


def _save_deltas(path: Path, deltas: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, save(deltas))


def load_deltas(workspace: str | Path, n_probes: int = 5) -> dict[str, torch.Tensor]:
    f = delta_dir(workspace) / f"deltas_p{n_probes}.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no Delta Activations computed for |P|={n_probes}; run `deltalora delta compute --probes {n_probes}`")
    return load_file(f)
