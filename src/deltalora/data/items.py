"""Task items and tasks: what is trained on and scored."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    """One scored example: ``choices`` empty means exact match on ``answer``."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()

    @property
    def is_mc(self) -> bool:
        """True for a multiple-choice item."""
        return bool(self.choices)

    def completion(self) -> str:
        """The trained continuation: a leading space keeps BPE word boundaries."""
        return " " + self.answer


@dataclass(frozen=True)
class Task:
    """A named task: its domain, kind (``mc`` or ``exact``) and deterministic train/validation/test split."""

    name: str
    domain: str
    kind: str
    train: tuple[Item, ...]
    test: tuple[Item, ...]
    val: tuple[Item, ...] = ()
    """Carved from the train side (``tasks.n_val``); empty when the preset has none."""


def stable_seed(*parts: object) -> int:
    """A seed derived from the parts, stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")
