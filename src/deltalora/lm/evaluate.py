"""Accuracy: multiple choice by length-normalised log-likelihood, exact match by greedy decoding.

Exact match compares ``answer_span`` of the greedy continuation (cut at the first newline
or ". ", final period dropped) with the target, so a base model that answers and then
keeps writing is not scored wrong for the extra text.

A choice's score is its summed log-probability divided by its length in bytes (as
lm-evaluation-harness's acc_norm): per-token means favour long digit strings, which
SmolLM2's tokenizer splits into one token per digit.

Sequences are sorted by length before batching so a batch pads only to its own longest
member; results come back in the caller's order. Batches are padded on the CPU and moved to
the model's device in one copy each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from deltalora.data.tasks import Item
from deltalora.device import module_device


def encode(
    tok: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int, eos: bool = False
) -> tuple[list[int], int]:
    """Token ids of prompt + completion and the prompt length; the prompt is cut from the left."""
    p = tok(prompt, add_special_tokens=True).input_ids
    c = tok(completion, add_special_tokens=False).input_ids + ([tok.eos_token_id] if eos else [])
    p = p[-max(1, max_length - len(c)) :]
    return p + c, len(p)


def pad_right(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, on the CPU (filled row by row: callers move the result once)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, mask and position ids that count from each sequence's first real token, on the CPU."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _n_bytes(choice: str) -> int:
    return len((" " + choice).encode())


@torch.inference_mode()
def choice_scores(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[Item],
    batch_size: int = 32,
    max_length: int = 256,
) -> list[list[float]]:
    """Log-probability per byte of every choice of every item.

    Each prompt is run once; its KV cache is repeated for the item's choices, so a
    7-choice item costs one prompt plus seven short continuations.
    """
    device = module_device(model)
    prompts, conts = [], []
    for it in items:
        cs = [tok(" " + c, add_special_tokens=False).input_ids for c in it.choices]
        prompts.append(encode(tok, it.prompt, "", max_length - max(map(len, cs)))[0])
        conts.append(cs)
    scores: list[list[float]] = [[] for _ in items]
    order = sorted(range(len(items)), key=lambda k: len(prompts[k]))
    n_items = max(1, batch_size // max(len(c) for c in conts))
    for start in range(0, len(order), n_items):
        idx = order[start : start + n_items]
        ids, mask, pos = (t.to(device) for t in pad_left([prompts[k] for k in idx], tok.pad_token_id))
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), -1)  # predicts each choice's first token
        n_c = max(len(conts[k]) for k in idx)
        rows = [(b, j) for b in range(len(idx)) for j in range(n_c)]
        seqs = [conts[idx[b]][j] if j < len(conts[idx[b]]) else [tok.pad_token_id] for b, j in rows]
        cache = out.cache
        cache.batch_repeat_interleave(n_c)
        c_ids, c_mask = (t.to(device) for t in pad_right(seqs, tok.pad_token_id))
        full_mask = torch.cat([mask.repeat_interleave(n_c, 0), c_mask], 1)
        c_pos = mask.sum(1).repeat_interleave(n_c)[:, None] + torch.arange(c_ids.shape[1], device=device)
        hidden = model.get_decoder()(
            input_ids=c_ids, attention_mask=full_mask, position_ids=c_pos, cache=cache
        ).last_hidden_state
        # the LM head only where a position predicts a later token of its own choice: with short
        # prompts, logits at padding and at each choice's last token would cost more than the body
        real = [r for r, (b, j) in enumerate(rows) if j < len(conts[idx[b]])]
        at = torch.tensor(
            [(r, p) for r in real for p in range(len(seqs[r]) - 1)], dtype=torch.long, device=device
        ).reshape(-1, 2)
        target = torch.tensor([t for r in real for t in seqs[r][1:]], dtype=torch.long, device=device)
        logp = torch.log_softmax(model.get_output_embeddings()(hidden[at[:, 0], at[:, 1]]).float(), -1)
        later = torch.zeros(len(rows), device=device).index_add_(
            0, at[:, 0], logp[torch.arange(len(target), device=device), target]
        )
        # every choice's log-probability in one transfer (an .item() per choice would wait on the GPU each time)
        heads = torch.tensor([(rows[r][0], seqs[r][0]) for r in real], dtype=torch.long, device=device)
        lps = (first[heads[:, 0], heads[:, 1]] + later[real]).tolist()
        for r, lp in zip(real, lps):
            b, j = rows[r]
            scores[idx[b]].append(lp / _n_bytes(items[idx[b]].choices[j]))
    return scores


@torch.inference_mode()
def choice_scores_unshared(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[Item],
    batch_size: int = 32,
    max_length: int = 256,
) -> list[list[float]]:
    """Reference for ``choice_scores``: every prompt + choice as its own sequence (no cache sharing)."""
    seqs = []
    for i, it in enumerate(items):
        cs = [tok(" " + c, add_special_tokens=False).input_ids for c in it.choices]
        p = encode(tok, it.prompt, "", max_length - max(map(len, cs)))[0]
        seqs += [(i, j, p + c, len(p)) for j, c in enumerate(cs)]
    device = module_device(model)
    scores = [[0.0] * len(it.choices) for it in items]
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))
    for start in range(0, len(order), batch_size):
        batch = [seqs[k] for k in order[start : start + batch_size]]
        ids, mask = (t.to(device) for t in pad_right([b[2] for b in batch], tok.pad_token_id))
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        tok_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        for r, (i, j, s, n_p) in enumerate(batch):
            scores[i][j] = tok_logp[r, n_p - 1 : len(s) - 1].sum().item() / _n_bytes(items[i].choices[j])
    return scores


@torch.inference_mode()
def greedy_answers(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[Item],
    batch_size: int = 32,
    max_length: int = 256,
) -> list[str]:
    """Greedy continuations with a KV cache, cut by ``answer_span``.

    A hand-written loop: ``generate`` costs several times more per token on a CPU for
    these few-token answers.
    """
    device = module_device(model)
    max_new = max(len(tok(" " + it.answer, add_special_tokens=False).input_ids) for it in items) + 2
    prompts = [encode(tok, it.prompt, "", max_length - max_new)[0] for it in items]
    out = [""] * len(items)
    order = sorted(range(len(items)), key=lambda k: len(prompts[k]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask, pos = (t.to(device) for t in pad_left([prompts[k] for k in idx], tok.pad_token_id))
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        new = []
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_new):
            nxt = res.logits[:, -1].argmax(-1)
            new.append(nxt)
            done |= nxt == tok.eos_token_id
            if done.all():
                break
            mask = torch.cat([mask, torch.ones(len(idx), 1, dtype=mask.dtype, device=device)], 1)
            pos = pos[:, -1:] + 1
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=res.cache, use_cache=True)
        gen = torch.stack(new, 1).tolist()
        for r, k in enumerate(idx):
            seq = gen[r]
            if tok.eos_token_id in seq:
                seq = seq[: seq.index(tok.eos_token_id)]
            out[k] = answer_span(tok.decode(seq, skip_special_tokens=True))
    return out


def answer_logprobs(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_length: int = 256,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Log-distribution over the first answer token of each prompt [n, vocab]; with ``params``
    the model runs with those tensors swapped in (differentiably, via ``functional_call``)."""
    padded = pad_left([encode(tok, p, "", max_length)[0] for p in prompts], tok.pad_token_id)
    ids, mask, pos = (t.to(module_device(model)) for t in padded)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=False)
    out = torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False) if params else model(**kwargs)
    return torch.log_softmax(out.logits[:, -1].float(), -1)


def answer_span(text: str) -> str:
    """The answer part of a continuation: up to the first newline or sentence end, stripped."""
    text = text.split("\n", 1)[0].split(". ", 1)[0].strip()
    return text[:-1] if text.endswith(".") else text


def hits(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[Item],
    batch_size: int = 32,
    max_length: int = 256,
) -> list[bool]:
    """Whether each item is answered correctly (all items of one kind), in the items' order."""
    if not items:
        raise ValueError("scoring needs at least one item")
    was_training = model.training
    model.eval()
    try:
        if items[0].is_mc:
            scores = choice_scores(model, tok, items, batch_size, max_length)
            return [it.choices[max(range(len(s)), key=s.__getitem__)] == it.answer for it, s in zip(items, scores)]
        preds = greedy_answers(model, tok, items, batch_size, max_length)
        return [p == answer_span(it.answer) for it, p in zip(items, preds)]
    finally:
        model.train(was_training)


def accuracy(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[Item],
    batch_size: int = 32,
    max_length: int = 256,
) -> float:
    """Fraction of items answered correctly (all items of one kind)."""
    h = hits(model, tok, items, batch_size, max_length)
    return sum(h) / len(h)
