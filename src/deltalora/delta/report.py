"""How well Delta Activations separate the zoo: silhouette (δ vs flattened weights), 2-D map, additivity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from deltalora.delta.analysis import additivity, flat_weights, plot_map, silhouette
from deltalora.delta.compute import load_deltas
from deltalora.io import atomic_write_json, read_json
from deltalora.workspace import Workspace
from deltalora.zoo.manifest import Manifest


def _silhouette_or_none(x: np.ndarray, labels: list[str]) -> float | None:
    """None where silhouette is undefined (one domain, or a domain per adapter) rather than failing the report."""
    if not 2 <= len(set(labels)) < len(labels):
        return None
    return round(silhouette(x, labels), 4)


def delta_report(
    ws: Workspace,
    out_json: Path,
    out_png: Path,
    pool: tuple[str, ...] | None = None,
    probe_sizes: tuple[int, ...] = (1, 5, 20),
) -> dict:
    """Silhouette by domain for δ and flattened weights, the 2-D map, additivity; saved as JSON + PNG.

    With ``pool``, only adapters of those tasks (and pairs of them) count: candidates
    dropped from the pool stay in the zoo folder but not in the analysis.
    """
    manifest = Manifest.from_file(ws.manifest)
    if pool is not None:
        manifest = manifest.within(pool)
    finals = manifest.finals()
    labels = [c.domain for c in finals]
    paths = [c.path for c in finals]
    deltas5 = load_deltas(ws, 5)
    x = np.stack([deltas5[p].numpy() for p in paths])
    result: dict = {
        "n_adapters": len(finals),
        "n_tasks": len({c.task for c in finals}),
        "n_domains": len(set(labels)),
        "unit": "final checkpoint of each (task, seed) run; labels = task domain; distance clip(1-cos, 0, 1)",
        "silhouette_delta": _silhouette_or_none(x, labels),
        "silhouette_flat_weights": _silhouette_or_none(
            flat_weights([load_file(ws.zoo / p / "adapter_model.safetensors") for p in paths]), labels
        ),
        "silhouette_delta_by_probes": {},
        "additivity": additivity(deltas5, manifest),
    }
    for n in probe_sizes:
        if ws.deltas(n).exists():
            d = load_deltas(ws, n)
            result["silhouette_delta_by_probes"][str(n)] = _silhouette_or_none(
                np.stack([d[p].numpy() for p in paths]), labels
            )
    if ws.delta_timing(5).exists():
        result["delta_seconds_per_adapter"] = round(read_json(ws.delta_timing(5))["seconds_per_adapter"], 4)
    if result["additivity"]:
        add = result["additivity"]
        result["additivity_mean"] = {
            k: round(float(np.mean([r[k] for r in add])), 4) for k in ("cos_sum", "cos_a", "cos_b")
        }
    plot_map(
        x,
        labels,
        [c.task for c in finals],
        out_png,
        f"Delta Activations of {len(finals)} adapters (silhouette {result['silhouette_delta']})",
    )
    atomic_write_json(out_json, result)
    return result
