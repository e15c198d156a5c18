"""δ of any adapter or fine-tuned model folder, and the nearest neighbours of a query among a set of δ.

``delta embed`` takes PEFT LoRA folders of any rank, target modules and LoRA variant PEFT loads, and full
fine-tuned model folders of the base's architecture, and writes one safetensors file (key -> δ float32
[hidden]) plus a JSON index next to it. δ is the zoo's definition (``deltalora.delta.probes``): the base's
mean activation is computed once, each LoRA is injected, measured and unloaded so adapters never stack.
``delta neighbours`` ranks a δ set (a zoo workspace's or an ``embed`` file) by cosine to a query.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from transformers import AutoConfig, AutoModelForCausalLM

from deltalora.config import DeltaConfig
from deltalora.delta.compute import load_deltas
from deltalora.delta.probes import DeltaProbe, probe_prompts
from deltalora.device import CPU
from deltalora.errors import AdapterError, ArtifactError, UsageError
from deltalora.io import atomic_write_bytes, atomic_write_json, check_output_file
from deltalora.lm.models import load_base
from deltalora.workspace import Workspace
from deltalora.zoo.manifest import Manifest

log = logging.getLogger(__name__)

FORMAT = "deltalora.delta.embed"
VERSION = 1
# PEFT initialisations that rewrite the base weights when the adapter is injected (residual bases):
# unload() does not undo them, so the base is reloaded after such an adapter.
MUTATES_BASE = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class Embedded:
    """One entry of the JSON index: where a δ came from and what it is."""

    key: str
    source: str
    kind: str
    """``lora`` (a PEFT adapter folder) or ``model`` (a full fine-tuned model folder)."""
    n_probes: int
    base: str
    delta_norm: float
    peft_type: str | None = None
    rank: int | None = None
    target_modules: list[str] | str | None = None
    """As the adapter config gives them: a list of module names or a regular expression."""
    trained_on: str | None = None
    """The base the adapter config records (not checked: the same weights go by several names)."""


def probe_config(cfg: DeltaConfig, n_probes: int | None) -> DeltaConfig:
    """``cfg`` with the probe-set size of ``--probes`` (None keeps the preset's)."""
    if n_probes is not None and n_probes not in (1, 5, 20):
        raise UsageError(f"--probes must be 1, 5 or 20, got {n_probes}")
    return dataclasses.replace(cfg, n_probes=n_probes or cfg.n_probes)


def index_path(out: Path) -> Path:
    """The JSON index written next to a δ file (``x.safetensors`` -> ``x.json``)."""
    return out.with_suffix(".json")


def _finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterError(f"{where}: {name} holds NaN or Inf")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:400] or type(e).__name__


class Embedder:
    """The base model, its mean probe activation (computed once) and δ of any folder against it, on ``device``."""

    def __init__(self, base: str, cfg: DeltaConfig, device: torch.device = CPU):
        self.base_name, self.cfg, self.device = base, cfg, device
        self.model, self.tok = load_base(base, device)
        self.probe = DeltaProbe(self.tok, cfg)
        self.probe.set_base(self.model)

    def embed(self, folder: str | Path, key: str | None = None) -> tuple[torch.Tensor, Embedded]:
        """δ float32 [hidden] (on the CPU) of a PEFT adapter or full model folder, and its index entry."""
        folder = Path(folder)
        if (folder / "adapter_config.json").is_file():
            kind, delta, extra = "lora", self._lora(folder), self._lora_info(folder)
        elif (folder / "config.json").is_file():
            kind, delta, extra = "model", self._full(folder), {}
        else:
            raise AdapterError(
                f"{folder}: neither a PEFT adapter folder (adapter_config.json) nor a model folder (config.json)"
            )
        delta = delta.float().cpu().contiguous()
        entry = Embedded(
            key=key or str(folder),
            source=str(folder),
            kind=kind,
            n_probes=self.cfg.n_probes,
            base=self.base_name,
            delta_norm=float(delta.norm()),
            **extra,
        )
        return delta, entry

    def _lora_info(self, folder: Path) -> dict:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        targets = cfg.get("target_modules")
        return {
            "peft_type": cfg.get("peft_type"),
            "rank": cfg.get("r"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "trained_on": cfg.get("base_model_name_or_path"),
        }

    def _lora(self, folder: Path) -> torch.Tensor:
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():  # adapter_model.bin would be unpickled: refused
            raise AdapterError(f"{weights}: missing (only safetensors adapter weights are read, never pickle)")
        try:
            _finite(load_file(weights), weights)
            config = PeftConfig.from_pretrained(str(folder))
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise AdapterError(f"{folder}: not a loadable PEFT adapter ({_one_line(e)})") from e
        if config.is_prompt_learning:  # no weights to unload: the base would keep the virtual tokens
            raise AdapterError(f"{folder}: {config.peft_type} is a prompt-learning adapter; give a LoRA-type adapter")
        config.inference_mode = True
        try:
            peft_model = get_peft_model(self.model, config)
        except Exception as e:  # PEFT's own errors (targets not in the base, unsupported layers) are user input
            self._reload()  # injection may have stopped half-way
            raise AdapterError(f"{folder}: does not fit base {self.base_name!r} ({_one_line(e)})") from e
        try:
            try:
                # read onto our device: PEFT's default is the first GPU whenever one exists
                result = peft_model.load_adapter(str(folder), adapter_name="default", torch_device=str(self.device))
            except Exception as e:  # size mismatches, unreadable files
                raise AdapterError(f"{weights}: does not fit base {self.base_name!r} ({_one_line(e)})") from e
            # PEFT only warns about these; either would give a silently wrong δ
            if result.missing_keys:
                missing = sorted(k.replace(".default.", ".") for k in result.missing_keys)
                raise AdapterError(f"{weights}: lacks tensors its adapter_config.json targets: {missing[:3]}")
            if result.unexpected_keys:
                raise AdapterError(
                    f"{weights}: keys that do not fit base {self.base_name!r}: {sorted(result.unexpected_keys)[:3]}"
                )
            peft_model.eval()
            return self.probe.delta(peft_model)
        finally:
            self.model = peft_model.unload()
            init = getattr(config, "init_lora_weights", None)
            if isinstance(init, str) and init.lower().startswith(MUTATES_BASE):
                self._reload()

    def _reload(self) -> None:
        self.model, _ = load_base(self.base_name, self.device)  # same weights: the base activation stays valid

    def _full(self, folder: Path) -> torch.Tensor:
        if not any(folder.glob("*.safetensors")):
            raise AdapterError(f"{folder}: no *.safetensors weights (only safetensors are read, never pickle)")
        want = self.model.config
        try:
            got = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as e:
            raise AdapterError(f"{folder / 'config.json'}: not a readable model config ({_one_line(e)})") from e
        for field in ("model_type", "hidden_size"):
            if getattr(got, field, None) != getattr(want, field, None):
                raise AdapterError(
                    f"{folder}: {field} {getattr(got, field, None)!r} differs from base {self.base_name!r}'s "
                    f"{getattr(want, field, None)!r}; δ needs a fine-tune of the same architecture"
                )
        if getattr(got, "vocab_size", 0) < len(self.tok):
            raise AdapterError(f"{folder}: vocabulary of {got.vocab_size} is smaller than the base tokenizer's")
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, use_safetensors=True, output_loading_info=True
            )
        except Exception as e:  # shape mismatches, truncated files
            raise AdapterError(f"{folder}: does not load as a fine-tune of {self.base_name!r} ({_one_line(e)})") from e
        if info.get("missing_keys") or info.get("mismatched_keys"):
            bad = sorted(info.get("missing_keys") or []) + [str(m[0]) for m in info.get("mismatched_keys") or []]
            raise AdapterError(f"{folder}: weights missing or of the wrong shape: {bad[:3]}")
        _finite(dict(model.named_parameters()), folder)
        model.eval()
        return self.probe.delta(model.to(self.device))


def embed_folders(
    folders: list[Path],
    out: Path,
    base: str,
    cfg: DeltaConfig,
    key_by: str = "path",
    protected: tuple = (),
    device: torch.device = CPU,
) -> list[Embedded]:
    """Embed every folder (on ``device``) and write ``out`` (key -> δ) and its JSON index, both atomically.

    Keys are each folder's path as given (``key_by="path"``) or its name (``"name"``). Output paths are
    checked before any compute; nothing is written unless every folder embeds.
    """
    if out.suffix != ".safetensors":
        raise UsageError(f"{out}: the δ file must end in .safetensors (its index goes next to it as .json)")
    if key_by not in ("path", "name"):
        raise UsageError(f"--key must be path or name, got {key_by!r}")
    if not folders:
        raise UsageError("give at least one adapter or model folder")
    for f in (out, index_path(out)):
        check_output_file(f, protected=protected)
    keys = [str(f) if key_by == "path" else f.name for f in folders]
    if len(set(keys)) < len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise UsageError(f"folders with the same key {dup[:3]} (give each once, or --key path)")
    for f in folders:
        if not f.is_dir():
            raise AdapterError(f"{f}: not a folder")
    emb = Embedder(base, cfg, device)
    deltas, entries = {}, []
    for f, k in zip(folders, keys):
        deltas[k], e = emb.embed(f, k)
        entries.append(e)
        log.info("δ %s: %s, |δ| = %.4g", k, e.kind, e.delta_norm)
    meta = {"format": FORMAT, "version": str(VERSION), "base": base, "n_probes": str(cfg.n_probes)}
    atomic_write_bytes(out, save(deltas, metadata=meta))
    index = {"format": FORMAT, "version": VERSION, "base": base, "n_probes": cfg.n_probes, "file": out.name}
    atomic_write_json(
        index_path(out), {**index, "probes": probe_prompts(cfg.n_probes), "entries": [asdict(e) for e in entries]}
    )
    return entries


@dataclass(frozen=True)
class DeltaSet:
    """δ of a set of adapters, where they came from, and the base and probes they were measured with."""

    deltas: dict[str, torch.Tensor]
    tasks: dict[str, str]
    """Key -> task, where known (a zoo's manifest)."""
    base: str | None
    n_probes: int | None
    source: str

    @classmethod
    def from_file(cls, path: Path) -> DeltaSet:
        """A file written by ``delta embed`` (or any key -> δ safetensors file)."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            deltas = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{path}: not a readable δ file ({_one_line(e)})") from e
        n = meta.get("n_probes")
        return cls(deltas, {}, meta.get("base"), int(n) if n else None, str(path))

    @classmethod
    def from_workspace(cls, ws: Workspace, base: str, n_probes: int) -> DeltaSet:
        """A zoo's δ for ``n_probes``, keyed by manifest path, with each checkpoint's task."""
        tasks = {c.path: c.task for c in Manifest.from_file(ws.manifest)}
        return cls(load_deltas(ws, n_probes), tasks, base, n_probes, str(ws.deltas(n_probes)))

    def resolved(self, base: str | None, n_probes: int | None, default_base: str, default_probes: int) -> DeltaSet:
        """This set with its base and probe count settled: what the file records wins, then the options, then
        the defaults; an option that contradicts the record is refused."""
        for opt, given, recorded in (("--base", base, self.base), ("--probes", n_probes, self.n_probes)):
            if given is not None and recorded is not None and given != recorded:
                raise UsageError(f"{self.source}: its δ were measured with {opt} {recorded}, not {given}")
        return dataclasses.replace(
            self, base=self.base or base or default_base, n_probes=self.n_probes or n_probes or default_probes
        )


def neighbours(
    dset: DeltaSet, query: torch.Tensor, k: int = 5, exclude: str | None = None
) -> list[dict[str, str | float | None]]:
    """The ``k`` entries of ``dset`` with the largest cosine to ``query`` (without key ``exclude``)."""
    keys = [key for key in dset.deltas if key != exclude]
    if not keys:
        raise UsageError(f"{dset.source}: no δ to compare with")
    if any(dset.deltas[key].shape != query.shape for key in keys):
        raise UsageError(f"{dset.source}: δ of another hidden size than the query's {tuple(query.shape)}")
    mat = torch.stack([dset.deltas[key].double() for key in keys])
    cos = torch.nn.functional.cosine_similarity(mat, query.double()[None], dim=1)
    top = torch.topk(cos, min(k, len(keys)))
    return [
        {"key": keys[i], "task": dset.tasks.get(keys[i]), "cosine": float(c)}
        for c, i in zip(top.values.tolist(), top.indices.tolist())
    ]


def query_neighbours(
    dset: DeltaSet,
    query: Path | None,
    query_key: str | None,
    k: int,
    batch_size: int = 20,
    device: torch.device = CPU,
) -> dict:
    """Rank ``dset`` by cosine to a query: a folder (embedded on the set's base and probes, on ``device``) or a key
    of the set.

    ``dset`` must have its base and probe count settled (``DeltaSet.resolved``).
    """
    if (query is None) == (query_key is None):
        raise UsageError("give exactly one query: an adapter or model folder, or --query-key")
    if k < 1:
        raise UsageError(f"--top must be >= 1, got {k}")
    if query_key is not None:
        if query_key not in dset.deltas:
            raise UsageError(f"{dset.source}: no entry {query_key!r} (--query-key)")
        q, exclude = dset.deltas[query_key], query_key  # an entry is not its own neighbour
    else:
        q, exclude = Embedder(dset.base, DeltaConfig(dset.n_probes, batch_size), device).embed(query)[0], None
    return {
        "query": query_key if query is None else str(query),
        "set": dset.source,
        "base": dset.base,
        "n_probes": dset.n_probes,
        "neighbours": neighbours(dset, q, k, exclude),
    }
