"""Delta Activations of one model: δ_f = mean_{x in P} h_f(x) − h_base(x), h = final-layer state at the last token.

The default probe set is the paper's 5 Alpaca-style prompts, fp32, no chat template.
Probes are batched with left padding and explicit position ids, which gives the same h
as one prompt at a time (tested). Base activations are computed once; adapters are
swapped into one PEFT wrapper by weights. ``DeltaProbe.delta_of_tensors`` runs the same
forward through ``torch.func.functional_call`` so LoRA tensors inside an autograd graph
(a generator's output) get an exact, differentiable δ.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from deltalora.config import DeltaConfig
from deltalora.device import module_device
from deltalora.lm.evaluate import pad_left
from deltalora.zoo.adapters import live_names

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
    """Tokenised probe batches (on the CPU, moved to the model's device per forward) and the base model's mean
    activation (on the base's device)."""

    def __init__(self, tok: PreTrainedTokenizerBase, cfg: DeltaConfig):
        ids = [tok(p, add_special_tokens=True).input_ids for p in probe_prompts(cfg.n_probes)]
        self.batches = [
            pad_left(ids[i : i + cfg.batch_size], tok.pad_token_id) for i in range(0, len(ids), cfg.batch_size)
        ]
        self.n = len(ids)
        self.base_mean: torch.Tensor | None = None

    def mean_activation(self, model: torch.nn.Module, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean last-token final-layer state over the probes (fp32, on the model's device); ``params`` overrides
        named parameters."""
        device = module_device(model)
        total = 0
        for batch in self.batches:
            ids, mask, pos = (t.to(device) for t in batch)
            kwargs = dict(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                output_hidden_states=True,
                logits_to_keep=1,
                use_cache=False,
            )
            out = (
                torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False)
                if params
                else model(**kwargs)
            )
            total = total + out.hidden_states[-1][:, -1, :].float().sum(0)
        return total / self.n

    def set_base(self, base: torch.nn.Module) -> torch.Tensor:
        """Compute and keep the base model's mean activation over the probes."""
        with torch.inference_mode():
            self.base_mean = self.mean_activation(base).clone()
        return self.base_mean

    def delta(self, model: torch.nn.Module) -> torch.Tensor:
        """δ of ``model`` (the PEFT model with its adapter active) relative to the stored base."""
        with torch.inference_mode():
            return self.mean_activation(model) - self.base_mean

    def delta_of_tensors(self, peft_model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """δ for LoRA tensors given in PEFT's saved key form; differentiable in ``tensors``."""
        return self.mean_activation(peft_model, live_names(tensors)) - self.base_mean
