"""The generator network: prompt embeddings -> normalised LoRA tokens, shaped by its variant's spec."""

from __future__ import annotations

import torch
from torch import nn

from deltalora.config import GeneratorConfig
from deltalora.errors import GeneratorError
from deltalora.generator.basis import HEADS, BasisHead
from deltalora.generator.encoder import DIM
from deltalora.generator.hypernet import (
    DeltaFrontEnd,
    DeltaHead,
    HyperConvDecoder,
    PromptFrontEnd,
    PromptToDelta,
    pooled,
)
from deltalora.generator.variants import VARIANTS


class Generator(nn.Module):
    """Prompt embeddings [B, N, 384] -> normalised LoRA tokens [B, T, width]."""

    def __init__(self, cfg: GeneratorConfig, n_tokens: int, width: int, d_delta: int):
        super().__init__()
        self.spec = VARIANTS[cfg.variant]
        self.out = HEADS[cfg.head]
        # creation order fixes the seeded initialisation: E_ψ, front-end, decoder, the δ-head, then the basis
        if self.spec.decodes_delta:
            self.e_psi = PromptToDelta(DIM, d_delta)
        if self.out.conv:
            self.front = (
                DeltaFrontEnd(d_delta, cfg.n_prompts, width) if self.spec.decodes_delta else PromptFrontEnd(DIM, width)
            )
            self.decoder = HyperConvDecoder(cfg.n_prompts, cfg.channels, n_tokens, width)
        if self.spec.delta_head:
            self.head = DeltaHead(n_tokens, width, d_delta)
        if self.out.basis:  # fitted to the training targets by the trainer, restored from the state dict on load
            self.basis = BasisHead(d_delta if self.spec.decodes_delta else 2 * DIM, cfg.basis_rank, n_tokens, width)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Tokens for a batch of prompt-embedding sets."""
        if self.spec.decodes_delta:
            return self.from_delta(self.e_psi(emb))
        return self._tokens(emb, pooled(emb) if self.out.basis else emb)

    def _tokens(self, maps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The head's output: the decoder over the condition maps and/or the basis from the pooled condition."""
        tokens = self.decoder(self.front(maps)) if self.out.conv else None
        if self.out.basis:
            b = self.basis(cond)
            tokens = b if tokens is None else tokens + b
        return tokens

    def from_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """G_θ: a (scaled) δ, any vector including sums of δs, -> tokens (variants that decode δ)."""
        if not self.spec.decodes_delta:
            raise GeneratorError(
                f"variant {self.spec.name} does not decode a δ; variants that do: "
                f"{', '.join(v.name for v in VARIANTS.values() if v.decodes_delta)}"
            )
        return self._tokens(delta, delta)
