"""Where tensors live and in what precision: ``--device`` and ``--dtype`` (``Preset.runtime``), resolved per stage.

The CPU is the default. ``auto`` is the GPU when CUDA is present; under torchrun / accelerate launch each
rank takes the GPU of its ``LOCAL_RANK``. Networks are built on the CPU and then moved, and seeded draws
(batches, prompt draws, noise) come from CPU generators and are moved after, so a seed gives the same
initialisation and the same samples on every device. fp32 on a GPU is plain fp32 (TF32 off). bf16
autocast (CUDA only) covers the training forwards of zoo LoRAs and of the generator network; δ (targets,
the exact-δ and KL terms) and every score stay fp32, because δ is a small difference of two large
activations.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass

import torch

from deltalora.config import RuntimeConfig
from deltalora.errors import ConfigError, UsageError

CPU = torch.device("cpu")


def resolve_device(spec: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device with an explicit index, checked against this machine.

    A CUDA device also becomes the process's current one, so NCCL collectives use it.
    """
    RuntimeConfig(device=spec)  # the form, checked where the config field is
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return CPU
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {spec}: no CUDA device on this machine (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False); use --device cpu or --device auto"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if spec == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0")) if launched else torch.cuda.current_device()
    elif launched:
        raise UsageError(f"--device {spec}: under torchrun each rank takes its LOCAL_RANK GPU; give --device cuda")
    else:
        index = int(spec.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) (0-based)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Runtime:
    """A stage's resolved device and precision."""

    device: torch.device
    dtype: str
    """``fp32`` or ``bf16`` (autocast over training forwards, CUDA only)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of a training forward (a no-op for fp32)."""
        return autocast(self.device, self.dtype)


def runtime(cfg: RuntimeConfig) -> Runtime:
    """The device and precision a preset's ``runtime`` section asks for, checked against this machine."""
    device = resolve_device(cfg.device)
    if cfg.dtype == "bf16" and device.type != "cuda":
        raise ConfigError(f"--dtype bf16 needs a CUDA device (--device cuda); this run is on {device}, use fp32")
    if device.type == "cuda" and cfg.dtype == "fp32":
        # fp32 means fp32: TF32 (cuDNN's default for convolutions) keeps 10 mantissa bits
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return Runtime(device, cfg.dtype)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``dtype == "bf16"``, else nothing."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """fp32 inside a bf16 autocast region (the δ and KL terms): CUDA autocast off; nothing elsewhere."""
    return torch.autocast("cuda", enabled=False) if device.type == "cuda" else contextlib.nullcontext()


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return CPU if first is None else first.device


def device_name(device: torch.device) -> str:
    """``cpu`` or the GPU's model name, e.g. ``NVIDIA H100 80GB HBM3``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
