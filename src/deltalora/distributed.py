"""PyTorch distributed set-up for runs launched by ``torchrun`` or ``accelerate launch``.

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain
``python`` run is rank 0 of 1 and never touches ``torch.distributed``. Zoo building and δ
computation shard adapters by rank; generator training wraps the model in DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's rank and the world size (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """True on the rank that writes shared files."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share: round-robin, so every rank gets a similar mix of tasks."""
        return items[self.rank :: self.world]


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the process group the launcher set up; rank 0 of 1 otherwise.

    The backend follows the device the stage computes on (``deltalora.device.resolve_device``, which also makes
    each rank's LOCAL_RANK GPU its current one): NCCL for a CUDA device, gloo for the CPU (and when no device is
    given). The first call of a process decides; every stage of one process runs on one device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
