"""Gradients of one fixed generator step on the ``tiny`` preset, saved by rank 0.

    torchrun --nproc-per-node N -m deltalora.generator.ddp_check WORKSPACE OUT.safetensors VARIANT

Run with N = 1 and N = 2 and compare the files: data-parallel training must give the
single-process gradient (used by tests/test_distributed.py and benchmarks/ddp_equivalence.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltalora.distributed import init_distributed
from deltalora.generator.train import gradient_snapshot
from deltalora.presets import apply_overrides, get_preset
from deltalora.workspace import Workspace


def main(argv: list[str] | None = None) -> None:
    """Save one fixed step's gradients: ``WORKSPACE OUT VARIANT``."""
    workspace, out, variant = (argv or sys.argv[1:])[:3]
    torch.set_num_threads(1)
    preset = apply_overrides(
        get_preset("tiny"), [f"generator.variant={variant}", "generator.batch_size=4", "generator.exact_samples=3"]
    )
    grads = gradient_snapshot(
        preset,
        Workspace(Path(workspace)),
        list(preset.pool),
        torch.tensor([0, 2, 1, 3]),
        torch.tensor([11, 12, 13, 14]),
    )
    if init_distributed().is_main:
        save_file({k: v.contiguous() for k, v in grads.items()}, out)


if __name__ == "__main__":
    main()
