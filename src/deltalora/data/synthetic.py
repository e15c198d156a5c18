"""Synthetic tasks generated in code, for the ``tiny`` preset and the tests."""

from __future__ import annotations

import random

from deltalora.data.items import Item, stable_seed
from deltalora.errors import TaskError

_WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "chair",
    "grape",
    "house",
    "zebra",
    "mango",
    "olive",
    "queen",
    "robot",
    "sugar",
    "table",
    "water",
    "yacht",
    "bread",
)


def synthetic_items(gen: str) -> list[tuple[Item, str | None]]:
    """96 items of a synthetic generator: ``add``, ``parity``, ``copy`` or ``first``."""
    rng = random.Random(stable_seed("synthetic", gen))
    items = []
    for _ in range(96):
        if gen == "add":
            a, b = rng.randrange(20), rng.randrange(20)
            choices = [str(a + b + d) for d in (0, 1, -1, 2)]
            rng.shuffle(choices)
            items.append(Item(f"{a} plus {b} equals", str(a + b), tuple(choices)))
        elif gen == "parity":
            n = rng.randrange(100)
            items.append(Item(f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd", ("even", "odd")))
        elif gen == "copy":
            w = rng.choice(_WORDS) + rng.choice(_WORDS)
            items.append(Item(f"Repeat: {w}\nAnswer:", w))
        elif gen == "first":
            w = rng.choice(_WORDS)
            letters = sorted({w[0], *rng.sample("abcdefghijklmnopqrstuvwxyz", 3)})[:4]
            if w[0] not in letters:
                letters[-1] = w[0]
            items.append(Item(f"First letter of {w}:", w[0], tuple(letters)))
        else:
            raise TaskError(f"unknown synthetic generator {gen!r}; known: add, parity, copy, first")
    return [(it, None) for it in items]
