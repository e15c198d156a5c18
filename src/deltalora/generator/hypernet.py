"""Hyper-network modules: the hyper-convolutional decoder, its front-ends, the δ-head and E_ψ.

The decoder follows DnD's block design on a feature map (channels C, H, W): LayerNorm,
two factorised convolution branches (along W then H; along H then W with tanh) averaged
with a bias, then a 1x1 convolution across the channel axis, residual when the shape is
unchanged. Channels start as the N conditions (prompts, or a δ expanded to N maps) and
end as the T LoRA tokens; H x W is the token width. Spatial convolutions are depthwise
to stay cheap on a CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _grid(width: int) -> tuple[int, int]:
    """H x W = width with H the largest divisor not above sqrt(width)."""
    h = max(d for d in range(1, int(math.isqrt(width)) + 1) if width % d == 0)
    return h, width // h


class HyperConvBlock(nn.Module):
    """A norm, two depthwise spatial convolutions (width-then-height and height-then-width), a 1x1 channel mix."""

    def __init__(self, c_in: int, c_out: int, h: int, w: int, k: int = 3, act: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm([h, w])
        self.w_then_h = nn.Sequential(
            nn.Conv2d(c_in, c_in, (1, k), padding=(0, k // 2), groups=c_in),
            nn.Conv2d(c_in, c_in, (k, 1), padding=(k // 2, 0), groups=c_in),
        )
        self.h_then_w = nn.Sequential(
            nn.Conv2d(c_in, c_in, (k, 1), padding=(k // 2, 0), groups=c_in),
            nn.Conv2d(c_in, c_in, (1, k), padding=(0, k // 2), groups=c_in),
        )
        self.bias = nn.Parameter(torch.zeros(1, c_in, h, w))
        self.mix = nn.Conv2d(c_in, c_out, 1)
        self.act = nn.GELU() if act else nn.Identity()
        self.residual = c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block: [B, C_in, h, w] -> [B, C_out, h, w]."""
        y = self.norm(x)
        y = 0.5 * (self.w_then_h(y) + torch.tanh(self.h_then_w(y))) + self.bias
        y = self.act(self.mix(y))
        return x + y if self.residual else y


class HyperConvDecoder(nn.Module):
    """Condition maps [B, C0, width] -> normalised LoRA tokens [B, T, width]."""

    def __init__(self, c0: int, channels: tuple[int, ...], n_tokens: int, width: int):
        super().__init__()
        self.h, self.w = _grid(width)
        chain = (c0, *channels, n_tokens)
        self.blocks = nn.ModuleList(
            HyperConvBlock(a, b, self.h, self.w, act=i < len(chain) - 2)
            for i, (a, b) in enumerate(zip(chain, chain[1:]))
        )
        # The zoo's mean adapter is a large part of every target; a free per-token bias holds it.
        self.out_bias = nn.Parameter(torch.zeros(n_tokens, width))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition maps to tokens."""
        b, c, width = cond.shape
        x = cond.reshape(b, c, self.h, self.w)
        for blk in self.blocks:
            x = blk(x)
        return x.reshape(b, -1, width) + self.out_bias


class PromptFrontEnd(nn.Module):
    """N prompt embeddings [B, N, 384] -> N condition maps [B, N, width]."""

    def __init__(self, d_in: int, width: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, width))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Project each prompt embedding to one condition map."""
        return self.proj(emb)


class DeltaFrontEnd(nn.Module):
    """A (standardised) δ [B, D] -> C0 condition maps [B, C0, width], for G_θ."""

    def __init__(self, d_delta: int, c0: int, width: int, hidden: int = 256):
        super().__init__()
        self.c0, self.width = c0, width
        self.net = nn.Sequential(nn.Linear(d_delta, hidden), nn.GELU(), nn.Linear(hidden, c0 * width))

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        """Expand a δ to the decoder's input channels."""
        return self.net(delta).reshape(-1, self.c0, self.width)


class DeltaHead(nn.Module):
    """H: LoRA tokens [B, T, width] -> predicted (standardised) δ [B, D] (variant A1)."""

    def __init__(self, n_tokens: int, width: int, d_delta: int, per_token: int = 4, hidden: int = 256):
        super().__init__()
        self.token = nn.Linear(width, per_token)
        self.net = nn.Sequential(
            nn.GELU(), nn.Linear(n_tokens * per_token, hidden), nn.GELU(), nn.Linear(hidden, d_delta)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Predict δ from tokens."""
        return self.net(self.token(tokens).flatten(1))


class PromptToDelta(nn.Module):
    """E_ψ: N prompt embeddings [B, N, 384] -> (standardised) δ [B, D], permutation-invariant (variant B)."""

    def __init__(self, d_in: int, d_delta: int, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(2 * d_in),
            nn.Linear(2 * d_in, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, d_delta),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Pool the prompt set (mean and std) and map it to δ."""
        return self.net(pooled(emb))


def pooled(emb: torch.Tensor) -> torch.Tensor:
    """A prompt set [B, N, d] as one vector [B, 2d]: the mean and the std over its prompts (order-free)."""
    return torch.cat([emb.mean(1), emb.std(1, unbiased=False)], -1)


def n_params(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
