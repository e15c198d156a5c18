"""LoRA tokenisation: an adapter state dict <-> fixed-width tokens, exactly invertible.

The layout is derived from the adapter's shapes alone (any rank, target modules, layer
count): each ``lora_A`` [r, in] and each ``lora_B`` transposed [r, out] is cut along its
long dimension into slices of ``width`` values, one token per slice (the last slice of
a row zero-padded). Each token is then normalised by a per-token-position mean and std
fitted over a zoo (kept in the layout), so the generator sees unit-scale targets and
``decode(encode(sd)) == sd`` up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltalora.errors import AdapterError, GeneratorError


@dataclass(frozen=True)
class Segment:
    """One LoRA tensor's place in the token sequence."""

    key: str
    """Adapter key in PEFT's saved form."""
    shape: tuple[int, int]
    """Tensor shape as stored."""
    transpose: bool
    """True for lora_B, which is tokenised as B^T (r rows of length out)."""
    per_row: int
    """Tokens per row."""

    @property
    def rows(self) -> int:
        """Rows tokenised (r for lora_A and for B^T)."""
        return self.shape[1] if self.transpose else self.shape[0]

    @property
    def length(self) -> int:
        """Values per row."""
        return self.shape[0] if self.transpose else self.shape[1]

    @property
    def n_tokens(self) -> int:
        """Tokens this tensor occupies."""
        return self.rows * self.per_row


class LoraTokenizer:
    """Tokens [T, width] for one adapter; ``mean``/``std`` [T, 1] normalise each token position."""

    def __init__(self, shapes: dict[str, tuple[int, int]], width: int | None = None, max_width: int = 256):
        if not shapes:
            raise ValueError("LoraTokenizer needs at least one LoRA tensor shape")
        keys = sorted(shapes, key=_module_order)
        longs = [shapes[k][0] if ".lora_B." in k else shapes[k][1] for k in keys]
        if width is None:
            # gcd of the long dimensions wastes no padding when it is a useful size.
            g = math.gcd(*longs)
            width = g if 16 <= g <= max_width else min(max_width, max(longs))
        self.width = width
        self.segments = [
            Segment(k, tuple(shapes[k]), ".lora_B." in k, math.ceil(n / width)) for k, n in zip(keys, longs)
        ]
        self.n_tokens = sum(s.n_tokens for s in self.segments)
        self.mean = torch.zeros(self.n_tokens, 1)
        self.std = torch.ones(self.n_tokens, 1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], width: int | None = None) -> LoraTokenizer:
        """The layout of an adapter state dict (statistics not fitted yet)."""
        return cls({k: tuple(v.shape) for k, v in sd.items()}, width)

    @property
    def n_params(self) -> int:
        """LoRA parameters in the layout."""
        return sum(s.shape[0] * s.shape[1] for s in self.segments)

    def raw_tokens(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        """Un-normalised tokens [T, width] (float32)."""
        self._check(sd)
        parts = []
        for s in self.segments:
            t = sd[s.key].float()
            t = t.T if s.transpose else t
            pad = s.per_row * self.width - s.length
            parts.append(torch.nn.functional.pad(t, (0, pad)).reshape(s.n_tokens, self.width))
        return torch.cat(parts)

    def fit(self, sds: list[dict[str, torch.Tensor]], eps: float = 1e-8) -> LoraTokenizer:
        """Per-element mean and std over a set of adapters.

        Per element, not per token: zoo adapters share their lora_A init, so a per-token
        statistic would leave that shared basis in every target, and the generator would
        spend its capacity reproducing a constant instead of the task-specific part.
        """
        raw = torch.stack([self.raw_tokens(sd) for sd in sds])  # [N, T, W]
        mask = self.valid_mask()  # padding values stay 0 after normalisation
        self.mean = raw.mean(0) * mask
        self.std = (raw.std(0, unbiased=False) * mask).clamp(min=eps)
        return self

    def encode(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised tokens [T, width]; padding positions are 0."""
        return (self.raw_tokens(sd) - self.mean) / self.std * self.valid_mask()

    def decode(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The adapter tensors back from (possibly batched [..., T, width]) normalised tokens; differentiable."""
        raw = tokens * self.std + self.mean
        out, start = {}, 0
        for s in self.segments:
            chunk = raw[..., start : start + s.n_tokens, :]
            start += s.n_tokens
            rows = chunk.reshape(*chunk.shape[:-2], s.rows, s.per_row * self.width)[..., : s.length]
            out[s.key] = rows.transpose(-1, -2) if s.transpose else rows
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The fitted statistics, for saving (on the CPU)."""
        return {"mean": self.mean.cpu().contiguous(), "std": self.std.cpu().contiguous()}

    def to(self, device: torch.device) -> LoraTokenizer:
        """Keep the statistics on ``device``, where the tokens it decodes are (in place; returns itself)."""
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def load_state(self, state: dict[str, torch.Tensor]) -> LoraTokenizer:
        """Restore saved statistics (shape-checked against this layout)."""
        if state["mean"].shape != (self.n_tokens, self.width):
            raise GeneratorError(
                f"tokenizer statistics have shape {tuple(state['mean'].shape)}, "
                f"this layout needs {(self.n_tokens, self.width)}"
            )
        self.mean, self.std = state["mean"], state["std"]
        return self

    def valid_mask(self) -> torch.Tensor:
        """1 where a token value is real, 0 where it is row padding; [T, width], on the statistics' device."""
        parts = []
        for s in self.segments:
            m = torch.zeros(s.per_row * self.width, device=self.mean.device)
            m[: s.length] = 1
            parts.append(m.reshape(s.per_row, self.width).repeat(s.rows, 1))
        return torch.cat(parts)

    def _check(self, sd: dict[str, torch.Tensor]) -> None:
        want = {s.key: s.shape for s in self.segments}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if got != want:
            missing = sorted(set(want) - set(got))[:2]
            extra = sorted(set(got) - set(want))[:2]
            wrong = [k for k in want if k in got and got[k] != want[k]][:2]
            raise AdapterError(
                f"adapter does not match the tokenizer layout: missing {missing}, unexpected {extra}, "
                f"wrong shape {wrong}"
            )


def _module_order(key: str) -> tuple:
    """Sort keys by layer number, then name, so tokens follow the network's depth."""
    parts = key.split(".")
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)
