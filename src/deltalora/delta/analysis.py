"""Embedding quality of Delta Activations: silhouette by domain, 2-D map, additivity."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deltalora.io import atomic_write_bytes
from deltalora.zoo.manifest import Manifest


def cosine_distance(x: np.ndarray) -> np.ndarray:
    """The paper's distance clip(1 − cos, 0, 1) between the rows of ``x``, with an exact zero diagonal."""
    return cosine_distance_from_gram(gram(x))


def gram(x: np.ndarray) -> np.ndarray:
    """Inner products of the rows, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def cosine_distance_from_gram(g: np.ndarray) -> np.ndarray:
    """``cosine_distance`` of rows known only by their Gram matrix (a zero row is at distance 1 from all)."""
    norm = np.sqrt(np.clip(np.diag(g), 1e-24, None))
    d = np.clip(1.0 - g / np.outer(norm, norm), 0.0, 1.0)
    np.fill_diagonal(d, 0.0)
    return d


def flat_weights(adapters: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
    """Each adapter's tensors flattened and concatenated in key order, one row per adapter."""
    return np.stack([np.concatenate([t[k].flatten().numpy() for k in sorted(t)]) for t in adapters])


def silhouette(x: np.ndarray, labels: Sequence[str]) -> float:
    """Silhouette of ``x`` by ``labels`` on the paper's cosine distance."""
    from sklearn.metrics import silhouette_score

    if len(set(labels)) < 2 or len(set(labels)) >= len(labels):
        raise ValueError("silhouette needs at least 2 labels and fewer labels than points")
    return float(silhouette_score(cosine_distance(x), list(labels), metric="precomputed"))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors, in float64."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def additivity(deltas: dict[str, torch.Tensor], manifest: Manifest) -> list[dict]:
    """For each pair adapter a+b: cos(δ_ab, δ_a + δ_b) against cos(δ_ab, δ_a) and cos(δ_ab, δ_b).

    δ_a, δ_b are the final checkpoints of the same seed as the pair adapter.
    """
    final = {(c.task, c.seed): deltas[c.path] for c in manifest if c.final and c.path in deltas}
    rows = []
    for c in manifest:
        if not c.final or not c.is_pair or c.path not in deltas:
            continue
        a, b = c.pair_of
        if (a, c.seed) not in final or (b, c.seed) not in final:
            continue
        d_ab, d_a, d_b = deltas[c.path], final[(a, c.seed)], final[(b, c.seed)]
        rows.append(
            {
                "pair": c.task,
                "cos_sum": round(cos(d_ab, d_a + d_b), 4),
                "cos_a": round(cos(d_ab, d_a), 4),
                "cos_b": round(cos(d_ab, d_b), 4),
            }
        )
    return rows


def plot_map(
    x: np.ndarray,
    labels: Sequence[str],
    names: Sequence[str],
    out: Path,
    title: str,
    kinds: Sequence[str] | None = None,
) -> None:
    """t-SNE of the cosine distances (PCA below 8 points), coloured by domain; ``kinds`` (e.g.
    reference vs each generator) get one marker each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    if len(x) >= 8:
        xy = TSNE(
            n_components=2, metric="precomputed", init="random", random_state=0, perplexity=min(15.0, (len(x) - 1) / 3)
        ).fit_transform(cosine_distance(x))
    else:  # too few points for t-SNE: the top two principal directions of the unit vectors
        unit = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
        centred = unit - unit.mean(0)
        xy = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    fig, ax = plt.subplots(figsize=(7, 5.5))
    kinds = list(kinds) if kinds is not None else [""] * len(x)
    marks = dict(zip(dict.fromkeys(kinds), "o*^sDvP<>X"))
    for i, dom in enumerate(sorted(set(labels))):
        for kind, mk in marks.items():
            m = np.array([lab == dom and k == kind for lab, k in zip(labels, kinds)])
            if m.any():
                ax.scatter(
                    xy[m, 0],
                    xy[m, 1],
                    s=28 if mk == "o" else 40,
                    marker=mk,
                    color=plt.cm.tab10(i % 10),
                    label=dom if kind == kinds[0] or len(marks) == 1 else None,
                )
    for kind, mk in marks.items() if len(marks) > 1 else ():
        ax.scatter([], [], marker=mk, color="grey", label=kind)
    if len(x) <= 60:  # small zoos: name every point
        for (px, py), name in zip(xy, names):
            ax.annotate(
                name.rsplit(".", 1)[-1], (px, py), fontsize=6, alpha=0.8, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
