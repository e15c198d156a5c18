"""deltalora: behaviour-aware data-to-LoRA generation.

The Python API (imported on first use, so ``import deltalora`` stays light)::

    from deltalora import DeltaActivations, Generator, Zoo, load_base
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "Generator": "deltalora.api",
    "DeltaActivations": "deltalora.api",
    "Zoo": "deltalora.api",
    "load_base": "deltalora.lm.models",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'deltalora' has no attribute {name!r}")
