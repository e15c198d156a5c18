"""How well an embedding of adapters separates tasks and families, against a permutation null.

Every embedding enters as its Gram matrix of inner products, so the LoRA product ΔW = BA (13M numbers per
adapter for SmolLM2) is compared without ever being materialised (``delta_w_gram``), and removing the common
mean direction is a double centring of the Gram matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import silhouette_score


def delta_w_gram(adapters: Sequence[dict[str, torch.Tensor]], scale: float = 1.0) -> np.ndarray:
    """Gram matrix of the adapters' ΔW = scale·B·A over every LoRA module, from r×r products only:
    <B₁A₁, B₂A₂>_F = tr((B₁ᵀB₂)(A₂A₁ᵀ))."""
    modules = sorted(k[: -len(".lora_A.weight")] for k in adapters[0] if k.endswith(".lora_A.weight"))
    n = len(adapters)
    g = np.zeros((n, n))
    for m in modules:
        a = torch.stack([ad[f"{m}.lora_A.weight"] for ad in adapters]).double()  # n, r, in
        b = torch.stack([ad[f"{m}.lora_B.weight"] for ad in adapters]).double()  # n, out, r
        btb = torch.einsum("ior,jos->ijrs", b, b)  # B_iᵀ B_j
        aat = torch.einsum("jsk,irk->ijsr", a, a)  # A_j A_iᵀ
        g += torch.einsum("ijrs,ijsr->ij", btb, aat).numpy()
    return g * scale**2


def centred(g: np.ndarray) -> np.ndarray:
    """The Gram matrix of the rows minus their mean (the common direction removed)."""
    j = np.eye(len(g)) - 1.0 / len(g)
    return j @ g @ j


def nn_accuracy(dist: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-neighbour retrieval: the fraction of points whose nearest other point shares the label."""
    d = dist + np.diag(np.full(len(dist), np.inf))
    return float(np.mean(labels[np.argmin(d, 1)] == labels))


def separation(dist: np.ndarray, labels: Sequence[str], permutations: int, seed: int = 0) -> dict:
    """Silhouette and 1-NN retrieval by ``labels``, each with the mean, 95th percentile and p-value of the same
    statistic under shuffled labels (``permutations`` draws)."""
    lab = np.asarray(labels)
    rng = np.random.default_rng(seed)
    stats = {
        "silhouette": lambda y: float(silhouette_score(dist, y, metric="precomputed")),
        "nn_accuracy": lambda y: nn_accuracy(dist, y),
    }
    out = {"n": len(lab), "n_labels": len(set(labels))}
    draws = [rng.permutation(lab) for _ in range(permutations)]
    for name, f in stats.items():
        observed = f(lab)
        null = np.array([f(y) for y in draws])
        out[name] = {
            "value": round(observed, 4),
            "null_mean": round(float(null.mean()), 4),
            "null_p95": round(float(np.quantile(null, 0.95)), 4),
            "p": round(float((1 + np.sum(null >= observed)) / (1 + permutations)), 4),
        }
    return out
