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
from deltalora.lm.models import CACHE_ARG, kv_cache


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

    Each item is one packed sequence, its prompt followed by all its choices; a 4-D attention mask lets each
    choice see the prompt and its own earlier tokens only, and positions restart after the prompt, so every
    choice is scored as if it followed the prompt alone. The prompt runs once, with no key/value copies per
    choice and no padding between choices. ``batch_size`` counts choices: about ``batch_size`` / (choices per
    item) items go in one forward pass.
    """
    device = module_device(model)
    packed = []
    for it in items:
        cs = [tok(" " + c, add_special_tokens=False).input_ids for c in it.choices]
        packed.append((encode(tok, it.prompt, "", max_length - max(map(len, cs)))[0], cs))
    lengths = [len(p) + sum(map(len, cs)) for p, cs in packed]
    order = sorted(range(len(items)), key=lambda k: lengths[k])
    n_items = max(1, batch_size // max(len(cs) for _, cs in packed))
    scores: list[list[float]] = [[] for _ in items]
    for start in range(0, len(order), n_items):
        idx = order[start : start + n_items]
        batch = _pack([packed[k] for k in idx], max(lengths[k] for k in idx), tok.pad_token_id)
        ids, pos, mask, want = (t.to(device) for t in batch)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        # the LM head only where a position predicts a choice token
        logp = torch.log_softmax(model.get_output_embeddings()(hidden[want[:, 0], want[:, 1]]).float(), -1)
        per_token = logp[torch.arange(len(want), device=device), want[:, 2]]
        sums = torch.zeros(len(idx), max(len(packed[k][1]) for k in idx), device=device)
        # every choice's log-probability in one transfer (an .item() per choice would wait on a GPU each time)
        sums = sums.index_put_((want[:, 0], want[:, 3]), per_token, accumulate=True).tolist()
        for r, k in enumerate(idx):
            scores[k] = [sums[r][j] / _n_bytes(c) for j, c in enumerate(items[k].choices)]
    return scores


def _pack(
    rows: Sequence[tuple[list[int], list[list[int]]]], width: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, positions, boolean 4-D mask [B, 1, L, L] and the scored positions (row, position, target token,
    choice) of packed (prompt, choices) rows, on the CPU; padding positions see only themselves (no empty
    softmax row)."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1, 1)
    want = []
    for r, (prompt, choices) in enumerate(rows):
        n_p = len(prompt)
        ids[r, :n_p] = torch.tensor(prompt)
        pos[r, :n_p] = torch.arange(n_p)
        mask[r, 0, :n_p, :n_p] = torch.ones(n_p, n_p, dtype=torch.bool).tril()
        at = n_p
        for j, c in enumerate(choices):
            n = len(c)
            ids[r, at : at + n] = torch.tensor(c)
            pos[r, at : at + n] = n_p + torch.arange(n)
            mask[r, 0, at : at + n, :n_p] = True
            mask[r, 0, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            # token t of the choice is predicted at the prompt's last position (t = 0) or at the choice's t-1
            want += [(r, n_p - 1 if t == 0 else at + t - 1, c[t], j) for t in range(n)]
            at += n
    return ids, pos, mask, torch.tensor(want, dtype=torch.long)


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
            res = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{CACHE_ARG: kv_cache(res)},
            )
        gen = torch.stack(new, 1).tolist()
        for r, k in enumerate(idx):
            seq = gen[r]
            if tok.eos_token_id in seq:
                seq = seq[: seq.index(tok.eos_token_id)]
            out[k] = answer_span(tok.decode(seq, skip_special_tokens=True))
    return out


def answer_token_logprobs(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[Item],
    max_length: int = 256,
    batch_size: int = 32,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Log-distributions at every token of each item's gold answer, teacher-forced [n answer tokens, vocab], items
    in order: the KL between two models averaged over these rows covers the whole answer, not its first token.
    With ``params`` the model runs with those tensors swapped in, differentiably (``functional_call``)."""
    device = module_device(model)
    decoder = model.get_decoder()
    if params:  # the decoder's own names: drop the path from the PEFT model to it
        prefix = next(n for n, m in model.named_modules() if m is decoder) + "."
        params = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
    seqs = [encode(tok, it.prompt, it.completion(), max_length) for it in items]
    rows = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        ids, mask = (t.to(device) for t in pad_right([s for s, _ in batch], tok.pad_token_id))
        kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
        if params:
            hidden = torch.func.functional_call(decoder, params, args=(), kwargs=kwargs, strict=False).last_hidden_state
        else:
            hidden = decoder(**kwargs).last_hidden_state
        # position t predicts token t + 1: the answer's tokens are predicted from the prompt's last position on
        at = [(r, t) for r, (s, n_p) in enumerate(batch) for t in range(n_p - 1, len(s) - 1)]
        r_idx, t_idx = (torch.tensor(x, device=device) for x in zip(*at))
        rows.append(torch.log_softmax(model.get_output_embeddings()(hidden[r_idx, t_idx]).float(), -1))
    return torch.cat(rows)


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
