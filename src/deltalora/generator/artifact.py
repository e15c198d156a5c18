"""A trained generator on disk: ``config.json`` (a typed, versioned card) and ``generator.safetensors``.

The folder is self-contained: the card holds the preset it was trained with, the LoRA
layout it emits and the adapter config generated adapters declare; the weights file
holds the network, the LoRA-token statistics and the δ scale.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from deltalora.config import Preset, RuntimeConfig
from deltalora.device import CPU, module_device
from deltalora.errors import ArtifactError, GeneratorError
from deltalora.generator.lora_tokens import LoraTokenizer
from deltalora.generator.model import Generator
from deltalora.io import atomic_write_bytes, atomic_write_json, read_json
from deltalora.lm.names import base_id, weights_note

CARD_KIND = "generator"
CARD_VERSION = 1


@dataclass(frozen=True)
class GeneratorCard:
    """What a trained generator is: how it was trained and what it emits."""

    preset: Preset
    """The resolved preset it was trained with (its ``generator`` section is the generator's config)."""
    train_tasks: list[str]
    """Tasks whose zoo checkpoints it was trained on."""
    workspace: str
    """Workspace of the zoo it was trained on (provenance only; not needed to load it)."""
    n_params: int
    """Trainable parameters of the generator."""
    lora_params: int
    """LoRA parameters it emits."""
    n_tokens: int
    """LoRA tokens it emits."""
    d_delta: int
    """Dimension of δ."""
    adapter_config: dict[str, Any]
    """r, lora_alpha, target_modules and base model of the adapters it emits."""
    shapes: dict[str, list[int]]
    """Shape of every LoRA tensor it emits (PEFT's saved key form)."""
    width: int
    """LoRA token width."""
    train_seconds: float | None = None
    """Wall time of training (None while training)."""
    steps_done: int | None = None
    """Optimizer steps done (None while training)."""
    world_size: int | None = None
    """Processes that trained it."""
    best_step: int | None = None
    """With validation (``generator.val_every``): the step whose weights were kept (lowest validation loss)."""
    val_loss: float | None = None
    """With validation: that step's validation loss."""
    linear_check: dict[str, float] | None = None
    """Linearised-δ variants: the first-order δ of the kept generator's adapters (one per training task, from its
    train prompts) against their exact δ: mean relative error and cosine, and the relative error of the constant
    δ* alone (``LinearDelta.check``)."""

    @property
    def n_prompts(self) -> int:
        """Prompts per condition batch."""
        return self.preset.generator.n_prompts

    @property
    def variant(self) -> str:
        """The generator's variant name."""
        return self.preset.generator.variant

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (unset training results left out)."""
        d = {"kind": CARD_KIND, "version": CARD_VERSION, **dataclasses.asdict(self)}
        return {k: v for k, v in d.items() if v is not None}

    def to_file(self, path: Path) -> None:
        """Write atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_file(cls, path: Path) -> GeneratorCard:
        """Read a card; a file that is not one of this version is refused by path."""
        raw = read_json(path, "generator config")
        if not isinstance(raw, dict) or raw.get("kind") != CARD_KIND:
            raise GeneratorError(f"{path}: not a trained generator (expected field 'kind' = {CARD_KIND!r})")
        if raw.get("version") != CARD_VERSION:
            raise ArtifactError(
                f"{path}: generator of format version {raw.get('version', 0)}, this deltalora reads "
                f"version {CARD_VERSION}; train it again with `deltalora train-generator`"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{**{k: v for k, v in raw.items() if k in names}, "preset": Preset.from_dict(raw["preset"])})
        except (TypeError, KeyError, ValueError) as e:
            raise GeneratorError(f"{path}: malformed generator config ({type(e).__name__}: {e})") from e

    def same_run(self, other: GeneratorCard) -> bool:
        """True if ``other`` describes the same training run (training results and the device and precision it ran
        with aside: a run resumes on any device)."""

        def strip(card: GeneratorCard) -> GeneratorCard:
            preset = card.preset.replace(runtime=RuntimeConfig())
            return dataclasses.replace(
                card, preset=preset, train_seconds=None, steps_done=None, world_size=None, best_step=None, val_loss=None
            )

        a, b = strip(self), strip(other)
        return json.dumps(a.to_dict(), default=str, sort_keys=True) == json.dumps(
            b.to_dict(), default=str, sort_keys=True
        )


def save_generator(
    out_dir: Path, model: Generator, tokenizer: LoraTokenizer, delta_scale: float, card: GeneratorCard
) -> None:
    """Weights, token statistics and δ scale, then the card (whose presence marks the generator done)."""
    tensors = {f"model.{k}": v.cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"tokenizer.{k}": v for k, v in tokenizer.state().items()})
    tensors["delta_scale"] = torch.tensor([delta_scale])
    atomic_write_bytes(out_dir / "generator.safetensors", save(tensors))
    atomic_write_bytes(out_dir / "README.md", _readme(card).encode())
    card.to_file(out_dir / "config.json")


def _readme(card: GeneratorCard) -> str:
    ac, g = card.adapter_config, card.preset.generator
    return "\n".join(
        [
            f"# deltalora generator (variant `{card.variant}`)",
            "",
            f"Reads {card.n_prompts} prompts of a task and emits a LoRA adapter "
            f"(r={ac['r']}, alpha={ac['lora_alpha']:g}, "
            f"on {', '.join(sorted(ac['target_modules']))}; {card.lora_params:,} parameters) for the base "
            f"`{base_id(card.preset.base)}`, trained against {weights_note(card.preset.base)}.",
            "",
            f"- trained on the zoo adapters of {len(card.train_tasks)} tasks: {', '.join(card.train_tasks)}",
            f"- {card.steps_done} steps, seed {g.seed}, {card.n_params:,} parameters; the full config is `config.json`",
            "- self-contained: the weights, LoRA-token statistics and δ scale are in `generator.safetensors`",
            "",
            "## Use",
            "",
            "```python",
            "from deltalora import Generator",
            "",
            'gen = Generator.from_pretrained("path/to/this/folder")',
            'gen.save_adapter(["a prompt of the task", "another one"], "my_adapter")  # a PEFT folder',
            "```",
            "",
            "or `deltalora generate -g path/to/this/folder --prompts prompts.txt --out my_adapter`.",
            "",
        ]
    )


@dataclass
class LoadedGenerator:
    """A trained generator ready to generate."""

    model: Generator
    tokenizer: LoraTokenizer
    delta_scale: float
    """δ targets were divided by this during training."""
    card: GeneratorCard
    folder: Path

    @property
    def device(self) -> torch.device:
        """Where the network and the token statistics are."""
        return module_device(self.model)


def load_generator(gen_dir: str | Path, device: torch.device = CPU) -> LoadedGenerator:
    """A trained generator from its folder, on ``device`` (whichever device trained it); shape mismatches are
    reported by file."""
    gen_dir = Path(gen_dir)
    cfg_file, weights = gen_dir / "config.json", gen_dir / "generator.safetensors"
    card = GeneratorCard.from_file(cfg_file)
    if not weights.exists():
        raise GeneratorError(f"{weights}: missing")
    try:
        tensors = load_file(weights)
        tokenizer = LoraTokenizer({k: tuple(v) for k, v in card.shapes.items()}, card.width)
        tokenizer.load_state({k[len("tokenizer.") :]: v for k, v in tensors.items() if k.startswith("tokenizer.")})
        model = Generator(card.preset.generator, tokenizer.n_tokens, tokenizer.width, card.d_delta)
        model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    except Exception as e:  # noqa: BLE001 - any inconsistency between config and weights is reported by path
        raise GeneratorError(
            f"{weights}: weights do not match the config in {cfg_file} ({type(e).__name__}: {e})"
        ) from e
    model.eval()
    return LoadedGenerator(model.to(device), tokenizer.to(device), float(tensors["delta_scale"]), card, gen_dir)


def warm_start(model: Generator, gen_dir: str | Path, train_tasks: list[str]) -> None:
    """Start ``model`` from a trained generator's weights (``generator.init_from``): it must have the same head and
    training tasks (a basis head's directions are the training targets' own), else an error names the folder. A1 may
    start from a generator without its δ-head (a dnd): H starts fresh and is fitted alone first."""
    gen_dir = Path(gen_dir)
    card = GeneratorCard.from_file(gen_dir / "config.json")
    if sorted(card.train_tasks) != sorted(train_tasks):
        raise GeneratorError(
            f"{gen_dir}: generator.init_from was trained on other tasks ({len(card.train_tasks)} tasks, "
            f"{len(set(card.train_tasks) ^ set(train_tasks))} different); warm-start from one trained on these"
        )
    tensors = load_file(gen_dir / "generator.safetensors")
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    wrong = f"{gen_dir}: generator.init_from has another architecture (head, channels or variant modules)"
    try:
        loaded = model.load_state_dict(state, strict=False)  # raises on a shape mismatch, reports the keys
    except RuntimeError as e:
        raise GeneratorError(f"{wrong}: {e}") from e
    # A1's δ-head may be missing from the source (a dnd): its first stage fits H before the generator moves
    may_lack = ("head.",) if model.spec.delta_head and model.spec.stage1 else ()
    odd = [f"missing {k}" for k in loaded.missing_keys if not k.startswith(may_lack)]
    odd += [f"unexpected {k}" for k in loaded.unexpected_keys]
    if odd:
        raise GeneratorError(f"{wrong}: {', '.join(odd[:4])}" + (" ..." if len(odd) > 4 else ""))
