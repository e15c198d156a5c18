"""Delta Activations of every zoo checkpoint: resumable, sharded by rank under torchrun."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from deltalora.config import DeltaConfig, Preset
from deltalora.delta.probes import DeltaProbe, probe_prompts
from deltalora.device import module_device, runtime
from deltalora.distributed import barrier, init_distributed
from deltalora.errors import ArtifactError
from deltalora.io import atomic_write_bytes, atomic_write_json, remove_stale_tmp
from deltalora.lm.models import load_base
from deltalora.outputs import own_dir
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import AdapterSwapper
from deltalora.zoo.manifest import Checkpoint, Manifest


def delta_stage(
    preset: Preset, ws: Workspace, probe_sizes: tuple[int, ...] = (5,), pool: tuple[str, ...] | None = None
) -> None:
    """Delta Activations for every checkpoint of the zoo (of the ``pool`` tasks only, if given), per probe-set size,
    on ``preset.runtime``'s device (always fp32)."""
    manifest = Manifest.from_file(ws.manifest)
    if pool is not None:
        manifest = manifest.within(pool)
    base, tok = load_base(preset.base, runtime(preset.runtime).device)
    for n in probe_sizes:
        compute_zoo_deltas(
            base, tok, ws, list(manifest), dataclasses.replace(preset.delta, n_probes=n), base_name=preset.base
        )


def compute_zoo_deltas(
    base: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    ws: Workspace,
    checkpoints: Sequence[Checkpoint],
    cfg: DeltaConfig,
    base_name: str | None = None,
    save_every: int = 25,
) -> dict[str, torch.Tensor]:
    """δ for every checkpoint given, on the base's device; resumable (finished ones are kept on disk).

    Under torchrun the checkpoints are sharded by rank; each rank writes its own part
    file and rank 0 merges them.
    """
    info = init_distributed(module_device(base))
    if info.is_main:  # a folder that deltalora did not write is refused, not filled
        own_dir(ws.delta, "delta")
    barrier()
    out_file = ws.deltas(cfg.n_probes)
    merged = load_file(out_file) if out_file.exists() else {}
    mine = info.shard([c for c in checkpoints if c.path not in merged])
    part_file = out_file if info.world == 1 else ws.deltas(cfg.n_probes, info.rank)
    remove_stale_tmp(ws.delta, prefix=f".{part_file.name}.")
    done = dict(merged) if info.world == 1 else (load_file(part_file) if part_file.exists() else {})
    todo = [c for c in mine if c.path not in done]
    if todo:
        probe = DeltaProbe(tok, cfg)
        probe.set_base(base)
        swapper = AdapterSwapper.like(base, ws.zoo / todo[0].path, base_name)
        try:
            t0 = time.perf_counter()
            for i, c in enumerate(tqdm(todo, desc=f"delta (|P|={cfg.n_probes})", unit="adapter"), 1):
                done[c.path] = probe.delta(swapper.load(ws.zoo / c.path, c.sha256)).cpu().contiguous()
                if i % save_every == 0 or i == len(todo):
                    atomic_write_bytes(part_file, save(done))
            seconds = time.perf_counter() - t0
        finally:
            swapper.unload()
        if info.is_main:
            atomic_write_json(
                ws.delta_timing(cfg.n_probes),
                {"n_adapters": len(todo), "seconds": seconds, "seconds_per_adapter": seconds / len(todo)},
            )
    barrier()
    if info.world > 1 and info.is_main:
        parts = [ws.deltas(cfg.n_probes, r) for r in range(info.world) if ws.deltas(cfg.n_probes, r).exists()]
        for f in parts:
            merged.update(load_file(f))
        atomic_write_bytes(out_file, save(merged))
        for f in parts:  # only the part files this run's ranks wrote
            f.unlink()
    if info.is_main:
        atomic_write_json(
            ws.delta_config,
            {"delta": {"n_probes": cfg.n_probes, "batch_size": cfg.batch_size}, "probes": probe_prompts(cfg.n_probes)},
        )
    barrier()
    return load_file(out_file) if out_file.exists() else done


def load_deltas(ws: Workspace, n_probes: int = 5) -> dict[str, torch.Tensor]:
    """δ of every checkpoint (keyed by its manifest path) for a probe-set size."""
    f = ws.deltas(n_probes)
    if not f.exists():
        raise ArtifactError(
            f"{f}: no Delta Activations computed for |P|={n_probes}; run `deltalora delta compute --probes {n_probes}`"
        )
    return load_file(f)
