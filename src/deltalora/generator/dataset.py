"""The generator's training set: (prompt batch, zoo checkpoint, δ) samples, with the RQ3 perturbations.

δ is divided by one scalar (its RMS over the training zoo) so that it stays additive:
G_θ(δ_a + δ_b) decodes a sum of behaviours, not of re-centred codes. The set is assembled
on the CPU and its tensors (and the tokenizer's statistics) then moved to the training device.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from deltalora.config import GeneratorConfig, Preset
from deltalora.data.items import Item, stable_seed
from deltalora.data.registry import TaskSpec
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.delta.compute import load_deltas
from deltalora.device import CPU
from deltalora.errors import ArtifactError, GeneratorError
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.lora_tokens import LoraTokenizer
from deltalora.generator.loss import ExactBehaviour
from deltalora.generator.variants import VARIANTS
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import read_adapter
from deltalora.zoo.manifest import Checkpoint, Manifest


@dataclass
class TrainingSet:
    """Everything sampled from during generator training, held in memory."""

    tasks: list[str]
    """Training task names."""
    ckpt_task: torch.Tensor
    """Task index of each checkpoint [M] (on the CPU: read per sample as a Python int)."""
    paths: list[str]
    """Manifest path of each checkpoint."""
    tokens: torch.Tensor
    """Normalised reference tokens [M, T, width]."""
    deltas: torch.Tensor
    """δ targets divided by ``delta_scale`` [M, D] (permuted across tasks for --shuffle-delta)."""
    delta_scale: float
    """RMS of the δ targets over the training zoo."""
    items: list[list[Item]]
    """Train-split items per task (their prompts condition the generator; their answers feed the end-to-end
    variants' completion loss and variant C's KL)."""
    emb: list[torch.Tensor]
    """Their embeddings per task [n_train, 384]."""
    adapter_config: dict
    """r, lora_alpha, target_modules and base model of the zoo's adapters (what generated adapters declare)."""
    val_emb: list[torch.Tensor] | None = None
    """Embeddings of each task's validation-split prompts [n_val, 384] (``generator.val_every`` > 0), else None."""
    head_tokens: torch.Tensor | None = None
    """Variant A1: perturbed adapters' tokens [M·head_pairs, T, width] that also fit the δ-head, else None."""
    head_deltas: torch.Tensor | None = None
    """Their exact δ divided by ``delta_scale`` [M·head_pairs, D]."""

    @property
    def prompts(self) -> list[list[str]]:
        """Train-split prompts per task (those of ``items``)."""
        return [[it.prompt for it in its] for its in self.items]


def training_set(
    preset: Preset,
    ws: Workspace,
    train_tasks: list[str],
    extra: list[TaskSpec] | None,
    encoder: PromptEncoder,
    save_cache: bool = True,
    device: torch.device = CPU,
) -> tuple[TrainingSet, LoraTokenizer]:
    """Load every checkpoint of the training tasks, fit the LoRA tokenizer on them, and embed the train prompts;
    the tokens, δ, embeddings and the tokenizer's statistics end on ``device``."""
    cfg = preset.generator
    ckpts = last_checkpoints(
        [c for c in Manifest.from_file(ws.manifest).singles() if c.task in train_tasks], cfg.checkpoints_per_run
    )
    missing = sorted(set(train_tasks) - {c.task for c in ckpts})
    if missing:
        raise GeneratorError(f"{ws.manifest}: no checkpoints for training task(s) {missing}")
    rng = random.Random(stable_seed("data", cfg.seed))
    if cfg.data_fraction < 1:
        ckpts = [c for t in train_tasks for c in _fraction([c for c in ckpts if c.task == t], cfg.data_fraction, rng)]
    try:
        all_deltas = load_deltas(ws, cfg.n_probes)
    except ArtifactError as e:
        raise GeneratorError(str(e)) from e
    no_delta = [c.path for c in ckpts if c.path not in all_deltas]
    if no_delta:
        raise GeneratorError(
            f"zoo checkpoints without δ (|P|={cfg.n_probes}), e.g. {no_delta[0]}; run `deltalora delta compute`"
        )
    adapter_cfg, tokenizer, tokens = zoo_targets(ws, ckpts)
    deltas = torch.stack([all_deltas[c.path] for c in ckpts])
    tasks = list(train_tasks)
    ckpt_task = torch.tensor([tasks.index(c.task) for c in ckpts])  # device: cpu - bookkeeping read by int()
    adapter_cfg = {k: adapter_cfg[k] for k in ("r", "lora_alpha", "target_modules", "base_model_name_or_path")}
    # the base model is loaded once, and only when a perturbation's δ must be measured
    behaviour = functools.cache(lambda: ExactBehaviour(preset, adapter_cfg, cfg.n_probes, device))
    if cfg.weight_noise > 0:
        tokens = _noisy(tokenizer, tokens, cfg, rng)
        if cfg.corrupt_delta:
            deltas = _measured_deltas(behaviour(), tokenizer, tokens).cpu()
    if cfg.mislabel_fraction > 0:
        tokens, mislabelled = _mislabelled(tokens, deltas, ckpt_task, cfg.mislabel_fraction, rng)
        deltas = mislabelled if cfg.corrupt_delta else deltas
    scale = deltas.pow(2).mean().sqrt().item()
    if cfg.shuffle_delta:
        deltas = shuffled_deltas(deltas, ckpt_task, cfg.seed)
    loaded = [load_task(resolve_spec(t, extra), preset.tasks) for t in tasks]
    items = [list(t.train) for t in loaded]
    if cfg.data_fraction < 1:
        items = [_fraction(its, cfg.data_fraction, rng) for its in items]
    emb = [encoder.encode([it.prompt for it in its]) for its in items]
    val_emb = None
    if cfg.val_every:
        no_val = [t.name for t in loaded if not t.val]
        if no_val:
            raise GeneratorError(
                f"generator.val_every={cfg.val_every} validates on each training task's validation split, but "
                f"{no_val[0]} has none: set tasks.n_val > 0 (e.g. --set tasks.n_val=50) or generator.val_every=0"
            )
        val_emb = [encoder.encode([it.prompt for it in t.val]).to(device) for t in loaded]
    if save_cache:
        encoder.save()
    head_tokens = head_deltas = None
    if VARIANTS[cfg.variant].delta_head and cfg.head_pairs:
        head_tokens, head_deltas = _head_pairs(behaviour(), tokenizer, tokens, ckpt_task, cfg)
        head_tokens, head_deltas = head_tokens.to(device), (head_deltas / scale).to(device)
    paths = [c.path for c in ckpts]
    tokens, deltas, emb = tokens.to(device), (deltas / scale).to(device), [e.to(device) for e in emb]
    data = TrainingSet(
        tasks, ckpt_task, paths, tokens, deltas, scale, items, emb, adapter_cfg, val_emb, head_tokens, head_deltas
    )
    return data, tokenizer.to(device)


def zoo_targets(ws: Workspace, ckpts: list[Checkpoint]) -> tuple[dict, LoraTokenizer, torch.Tensor]:
    """The checkpoints' adapter config, a LoRA tokenizer fitted on them, and their normalised tokens [M, T, width]
    (each file's sha256 checked before it is parsed)."""
    adapter_cfg, first = read_adapter(ws.zoo / ckpts[0].path, ckpts[0].sha256)
    sds = [first] + [read_adapter(ws.zoo / c.path, c.sha256)[1] for c in ckpts[1:]]
    tokenizer = LoraTokenizer.from_state_dict(first).fit(sds)
    return adapter_cfg, tokenizer, torch.stack([tokenizer.encode(sd) for sd in sds])


def last_checkpoints(ckpts: list[Checkpoint], k: int) -> list[Checkpoint]:
    """The last ``k`` checkpoints of every run (task, seed, part) by step, in the manifest's order; 0 keeps all."""
    if k == 0:
        return ckpts
    runs: dict[tuple[str, int, int], list[int]] = {}
    for c in ckpts:
        runs.setdefault((c.task, c.seed, c.part), []).append(c.step)
    keep = {run: sorted(steps)[-k:] for run, steps in runs.items()}
    return [c for c in ckpts if c.step in keep[(c.task, c.seed, c.part)]]


def _fraction(xs: list, f: float, rng: random.Random) -> list:
    """A seeded subset of ceil(f * len) elements, at least one, in the original order."""
    keep = sorted(rng.sample(range(len(xs)), max(1, math.ceil(f * len(xs)))))
    return [xs[i] for i in keep]


def _noisy(tokenizer: LoraTokenizer, tokens: torch.Tensor, cfg: GeneratorConfig, rng: random.Random) -> torch.Tensor:
    """Noisy weight targets, on the CPU."""
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    # device: cpu - fixed noise from a seeded CPU generator: the same noisy zoo on every device
    return tokens + cfg.weight_noise * torch.randn(tokens.shape, generator=g) * tokenizer.valid_mask()


@torch.no_grad()
def _head_pairs(
    exact: ExactBehaviour, tokenizer: LoraTokenizer, tokens: torch.Tensor, ckpt_task: torch.Tensor, cfg: GeneratorConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``head_pairs`` perturbations of every checkpoint (on the CPU), alternately Gaussian noise of 0.5 zoo std
    and a mix with a random other task's checkpoint (weight 0.2-0.8), and their exact δ (on the behaviour's device)."""
    # device: cpu - seeded CPU draws: the same perturbed set on every device
    g = torch.Generator().manual_seed(stable_seed("head_pairs", cfg.seed) % 2**63)
    out = []
    for k in range(cfg.head_pairs):
        for i, t in enumerate(tokens):
            others = (ckpt_task != ckpt_task[i]).nonzero()[:, 0]
            if k % 2 == 0 or not len(others):
                # device: cpu - seeded noise from a CPU generator
                out.append(t + 0.5 * torch.randn(t.shape, generator=g) * tokenizer.valid_mask())
            else:
                # device: cpu - seeded draw from a CPU generator
                j = others[torch.randint(len(others), (1,), generator=g)].item()
                a = 0.2 + 0.6 * torch.rand((), generator=g).item()  # device: cpu - seeded draw, read as a float
                out.append((1 - a) * t + a * tokens[j])
    pert = torch.stack(out)
    return pert, _measured_deltas(exact, tokenizer, pert)


def _measured_deltas(exact: ExactBehaviour, tokenizer: LoraTokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """Exact δ (on the behaviour's device) of the adapters whose normalised tokens are ``tokens`` [M, T, width]."""
    return torch.stack(
        [
            exact.delta({k: v.to(exact.device) for k, v in tokenizer.decode(t).items()})
            for t in tqdm(tokens, desc="exact δ of perturbed adapters", unit="adapter", leave=False)
        ]
    )


def _mislabelled(
    tokens: torch.Tensor, deltas: torch.Tensor, ckpt_task: torch.Tensor, f: float, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fraction of checkpoints take the weights and δ of a random checkpoint of another task."""
    new_t, new_d = tokens.clone(), deltas.clone()
    for i in rng.sample(range(len(tokens)), round(f * len(tokens))):
        others = (ckpt_task != ckpt_task[i]).nonzero()[:, 0].tolist()
        if others:
            j = rng.choice(others)
            new_t[i], new_d[i] = tokens[j], deltas[j]
    return new_t, new_d


def shuffled_deltas(deltas: torch.Tensor, ckpt_task: torch.Tensor, seed: int) -> torch.Tensor:
    """Negative control: every checkpoint gets the δ of a checkpoint of another task (a task derangement)."""
    n_tasks = int(ckpt_task.max()) + 1
    if n_tasks < 2:
        raise GeneratorError("--shuffle-delta needs at least two training tasks")
    g = random.Random(seed)
    perm = list(range(n_tasks))
    while any(i == p for i, p in enumerate(perm)):
        g.shuffle(perm)
    out = torch.empty_like(deltas)
    for t in range(n_tasks):
        mine = (ckpt_task == t).nonzero()[:, 0]
        theirs = (ckpt_task == perm[t]).nonzero()[:, 0]
        out[mine] = deltas[theirs[torch.arange(len(mine), device=mine.device) % len(theirs)]]
    return out
