"""One training step's loss: the variant's terms over this rank's samples, and the exact behaviour they may need."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from peft import get_peft_model
from torch import nn

from deltalora.config import GeneratorConfig, Preset
from deltalora.data.items import Item
from deltalora.delta.probes import DeltaProbe
from deltalora.device import CPU, autocast, full_precision, module_device
from deltalora.generator.encoder import DIM
from deltalora.generator.lora_tokens import LoraTokenizer
from deltalora.generator.variants import VARIANTS, Step
from deltalora.lm.evaluate import answer_token_logprobs
from deltalora.lm.models import load_base
from deltalora.zoo.adapters import live_names, lora_config
from deltalora.zoo.training import completion_batch


class ExactBehaviour:
    """Exact δ and answer-position distributions of base + LoRA tensors, differentiable, on ``device`` and in fp32
    (also inside a bf16 autocast region: δ is a small difference of large activations)."""

    def __init__(self, preset: Preset, adapter_config: dict, n_probes: int, device: torch.device = CPU):
        self.device = device
        base, self.tok = load_base(preset.base, device)
        for p in base.parameters():
            p.requires_grad_(False)
        ac = adapter_config
        self.model = get_peft_model(base, lora_config(ac["r"], ac["lora_alpha"], ac["target_modules"]))
        self.model.eval()
        self.probe = DeltaProbe(self.tok, dataclasses.replace(preset.delta, n_probes=n_probes))
        with self.model.disable_adapter():
            self.probe.set_base(self.model)
        self.max_length = preset.zoo.max_length
        self._ref: dict[int, torch.Tensor] = {}

    def delta(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """δ of base + these LoRA tensors (PEFT's saved key form)."""
        with full_precision(self.device):
            return self.probe.delta_of_tensors(self.model, {k: v.float() for k, v in tensors.items()})

    def completion_loss(self, tensors: dict[str, torch.Tensor], items: list[Item]) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens (+ EOS) of ``items`` under base + these LoRA tensors, the zoo's
        training loss; differentiable in ``tensors``."""
        params = live_names({k: v.float() for k, v in tensors.items()})
        ids, mask, labels = (t.to(self.device) for t in completion_batch(self.tok, items, self.max_length))
        kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        with full_precision(self.device):
            return torch.func.functional_call(self.model, params, args=(), kwargs=kwargs, strict=False).loss

    def answer_logprobs(self, tensors: dict[str, torch.Tensor], items: list[Item]) -> torch.Tensor:
        """Log-distributions of base + these LoRA tensors at every gold-answer token of ``items`` (teacher-forced),
        differentiable in ``tensors``."""
        params = live_names({k: v.float() for k, v in tensors.items()})
        with full_precision(self.device):
            return answer_token_logprobs(self.model, self.tok, items, self.max_length, params=params)

    def reference_logprobs(
        self, key: int, tensors: Callable[[], dict[str, torch.Tensor]], items: list[Item]
    ) -> torch.Tensor:
        """``answer_logprobs`` of a reference checkpoint on its task's fixed KL items, computed once per
        checkpoint (``key``) and kept: the reference does not change during training. ``tensors`` is called
        (the checkpoint decoded) only on the first request."""
        if key not in self._ref:
            with torch.no_grad():
                self._ref[key] = self.answer_logprobs(tensors(), items)
        return self._ref[key]


class GeneratorLoss(nn.Module):
    """All loss terms of one step for this rank's samples, as a module so DDP can wrap it.

    Every sample carries its own seed (prompt draw, noise, KL prompts) and its position in
    the global batch, and each term is a sum over local samples divided by the global
    count times the world size: DDP's gradient average then equals the single-process
    gradient of the same global batch. Sample indices, seeds and the draws from them are
    made on the CPU (the same samples on every device) and moved to the generator's device;
    ``dtype="bf16"`` runs the generator's forward under autocast, every loss term in fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        tokenizer: LoraTokenizer,
        exact: ExactBehaviour | None,
        cfg: GeneratorConfig,
        world: int = 1,
        dtype: str = "fp32",
        linear=None,
    ):
        super().__init__()
        self.model = model
        self.ctx = (data, tokenizer, exact)  # a tuple: not registered, so DDP leaves the frozen base alone
        self.linear = linear  # a LinearDelta (variants with a linearised δ term), else None
        self.cfg, self.world, self.dtype = cfg, world, dtype
        self.mask = tokenizer.valid_mask()

    def forward(
        self, idx: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, stage: int
    ) -> dict[str, torch.Tensor]:
        """Named loss terms of ``stage`` (1: the variant's first stage, 2: the main one) for these samples."""
        data, tokenizer, exact = self.ctx
        cfg, spec, b_global = self.cfg, VARIANTS[self.cfg.variant], self.cfg.batch_size
        device = module_device(self.model)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        emb = torch.stack(
            [
                draw(data.emb[int(data.ckpt_task[i])], cfg.n_prompts, g)
                # device: cpu - noise from the sample's seeded CPU generator: the same draw on every device
                + cfg.cond_noise * torch.randn(cfg.n_prompts, DIM, generator=g).to(device)
                for i, g in zip(idx, gens)
            ]
        )
        target = torch.stack(
            [
                # device: cpu - noise from the sample's seeded CPU generator: the same draw on every device
                data.tokens[i] + cfg.target_noise * torch.randn(self.mask.shape, generator=g).to(device) * self.mask
                for i, g in zip(idx, gens)
            ]
        )
        n_exact = cfg.exact_samples or b_global
        step = Step(
            self.model,
            data,
            tokenizer,
            exact,
            cfg,
            idx,
            gens,
            emb,
            target,
            data.deltas[idx],
            self.mask,
            sel=[k for k in range(len(idx)) if positions[k] < n_exact],
            linear=self.linear,
        )
        terms = spec.stage1 if stage == 1 and spec.stage1 else spec.terms
        if terms is spec.terms:
            with autocast(device, self.dtype):
                pred = self.model.from_delta(step.delta) if spec.decodes_delta else self.model(emb)
            step.pred = pred.float()
        out: dict[str, torch.Tensor] = {}
        for term in terms:
            weight = getattr(cfg, term.weight) if term.weight else None
            if term.skip_if_zero and not weight:
                continue
            if term.exact and not step.sel:  # keeps every rank's graph the same shape when it has no exact sample
                out[term.name] = step.pred.sum() * 0.0
                continue
            per_sample_mean = term.fn(step).sum() * self.world / (n_exact if term.exact else b_global)
            out[term.name] = per_sample_mean if weight is None else weight * per_sample_mean
        return out


def draw(emb: torch.Tensor, n: int, rng: torch.Generator) -> torch.Tensor:
    """n rows of ``emb`` (on its device), drawn with a CPU generator: without replacement when there are enough,
    else with."""
    if len(emb) >= n:
        return emb[torch.randperm(len(emb), generator=rng)[:n]]  # device: cpu - row indices from the CPU generator
    return emb[torch.randint(len(emb), (n,), generator=rng)]  # device: cpu - row indices from the CPU generator


def draw_batch(rng: torch.Generator, n_samples: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: checkpoint indices and one seed per sample, identical on every rank."""
    return torch.randint(n_samples, (batch_size,), generator=rng), torch.randint(2**62, (batch_size,), generator=rng)
