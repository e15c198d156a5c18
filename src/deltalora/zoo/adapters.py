"""PEFT adapter folders: config, validation against a base model, loading and swapping.

A folder is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r].
Everything is checked before any compute, so a wrong adapter fails with its path named.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file

from deltalora.device import module_device
from deltalora.errors import AdapterError
from deltalora.io import sha256_file
from deltalora.lm.names import base_id, weights_note


def lora_config(r: int, alpha: float, target_modules, base_model: str | None = None) -> LoraConfig:
    """The one LoRA config of every adapter deltalora trains or writes: no dropout, no bias, causal LM."""
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def model_card(base: str, title: str, about: list[str]) -> str:
    """A ``README.md`` for a PEFT adapter folder: what it is, its base and the base's exact weights, how to load it."""
    bid = base_id(base)
    return "\n".join(
        ["---", f"base_model: {bid}", "library_name: peft", "tags:", "- lora", "- deltalora", "---", ""]
        + [f"# {title}", "", *about, "", "## Base model", "", f"`{bid}`; trained against {weights_note(base)}.", ""]
        + ["## Load", "", "```python", "from peft import AutoPeftModelForCausalLM", ""]
        + ['model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")', "```", ""]
        + [
            "or `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` with a loaded base.",
            "",
        ]
    )


def read_adapter(folder: str | Path, sha256: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's config dict and its tensors, validated for form (not yet against a model).

    With ``sha256`` (from a zoo manifest) a truncated or corrupted weights file is refused
    before it is parsed.
    """
    folder = Path(folder)
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (cfg_file, weights):
        if not f.exists():
            raise AdapterError(
                f"{f}: missing (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)"
            )
    if sha256 is not None and sha256_file(weights) != sha256:
        raise AdapterError(
            f"{weights}: checksum does not match the zoo manifest (truncated or corrupted); "
            "delete its run record under zoo/runs/ and rerun `deltalora zoo build`"
        )
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{cfg_file}: expected an object with field 'peft_type' = 'LORA', got {got!r}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from e
    for key, t in tensors.items():
        if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            raise AdapterError(f"{weights}: unexpected key {key!r} (expected ...lora_A.weight / ...lora_B.weight)")
        if not t.is_floating_point() or t.ndim != 2:
            raise AdapterError(f"{weights}: {key} must be a 2-D float tensor, got {t.dtype} {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{weights}: {key} holds NaN or Inf")
    return config, tensors


def check_adapter(
    model: torch.nn.Module, folder: str | Path, base_name: str | None = None, sha256: str | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validate an adapter against ``model`` (names and shapes) before any compute."""
    config, tensors = read_adapter(folder, sha256)
    recorded = config.get("base_model_name_or_path")
    if base_name is not None and recorded is not None and base_id(recorded) != base_id(base_name):
        raise AdapterError(f"{folder}: adapter was trained on base {recorded!r}, not {base_name!r}")
    modules = dict(model.named_modules())
    r = config.get("r")
    for key, t in tensors.items():
        path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        mod = modules.get(path)
        if mod is None or not hasattr(mod, "in_features"):
            raise AdapterError(f"{folder}: {key} targets {path!r}, which is not a linear layer of the base model")
        want = (r, mod.in_features) if ".lora_A." in key else (mod.out_features, r)
        if tuple(t.shape) != want:
            raise AdapterError(f"{folder}: {key} has shape {tuple(t.shape)}, the base model needs {want}")
    return config, tensors


def load_adapter(model: torch.nn.Module, folder: str | Path, base_name: str | None = None) -> PeftModel:
    """``model`` wrapped with the adapter in ``folder``, after validation, on the model's device."""
    check_adapter(model, folder, base_name)
    # read onto the model's device: PEFT's default is the first GPU whenever one exists
    return PeftModel.from_pretrained(model, str(folder), torch_device=str(module_device(model)))


def live_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed in PEFT's saved form, re-keyed by the PEFT model's own parameter names (adapter
    ``default``): what ``torch.func.functional_call`` swaps in."""
    return {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}


class AdapterSwapper:
    """One PEFT wrapper around the base; adapters of the same config are swapped in by weights.

    Loading the base once and copying r x d tensors per adapter is what makes scoring a
    whole zoo cheap; keys are PEFT's saved form, read off the wrapper's own parameter names.
    """

    def __init__(self, base: torch.nn.Module, config: LoraConfig, base_name: str | None = None):
        self.base_name = base_name
        self.model = get_peft_model(base, config)
        self.model.eval()
        # saved key -> live parameter, mapped once: a swap is then one copy per tensor
        # (set_peft_model_state_dict re-maps every key on every call, a tenth of a δ's cost)
        self._params = {
            n.replace(".default.weight", ".weight"): p for n, p in self.model.named_parameters() if ".lora_" in n
        }

    @classmethod
    def like(cls, base: torch.nn.Module, folder: str | Path, base_name: str | None = None) -> AdapterSwapper:
        """A swapper with the LoRA config of the adapter in ``folder`` (any checkpoint of the zoo it will serve)."""
        return cls(base, PeftConfig.from_pretrained(str(folder)), base_name)

    def load(self, folder: str | Path, sha256: str | None = None) -> PeftModel:
        """Validate the adapter folder against the base model and swap its tensors in."""
        _, tensors = check_adapter(self.model.base_model.model, folder, self.base_name, sha256)
        self.set_tensors(tensors, str(folder))
        return self.model

    @torch.no_grad()
    def set_tensors(self, tensors: dict[str, torch.Tensor], source: str = "LoRA tensors") -> None:
        """Copy LoRA tensors (PEFT's saved key form, exactly this zoo's keys) into the wrapper;
        ``source`` names them in errors."""
        if set(tensors) != set(self._params):
            missing, extra = sorted(set(self._params) - set(tensors)), sorted(set(tensors) - set(self._params))
            raise AdapterError(
                f"{source}: adapter targets other modules than this zoo's ({len(tensors)} vs {len(self._params)} "
                f"tensors): missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for key, param in self._params.items():  # all checked before any is copied: no half-swapped adapter
            if tensors[key].shape != param.shape:
                raise AdapterError(
                    f"{source}: LoRA tensor {key}: shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}"
                )
        for key, param in self._params.items():
            param.copy_(tensors[key])

    def lora_keys(self) -> list[str]:
        """Adapter keys in PEFT's saved form, in module order."""
        return list(self._params)

    def unload(self) -> torch.nn.Module:
        """Take the PEFT layers off and return the bare base model."""
        return self.model.unload()
