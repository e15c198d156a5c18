"""The Python API: a trained generator that turns prompts into a PEFT adapter, Delta Activations of any adapter or
fine-tuned model, and a built zoo with its δ.

Everything here wraps the pipeline's own functions, so the API and the CLI give the same adapters. The
encoder and the generator are loaded once per object and reused across calls. ``device`` (default the CPU) is
where they compute; tensors the API returns are on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

from deltalora.config import DeltaConfig, RuntimeConfig
from deltalora.delta.embed import Embedder
from deltalora.device import runtime
from deltalora.generator.artifact import GeneratorCard, LoadedGenerator, load_generator
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.generate import generate, generate_tensors
from deltalora.generator.retrieval import is_retrieval, retrieve
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import lora_config, read_adapter
from deltalora.zoo.manifest import Checkpoint, Manifest


class Generator:
    """A trained prompt-to-LoRA generator (or a retrieval index), ready to emit adapters for prompts."""

    def __init__(self, folder: str | Path, encoder: PromptEncoder | None = None, device: str = "cpu"):
        self.folder = Path(folder)
        on = runtime(RuntimeConfig(device)).device
        self.encoder = encoder or PromptEncoder(device=on)
        self._loaded: LoadedGenerator | None = None if is_retrieval(self.folder) else load_generator(self.folder, on)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, encoder: PromptEncoder | None = None, device: str = "cpu"
    ) -> Generator:
        """Load a folder written by ``deltalora train-generator`` (self-contained: no zoo needed) onto ``device``
        (auto, cpu, cuda or cuda:N)."""
        return cls(folder, encoder, device)

    @property
    def card(self) -> GeneratorCard | None:
        """How it was trained and what it emits (None for a retrieval index)."""
        return self._loaded.card if self._loaded else None

    def lora_tensors(self, prompts: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
        """The adapter's LoRA tensors (PEFT's saved key names) for these prompts; ``seed`` draws the N prompts."""
        return self._adapter(prompts, seed)[1]

    def peft_model(self, base: torch.nn.Module, prompts: list[str], seed: int = 0) -> PeftModel:
        """``base`` wrapped with the generated adapter, in eval mode (the base is modified in place, as PEFT does)."""
        config, tensors = self._adapter(prompts, seed)
        model = get_peft_model(base, lora_config(config["r"], config["lora_alpha"], config["target_modules"]))
        set_peft_model_state_dict(model, tensors)
        return model.eval()

    def save_adapter(self, prompts: list[str], out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
        """Write the adapter as a PEFT folder (with provenance and a model card); returns its path."""
        generate(self.folder, prompts, out_dir, seed, self.encoder, overwrite, self._loaded)
        return Path(out_dir)

    def _adapter(self, prompts: list[str], seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
        if self._loaded is None:
            config, tensors = read_adapter(retrieve(self.folder, prompts, self.encoder)[1])
            return config, tensors
        return self._loaded.card.adapter_config, generate_tensors(self._loaded, self.encoder, prompts, seed)


class Zoo:
    """A zoo built by ``deltalora zoo build``: its checkpoints, their adapters and their Delta Activations."""

    def __init__(self, workspace: str | Path):
        self.ws = Workspace(Path(workspace))
        self.manifest = Manifest.from_file(self.ws.manifest)

    @classmethod
    def from_workspace(cls, workspace: str | Path) -> Zoo:
        """The zoo of a workspace folder (e.g. ``runs/small``)."""
        return cls(workspace)

    def folder(self, checkpoint: Checkpoint) -> Path:
        """A checkpoint's PEFT adapter folder."""
        return self.ws.zoo / checkpoint.path

    def tensors(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """A checkpoint's LoRA tensors, checked against its recorded sha256."""
        return read_adapter(self.folder(checkpoint), checkpoint.sha256)[1]

    def deltas(self, n_probes: int = 5) -> dict[str, torch.Tensor]:
        """δ of every checkpoint (keyed by ``Checkpoint.path``), as ``deltalora delta compute`` wrote them."""
        from deltalora.delta.compute import load_deltas

        return load_deltas(self.ws, n_probes)


class DeltaActivations:
    """Delta Activations on one base: δ of a PEFT adapter folder, a full fine-tuned model folder, LoRA tensors,
    or a model in memory; the base's probe activations are computed once and reused."""

    def __init__(self, base: str = "smollm2-135m", n_probes: int = 5, device: str = "cpu"):
        self._embedder = Embedder(base, DeltaConfig(n_probes=n_probes), runtime(RuntimeConfig(device)).device)
        self.base = self._embedder.model
        """The base model (fp32, eval mode, on ``device``)."""

    @classmethod
    def from_pretrained(cls, base: str = "smollm2-135m", n_probes: int = 5, device: str = "cpu") -> DeltaActivations:
        """Load the base (a known name, a Hub id or a folder) and its probe activations, on ``device`` (auto, cpu,
        cuda or cuda:N)."""
        return cls(base, n_probes, device)

    def __call__(self, adapter: str | Path | torch.nn.Module) -> torch.Tensor:
        """δ [hidden] (on the CPU) of a folder (PEFT LoRA of any rank and targets, or a full fine-tune of the base's
        architecture) or of a model in memory on this object's device (a ``PeftModel`` with its adapter active, or a
        fine-tuned model)."""
        if isinstance(adapter, torch.nn.Module):
            return self._embedder.probe.delta(adapter).cpu()
        return self._embedder.embed(adapter)[0]

    def of_tensors(self, tensors: dict[str, torch.Tensor], r: int, alpha: float) -> torch.Tensor:
        """δ of LoRA tensors in PEFT's saved key form (target modules read off the keys)."""
        targets = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in tensors})
        model = get_peft_model(self.base, lora_config(r, alpha, targets))
        try:
            set_peft_model_state_dict(model, tensors)
            return self._embedder.probe.delta(model.eval()).cpu()
        finally:
            self.base = model.unload()
