"""Output heads of the generator, and the principal directions of a zoo's weight targets that one of them uses.

A generator that learns the mean adapter and ignores its prompts is the failure DnD's users report. The
``basis`` head makes the prompt dependence explicit and cheap to learn: the output is the mean target plus a
prompt-dependent combination of the top principal directions of the training targets (each scaled by its
standard deviation), so that reproducing any training adapter is a matter of k coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Head:
    """How the generator's output is formed."""

    name: str
    summary: str
    conv: bool
    """DnD's hyper-convolutional decoder over the N condition maps."""
    basis: bool
    """Coefficients on the training targets' principal directions, from the pooled condition."""


HEADS: dict[str, Head] = {
    h.name: h
    for h in (
        Head("conv", "DnD's hyper-convolutional decoder over the N prompt maps", conv=True, basis=False),
        Head(
            "basis", "mean target + coefficients on its top principal directions, from the pooled prompts", False, True
        ),
        Head("basis+conv", "both, summed: the basis carries the task, the decoder a residual", True, True),
    )
}
"""Every head ``generator.head`` may name."""


def principal_basis(
    x: torch.Tensor, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Mean, orthonormal directions [M', P] (largest variance first) and variance per direction of the rows of
    ``x`` [M, P] (those not in ``exclude``), from the M×M Gram matrix: P is the adapter's size, M a few hundred."""
    rows = x if exclude is None else x[~exclude]
    mean = rows.mean(0)
    c = (rows - mean).double()
    evals, evecs = torch.linalg.eigh(c @ c.T)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp(min=0), evecs[:, order]
    keep = evals > evals[0] * 1e-10
    basis = (evecs[:, keep].T @ c) / evals[keep].sqrt()[:, None]
    return mean, basis.to(x.dtype), (evals[keep] / len(rows)).cpu().numpy()


def project(target: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, k: int) -> torch.Tensor:
    """The best approximation of ``target`` in mean + span(first k directions) (least squares)."""
    d = (target - mean).double()
    top = basis[:k].double()
    return (mean.double() + (top @ d) @ top).to(target.dtype)


class BasisHead(nn.Module):
    """A condition vector [B, d] -> mean + Σ_k c_k(cond) σ_k u_k, tokens [B, T, width].

    The mean and the scaled directions are buffers (saved with the generator, set once from the training
    targets by ``fit``); only the coefficient network is trained. Coefficients start at zero, so training
    starts from the mean adapter and moves away from it only as far as the prompts explain. Its input LayerNorm
    makes it read a condition's direction, not its length: B's G_θ decodes c·δ (c > 0) as δ.
    """

    def __init__(self, d_cond: int, rank: int, n_tokens: int, width: int, hidden: int = 256):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_tokens, width))
        self.register_buffer("directions", torch.zeros(rank, n_tokens, width))
        self.net = nn.Sequential(nn.LayerNorm(d_cond), nn.Linear(d_cond, hidden), nn.GELU(), nn.Linear(hidden, rank))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @torch.no_grad()
    def fit(self, targets: torch.Tensor) -> None:
        """Set the mean and the top directions (each times its std) from training targets [M, T, width]."""
        mean, basis, var = principal_basis(targets.flatten(1).to(self.mean.device))
        k = min(len(self.directions), len(basis))
        scale = torch.as_tensor(np.sqrt(var[:k]), dtype=basis.dtype, device=basis.device)
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.directions.zero_()
        self.directions[:k] = (basis[:k] * scale[:, None]).reshape(k, *self.mean.shape)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Tokens for a batch of condition vectors."""
        return self.mean + torch.einsum("bk,ktw->btw", self.net(cond), self.directions)
