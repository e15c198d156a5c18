"""Gradients of one fixed generator step on the ``tiny`` preset, saved by rank 0.

    torchrun --nproc-per-node N -m deltalora.ddp_check WORKSPACE OUT.safetensors VARIANT

Run with N = 1 and N = 2 and compare the files: data-parallel training must give the
single-process gradient (used by tests/test_distributed.py and benchmarks/ddp_equivalence.py).
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from .config import get_preset
from .distributed import init_distributed
from .generator import gradient_snapshot
from .pipeline import apply_overrides


def main(argv: list[str] | None = None) -> None:
    workspace, out, variant = (argv or sys.argv[1:])[:3]
    torch.set_num_threads(1)
    preset = apply_overrides(get_preset("tiny"), [f"generator.variant={variant}", "generator.batch_size=4",
                                                  "generator.exact_samples=3"])
    grads = gradient_snapshot(preset, workspace, list(preset.pool), torch.tensor([0, 2, 1, 3]), torch.tensor([11, 12, 13, 14]))
    if init_distributed().is_main:
        save_file({k: v.contiguous() for k, v in grads.items()}, out)


if __name__ == "__main__":
    main()
