"""Shared fixtures: one tiny zoo per session, tiny JSONL tasks, a fresh tiny base model.

Everything runs on the random 2-layer llama (`deltalora.lm.models.tiny_llama`, base name
"tiny") and synthetic or small JSONL tasks: no downloads, a few seconds of CPU.
"""

from __future__ import annotations

import os

# Tests never touch the network (set before transformers / huggingface_hub are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from deltalora.config import Preset
from deltalora.presets import get_preset
from deltalora.workspace import Workspace
from deltalora.zoo.build import build_zoo
from deltalora.zoo.manifest import Checkpoint, Manifest

# Keep torch polite on a shared 2-core machine.
torch.set_num_threads(1)


@dataclass
class Zoo:
    preset: Preset
    ws: Workspace
    manifest: Manifest

    @property
    def workspace(self) -> Path:
        """The workspace folder (``ws.root``)."""
        return self.ws.root

    @property
    def root(self) -> Path:
        """The zoo root (``ws.zoo``); manifest paths are relative to it."""
        return self.ws.zoo

    def folder(self, task: str, final: bool = True, seed: int = 0) -> Path:
        """Adapter folder of a task's (final or first kept) checkpoint."""
        cands = [c for c in self.manifest if c.task == task and c.seed == seed and c.final == final]
        assert cands, f"no checkpoint for {task} (final={final}) in the manifest"
        return self.root / cands[0].path

    def checkpoint(self, task: str, final: bool = True, seed: int = 0) -> Checkpoint:
        return next(c for c in self.manifest if c.task == task and c.seed == seed and c.final == final)


@pytest.fixture(scope="session")
def tiny_preset() -> Preset:
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, tiny_preset) -> Zoo:
    """The whole `tiny` preset zoo (4 tasks, 1 seed, 2 checkpoints each, one pair), built once."""
    ws = Workspace(tmp_path_factory.mktemp("tiny_ws"))
    manifest = build_zoo(tiny_preset, ws)
    return Zoo(tiny_preset, ws, manifest)


@pytest.fixture
def adapter_copy(tiny_zoo, tmp_path) -> Path:
    """A private copy of a trained adapter folder (syn.add, final step) that a test may edit."""
    dst = tmp_path / "adapter"
    shutil.copytree(tiny_zoo.folder("syn.add"), dst)
    return dst


@pytest.fixture
def tiny_base():
    """A fresh tiny base model (fp32, eval) and its tokenizer, named "tiny"."""
    from deltalora.lm.models import load_base

    return load_base("tiny")


def write_jsonl(path: Path, rows) -> Path:
    """Write rows (dicts are JSON-encoded, strings written as is) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def mc_rows(n: int = 40, prefix: str = "Q") -> list[dict]:
    return [
        {
            "prompt": f"{prefix}{i}: what is {i} plus one?\nA:",
            "choices": [str(i), str(i + 1), str(i + 2)],
            "answer": str(i + 1),
        }
        for i in range(n)
    ]


def exact_rows(n: int = 40) -> list[dict]:
    return [{"prompt": f"Repeat word{i}:", "target": f"word{i}"} for i in range(n)]


@pytest.fixture
def jsonl_writer(tmp_path):
    """Factory: ``jsonl_writer(name, rows) -> path`` inside this test's tmp dir."""

    def make(name: str, rows) -> Path:
        return write_jsonl(tmp_path / name, rows)

    return make


def leftover_tmp(root: Path) -> list[Path]:
    """Temporary files/folders of the atomic writers (``.<name>.<random>.tmp``) under root."""
    return [p for p in Path(root).rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def tree_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in Path(root).rglob("*") if p.is_file()}
