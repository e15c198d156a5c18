"""δ to first order in the basis head's coefficients: an exact-δ loss at the cost of a matrix product.

A basis-head generator emits mean + Σ_k c_k d_k. Around each training checkpoint's own coefficients c*
(its projection on the directions), δ(c) ≈ δ* + J (c − c*), where δ* is the δ of that projection and
J = ∂δ/∂c is measured once, by forward differences through the frozen base model (K + 1 probe passes per
checkpoint, no backward). ‖δ* + J (c − c*) − δ‖² then weighs every coefficient error by how much it changes
the model's behaviour, and costs nothing per step; ``check`` compares it with the exact δ of generated adapters.
The Jacobians depend only on the targets, the basis and the probes, so they are cached in the workspace and
shared by every seed and variant trained on the same tasks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from deltalora.delta.analysis import cos
from deltalora.generator.basis import BasisHead
from deltalora.generator.lora_tokens import LoraTokenizer
from deltalora.generator.loss import ExactBehaviour
from deltalora.io import atomic_write_bytes, build_once

EPS = 0.05
"""Forward-difference step in coefficient units (each direction is scaled by the zoo's std along it, so
0.05 is 5% of the zoo's spread: small enough for first order, large against fp32 rounding of δ)."""


class LinearDelta:
    """Per training checkpoint: its coefficients c* [M, K], δ* [M, D] and J [M, D, K], δ divided by ``scale``."""

    def __init__(
        self,
        head: BasisHead,
        tokens: torch.Tensor,
        tokenizer: LoraTokenizer,
        exact: ExactBehaviour,
        scale: float,
        cache_dir: Path | None = None,
    ):
        self.mean, self.scale, self.tokenizer, self.exact = head.mean.detach(), scale, tokenizer, exact
        self.dirs = head.directions.detach()  # unused directions (a zoo of M targets spans M - 1) are zero
        self.sq = self.dirs.flatten(1).pow(2).sum(1).clamp_min(1e-30)  # a zero direction gets coefficient 0
        self.c_star = self.coefficients(tokens)
        cached = None
        if cache_dir is not None and tokens.device.type != "meta":  # shapes only on meta: nothing to keep
            key = hashlib.sha256(repr((exact.probe.n, EPS, scale)).encode())
            for t in (self.mean, self.dirs, self.c_star):
                key.update(t.cpu().contiguous().numpy().tobytes())
            cached = cache_dir / f"{key.hexdigest()[:20]}.safetensors"
        if cached is None:
            self.d_star, self.jac = self._measure()
            return

        def measure() -> None:
            d_star, jac = self._measure()
            atomic_write_bytes(cached, save({"d_star": d_star.cpu().contiguous(), "jac": jac.cpu().contiguous()}))

        # two experiment processes training seeds of one cell need the same Jacobians: one measures them
        build_once(cached.with_suffix(".lock"), cached.exists, measure)
        saved = load_file(cached)  # float32 both ways: the measuring process reads back what it measured
        self.d_star, self.jac = saved["d_star"].to(tokens.device), saved["jac"].to(tokens.device)

    def coefficients(self, tokens: torch.Tensor) -> torch.Tensor:
        """Coefficients [b, K] of tokens [b, T, width] on the (orthogonal) directions: exact for the basis head's
        own output, the least-squares projection otherwise."""
        return torch.einsum("btw,ktw->bk", tokens - self.mean, self.dirs) / self.sq

    @torch.no_grad()
    def _measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        def delta(c: torch.Tensor) -> torch.Tensor:
            return self.exact_delta(self.mean + torch.einsum("k,ktw->tw", c, self.dirs))

        used = (self.sq > 1e-29).tolist()  # an unused (zero) direction moves nothing: its column stays zero
        d_star, jac = [], []
        for c in tqdm(self.c_star, desc="linearised δ", unit="checkpoint", leave=False):
            d0 = delta(c)
            eye = torch.eye(len(c), device=c.device, dtype=c.dtype)
            jac.append(torch.stack([(delta(c + EPS * e) - d0) / EPS if u else 0 * d0 for e, u in zip(eye, used)], 1))
            d_star.append(d0)
        return torch.stack(d_star), torch.stack(jac)

    def __call__(self, pred: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """First-order δ [b, D] (divided by ``scale``) of generated tokens [b, T, width] of samples whose
        checkpoints are ``idx``; differentiable in ``pred``."""
        dc = self.coefficients(pred) - self.c_star[idx]
        return self.d_star[idx] + torch.einsum("bdk,bk->bd", self.jac[idx], dc)

    def exact_delta(self, tokens: torch.Tensor) -> torch.Tensor:
        """The exact δ (divided by ``scale``) of one adapter's tokens [T, width], through the base model."""
        return self.exact.delta(self.tokenizer.decode(tokens)) / self.scale

    @torch.no_grad()
    def check(self, pred: torch.Tensor, idx: torch.Tensor) -> dict:
        """How well the first order matches: the exact δ of each generated adapter against its linearised δ
        (relative error and cosine, means over the samples), and the same for its checkpoint's δ*."""
        lin = self(pred, idx)
        out = {"rel_err": [], "cos": [], "rel_err_constant": []}
        for b in range(len(pred)):
            true = self.exact_delta(pred[b])
            out["rel_err"].append(((lin[b] - true).norm() / true.norm()).item())
            out["cos"].append(cos(lin[b], true))
            out["rel_err_constant"].append(((self.d_star[idx[b]] - true).norm() / true.norm()).item())
        return {k: sum(v) / len(v) for k, v in out.items()}
