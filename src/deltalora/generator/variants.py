"""The table of generator variants: each is a frozen spec of its loss terms and what it needs.

The trainer, the experiment planner, the report and the CLI read this table and nothing
else about a variant: adding one means one ``Variant`` (and, if it needs one, a new
``LossTerm``) registered here or with ``register``. Loss per variant:

- dnd: λ_w·MSE(tokens) (the Drag-and-Drop baseline)
- A1:  + λ_δ·‖H(ΔŴ) − δ‖² with H frozen in that term; H is fitted on the reference tokens and on
       perturbed adapters with their measured δ (``generator.head_pairs``), alone in a first stage, then
       beside the generator.
- A2:  + λ_δ·‖Delta(ΔŴ) − δ‖², δ computed exactly through the base model.
- A2-lin: A2 with Delta(ΔŴ) to first order around each training checkpoint (``linear_delta.py``).
- B:   stage 1 E_ψ: ‖E_ψ(prompts) − δ‖²; stage 2 G_θ: MSE(G_θ(δ)) + λ_cons·‖Delta(G_θ(δ)) − δ‖².
- C:   λ_δ·‖Delta(ΔŴ) − δ‖² + λ_KL·KL(p_base+ΔŴ ‖ p_base+ΔW) over the answer tokens + λ_reg·MSE
       (λ_reg = 0.1: the weights only regularise).
- E2E: λ_sft·CE(base + ΔŴ on train items of the task): no weight target at all.
- E2E+delta: + λ_δ·‖Delta(ΔŴ) − δ‖².
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Step:
    """What a loss term sees: this rank's samples of one training step."""

    model: Any
    """The ``Generator`` being trained."""
    data: Any
    """The ``TrainingSet``."""
    tokenizer: Any
    """The ``LoraTokenizer`` (decodes tokens to LoRA tensors)."""
    exact: Any
    """``ExactBehaviour`` (base model + probes) when the variant needs the base model, else None."""
    cfg: Any
    """The ``GeneratorConfig`` (loss weights are read from it by name)."""
    idx: torch.Tensor
    """Checkpoint index of each local sample [b]."""
    gens: list[torch.Generator]
    """Each sample's own random generator (prompt draw, noise, KL prompts)."""
    emb: torch.Tensor
    """Prompt embeddings [b, N, 384]."""
    target: torch.Tensor
    """Reference tokens [b, T, width]."""
    delta: torch.Tensor
    """Scaled δ targets [b, D]."""
    mask: torch.Tensor
    """1 where a token value is real, 0 at row padding [T, width]."""
    sel: list[int]
    """Local samples that get the exact terms (``generator.exact_samples``)."""
    pred: torch.Tensor | None = None
    """Generated tokens [b, T, width] (None in a stage that only trains E_ψ)."""
    linear: Any = None
    """``LinearDelta`` (first-order δ at every training checkpoint) when the variant has a linearised term."""

    @functools.cached_property
    def exact_tensors(self) -> list[dict[str, torch.Tensor]]:
        """The generated LoRA tensors of the selected samples, decoded once for every exact term."""
        decoded = self.tokenizer.decode(self.pred[self.sel])
        return [{k: v[b] for k, v in decoded.items()} for b in range(len(self.sel))]


@dataclass(frozen=True)
class LossTerm:
    """One named term: per-sample losses, averaged over the global batch and scaled by a config weight."""

    name: str
    """Its key in the loss log."""
    fn: Callable[[Step], torch.Tensor]
    """Per-sample losses [b], or [len(sel)] for an exact term."""
    weight: str | None = None
    """The ``GeneratorConfig`` field that scales it (None: unscaled)."""
    skip_if_zero: bool = False
    """Leave the term out when its weight is 0 (the weight MSE, a regulariser of the δ variants)."""
    exact: bool = False
    """Runs the base model (exact δ or KL): applied to the ``exact_samples`` subset only."""
    uses_delta: bool = True
    """Reads the δ targets."""
    linear: bool = False
    """Reads the first-order δ (``generator.linear_delta``), measured through the base model before training."""


@dataclass(frozen=True)
class Variant:
    """A generator variant: its loss terms, stages and architecture switches."""

    name: str
    summary: str
    """One line for ``--help`` and the report."""
    terms: tuple[LossTerm, ...]
    """Loss terms of the main stage (the decoder G_θ)."""
    stage1: tuple[LossTerm, ...] = ()
    """Terms of a first stage run for ``generator.stage1_steps`` steps before the main one (B: E_ψ, A1: H)."""
    decodes_delta: bool = False
    """The decoder reads a δ, not prompts: E_ψ maps prompts to δ, G_θ is trained on the true δ and can decode
    any δ vector (sums, interpolations)."""
    delta_head: bool = False
    """Has a δ-head H on its output tokens."""
    baseline: bool = False
    """The reference every δ variant is compared with (also trained longer, for a compute-matched row)."""
    in_grid: bool = True
    """In the research grid by default (``experiment.variants``): the plan's variants; the end-to-end ones are
    opt-in, each step runs the base model on train items."""

    @property
    def needs_base(self) -> bool:
        """Some term runs the frozen base model (the dominant cost on a CPU)."""
        return any(t.exact or t.linear for t in (*self.terms, *self.stage1))

    @property
    def linear(self) -> bool:
        """Some term reads the first-order δ (needs the basis head)."""
        return any(t.linear for t in (*self.terms, *self.stage1))

    @property
    def uses_delta(self) -> bool:
        """Some term reads the δ targets (a "δ variant" in the report)."""
        return any(t.uses_delta for t in (*self.terms, *self.stage1))


def _token_mse(s: Step) -> torch.Tensor:
    return (((s.pred - s.target) * s.mask) ** 2).sum((1, 2)) / s.mask.sum()


def _head_delta(s: Step) -> torch.Tensor:
    # stop-gradient into H: the generator moves toward what H says; H learns only from measured (adapter, δ)
    # pairs, so it cannot drift into agreeing with whatever the decoder emits
    frozen = {k: v.detach() for k, v in s.model.head.named_parameters()}
    return ((torch.func.functional_call(s.model.head, frozen, (s.pred,)) - s.delta) ** 2).mean(-1)


def _head_fit(s: Step) -> torch.Tensor:
    """H on each sample's reference checkpoint and, where measured, on one perturbed adapter drawn per sample."""
    ref = ((s.model.head(s.data.tokens[s.idx]) - s.delta) ** 2).mean(-1)
    if s.data.head_tokens is None:
        return ref
    n = len(s.data.head_tokens)
    j = torch.cat([torch.randint(n, (1,), generator=g) for g in s.gens]).to(s.data.head_tokens.device)
    pert = ((s.model.head(s.data.head_tokens[j]) - s.data.head_deltas[j]) ** 2).mean(-1)
    return (ref + pert) / 2


def _prompt_delta(s: Step) -> torch.Tensor:
    return ((s.model.e_psi(s.emb) - s.delta) ** 2).mean(-1)


def _exact_delta(s: Step) -> torch.Tensor:
    exact_d = torch.stack([s.exact.delta(t) for t in s.exact_tensors]) / s.data.delta_scale
    return ((exact_d - s.delta[s.sel]) ** 2).mean(-1)


def _linear_delta(s: Step) -> torch.Tensor:
    return ((s.linear(s.pred, s.idx) - s.delta) ** 2).mean(-1)


def _answer_kl(s: Step) -> torch.Tensor:
    """KL(base+generated ‖ base+reference) averaged over every gold-answer token of the task's first
    ``kl_prompts`` train items (a fixed set, so each reference checkpoint's distributions are computed once)."""
    kl = []
    for b, k in enumerate(s.sel):
        ckpt = int(s.idx[k])
        items = s.data.items[int(s.data.ckpt_task[ckpt])][: s.cfg.kl_prompts]
        ref = s.data.tokens[ckpt]
        lp_ref = s.exact.reference_logprobs(ckpt, lambda ref=ref: s.tokenizer.decode(ref), items)
        lp_gen = s.exact.answer_logprobs(s.exact_tensors[b], items)
        kl.append((lp_gen.exp() * (lp_gen - lp_ref)).sum(-1).mean())
    return torch.stack(kl)


def _completion(s: Step) -> torch.Tensor:
    """Completion loss of base + generated LoRA on a few of the task's train items (drawn per sample): the
    generator is trained through the frozen base model on what the adapter is for."""
    out = []
    for b, k in enumerate(s.sel):
        items = s.data.items[int(s.data.ckpt_task[s.idx[k]])]
        pick = torch.randint(len(items), (s.cfg.sft_items,), generator=s.gens[k]).tolist()
        out.append(s.exact.completion_loss(s.exact_tensors[b], [items[j] for j in pick]))
    return torch.stack(out)


MSE = LossTerm("mse", _token_mse, "lambda_w", skip_if_zero=True, uses_delta=False)
HEAD = LossTerm("delta_head", _head_delta, "lambda_delta")
HEAD_FIT = LossTerm("head_fit", _head_fit)
PROMPT_DELTA = LossTerm("delta_prompt", _prompt_delta)
EXACT_DELTA = LossTerm("delta_exact", _exact_delta, "lambda_delta", exact=True)
LINEAR_DELTA = LossTerm("delta_linear", _linear_delta, "lambda_delta", linear=True)
KL = LossTerm("kl", _answer_kl, "lambda_kl", exact=True)
SFT = LossTerm("completion", _completion, "lambda_sft", exact=True, uses_delta=False)

VARIANTS: dict[str, Variant] = {}
"""Every known variant by name, in the order tables list them."""


def register(variant: Variant) -> Variant:
    """Add a variant to the table (a name may be registered once)."""
    if variant.name in VARIANTS:
        raise ValueError(f"generator variant {variant.name!r} is already registered")
    VARIANTS[variant.name] = variant
    return variant


register(
    Variant(
        "dnd",
        "weight MSE only (the Drag-and-Drop baseline)",
        (dataclasses.replace(MSE, skip_if_zero=False),),
        baseline=True,
    )
)
register(
    Variant(
        "A1",
        "+ a δ-head H(ΔŴ) predicting δ, H fitted on measured pairs first",
        (MSE, HEAD, HEAD_FIT),
        # H alone first: a random H would pull the generator (and a warm-started one off its optimum) toward noise
        stage1=(HEAD_FIT,),
        delta_head=True,
    )
)
register(Variant("A2", "+ exact δ of base + ΔŴ on the probes", (MSE, EXACT_DELTA)))
register(
    Variant(
        "A2-lin",
        "+ δ of base + ΔŴ to first order at each training checkpoint (basis head; no base model per step)",
        (MSE, LINEAR_DELTA),
        in_grid=False,
    )
)
register(
    Variant(
        "B",
        "two stages: prompts -> δ (E_ψ), δ -> LoRA (G_θ) with exact-δ consistency",
        (MSE, dataclasses.replace(EXACT_DELTA, weight="lambda_cons")),
        stage1=(PROMPT_DELTA,),
        decodes_delta=True,
    )
)
register(
    Variant(
        "C",
        "behaviour first: exact δ + answer-token KL to the reference, weight MSE as regulariser",
        (dataclasses.replace(MSE, weight="lambda_reg"), EXACT_DELTA, KL),
    )
)

register(
    Variant(
        "E2E",
        "end to end: completion loss of base + generated LoRA on the task's train items (Text-to-LoRA's SFT mode)",
        (SFT,),
        in_grid=False,
    )
)
register(Variant("E2E+delta", "end to end with the exact-δ term", (SFT, EXACT_DELTA), in_grid=False))


def weighted_by(weight: str) -> Variant:
    """The variant with a loss term scaled by this ``GeneratorConfig`` field (e.g. ``lambda_kl``: C), for sweeps of
    that weight."""
    return next(v for v in VARIANTS.values() if any(t.weight == weight for t in (*v.terms, *v.stage1)))


def baseline() -> Variant:
    """The variant the δ variants are compared with."""
    return next(v for v in VARIANTS.values() if v.baseline)
