"""Reference LoRA training: completion-only loss, seeded sampling, checkpoints from the last steps."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from deltalora.config import ZooConfig
from deltalora.data.tasks import Item, stable_seed
from deltalora.device import autocast, module_device
from deltalora.lm.evaluate import encode, pad_right
from deltalora.lm.models import CACHE_ARG, kv_cache
from deltalora.tracking import Curves
from deltalora.zoo.adapters import lora_config


@dataclass
class TrainResult:
    """Losses and wall time of one LoRA training run."""

    losses: list[float]
    """Mean completion loss of every step."""
    seconds: float
    """Wall time of the training loop, including whatever ``on_checkpoint`` does."""


def completion_batch(
    tok: PreTrainedTokenizerBase, items: Sequence[Item], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels where only the answer (+ EOS) is supervised."""
    return _labelled([encode(tok, it.prompt, it.completion(), max_length, eos=True) for it in items], tok.pad_token_id)


def _labelled(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad_right([e[0] for e in encoded], pad_id)
    labels = ids.clone()
    for r, (seq, n_prompt) in enumerate(encoded):
        labels[r, :n_prompt] = -100
        labels[r, len(seq) :] = -100
    return ids, mask, labels


def completion_loss(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[Item],
    max_length: int,
    micro_batch: int,
    min_shared_prefix: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy over every answer token of the batch: the value of transformers'
    padded ``labels=`` loss on ``completion_batch``, computed leaner.

    Sequences are sorted by length into micro-batches, so each pads only to its own longest,
    and the LM head (a fifth of SmolLM2's FLOPs) runs only at the supervised positions,
    which are a few tokens at the end of each sequence. With ``min_shared_prefix`` > 0, a
    token prefix common to a whole micro-batch (a task's instructions, often most of the
    prompt) that long or longer is run once and its keys/values are shared by every row;
    gradients from all rows flow back through that one pass, so the loss is unchanged.
    """
    body, head = model.get_decoder(), model.get_output_embeddings()
    device = module_device(model)
    total, n_tokens = torch.zeros((), device=device), 0
    for chunk in micro_batches(tok, items, max_length, micro_batch):
        ids, mask, labels = (t.to(device) for t in _labelled(chunk, tok.pad_token_id))
        target = labels[:, 1:]
        keep = target != -100
        shared = shared_prefix_length(chunk, min_shared_prefix)
        if shared:
            past = kv_cache(body(input_ids=ids[:1, :shared], use_cache=True))
            past.batch_repeat_interleave(len(chunk))
            # the prefix's own positions carry no supervised logit (shared_prefix_length stops before them)
            hidden = body(
                input_ids=ids[:, shared:], attention_mask=mask, use_cache=True, **{CACHE_ARG: past}
            ).last_hidden_state[:, :-1][keep[:, shared:]]
        else:
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][keep]
        total = total + F.cross_entropy(head(hidden).float(), target[keep], reduction="sum")
        n_tokens += int(keep.sum())
    return total / max(1, n_tokens)


def micro_batches(
    tok: PreTrainedTokenizerBase, items: Sequence[Item], max_length: int, micro_batch: int
) -> list[list[tuple[list[int], int]]]:
    """A batch as ``completion_loss`` runs it: (ids, prompt length) pairs sorted by length, cut into micro-batches."""
    encoded = sorted(
        (encode(tok, it.prompt, it.completion(), max_length, eos=True) for it in items), key=lambda e: len(e[0])
    )
    return [encoded[start : start + micro_batch] for start in range(0, len(encoded), micro_batch)]


def shared_prefix_length(encoded: Sequence[tuple[list[int], int]], minimum: int = 1) -> int:
    """Tokens common to the start of every sequence, stopping before the last prompt token of
    the shortest prompt (whose logit predicts a supervised answer token); 0 when fewer than
    ``minimum`` are shared, for a single sequence, or when ``minimum`` is 0 (sharing off)."""
    if minimum == 0 or len(encoded) < 2:
        return 0
    limit = min(n_prompt for _, n_prompt in encoded) - 1
    first = encoded[0][0]
    n = 0
    while n < limit and all(seq[n] == first[n] for seq, _ in encoded):
        n += 1
    return n if n >= minimum else 0


def batches(items: Sequence[Item], batch_size: int, steps: int, seed: int) -> list[list[Item]]:
    """Epoch-wise shuffled batches: every item once per epoch, same seed -> same batches."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch_size:
            perm = list(range(len(items)))
            rng.shuffle(perm)
            order += perm
        out.append([items[i] for i in order[:batch_size]])
        order = order[batch_size:]
    return out


def train_lora(
    base: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[Item],
    cfg: ZooConfig,
    steps: int,
    seed: int,
    run_name: str,
    on_checkpoint: Callable[[PeftModel, int, float], None],
    loss_fn: Callable[[PeftModel, Sequence[Item]], torch.Tensor] | None = None,
    curves: Curves | None = None,
    dtype: str = "fp32",
) -> TrainResult:
    """Train one LoRA on ``base`` (wrapped in place, unwrapped again on return), on the base's device.

    ``on_checkpoint(model, step, loss)`` is called at each of the config's checkpoint steps;
    ``loss_fn(model, batch)`` replaces the lean completion loss (the benchmark's plain loss); ``curves``
    receives each step's loss and learning rate; ``dtype="bf16"`` runs the loss's forward under bf16
    autocast (CUDA), the LoRA weights and the optimizer staying fp32.
    """
    loss_fn = loss_fn or (
        lambda m, batch: completion_loss(m, tok, batch, cfg.max_length, cfg.micro_batch, cfg.min_shared_prefix)
    )
    # PEFT draws the init on the CPU and then moves it to the base's device: the same LoRA init on every device
    torch.manual_seed(stable_seed("lora-init", *([run_name] if cfg.init_per_task else []), seed) % 2**63)
    model = get_peft_model(base, lora_config(cfg.rank, cfg.alpha, cfg.target_modules))
    device = module_device(base)
    try:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
        keep = set(cfg.checkpoint_steps(steps))
        losses: list[float] = []
        t0 = time.perf_counter()
        bar = tqdm(
            batches(items, cfg.batch_size, steps, stable_seed("batches", run_name, seed)),
            desc=run_name,
            unit="step",
            leave=False,
        )
        for step, batch in enumerate(bar, 1):
            with autocast(device, dtype):
                loss = loss_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr = opt.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if curves is not None:
                curves.log(step, loss=losses[-1], lr=lr)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step in keep:
                model.eval()
                on_checkpoint(model, step, losses[-1])
                model.train()
        return TrainResult(losses, time.perf_counter() - t0)
    finally:
        model.eval()
        model.unload()
