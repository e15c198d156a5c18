"""Prompt-to-LoRA generators: the model, training of every variant, and generation.

A training sample is (N prompts drawn fresh from a task's train split, one checkpoint of
that task, its δ). Losses per variant (DESIGN.md, Generator):

- dnd: λ_w·MSE(tokens)
- A1:  + λ_δ·‖H(ΔŴ) − δ‖²; H is also fitted on the reference tokens so it cannot drift
       into agreeing with whatever the decoder emits.
- A2:  + λ_δ·‖Delta(ΔŴ) − δ‖², δ computed exactly through the base model.
- B:   stage 1 E_ψ: ‖E_ψ(prompts) − δ‖²; stage 2 G_θ: MSE(G_θ(δ)) + λ_cons·‖Delta(G_θ(δ)) − δ‖².
- C:   λ_δ·‖Delta(ΔŴ) − δ‖² + λ_KL·KL(p_base+ΔŴ ‖ p_base+ΔW) at the answer position + λ_w·MSE.

δ is divided by one scalar (its RMS over the training zoo) so that it stays additive:
G_θ(δ_a + δ_b) decodes a sum of behaviours, not of re-centred codes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save, save_file
from torch import nn
from tqdm.auto import tqdm

from .adapters import read_adapter
from .config import GeneratorConfig, Preset
from .delta import DeltaProbe, load_deltas
from .distributed import barrier, init_distributed
from .encoder import DIM, PromptEncoder
from .evaluate import answer_logprobs
from .hypernet import DeltaFrontEnd, DeltaHead, HyperConvDecoder, PromptFrontEnd, PromptToDelta, n_params
from .io import atomic_dir, atomic_write_bytes, atomic_write_json, read_json
from .lora_tokens import LoraTokenizer
from .models import load_base
from .registry import TaskSpec
from .tasks import load_task, resolve_spec, stable_seed
from .zoo import zoo_dir

log = logging.getLogger(__name__)


class GeneratorError(ValueError):
    """A generator checkpoint, prompt file or zoo cannot be used; the message says why."""


class Generator(nn.Module):
    """Prompt embeddings [B, N, 384] -> normalised LoRA tokens [B, T, width]."""

    def __init__(self, cfg: GeneratorConfig, n_tokens: int, width: int, d_delta: int):
        super().__init__()
        self.variant = cfg.variant
        if cfg.variant == "B":
            self.e_psi = PromptToDelta(DIM, d_delta)
            self.front = DeltaFrontEnd(d_delta, cfg.n_prompts, width)
        else:
            self.front = PromptFrontEnd(DIM, width)
        self.decoder = HyperConvDecoder(cfg.n_prompts, cfg.channels, n_tokens, width)
        if cfg.variant == "A1":
            self.head = DeltaHead(n_tokens, width, d_delta)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if self.variant == "B":
            return self.from_delta(self.e_psi(emb))
        return self.decoder(self.front(emb))

    def from_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """G_θ: a (scaled) δ, any vector including sums of δs, -> tokens (variant B)."""
        if self.variant != "B":
            raise GeneratorError(f"only variant B decodes a δ; this generator is {self.variant}")
        return self.decoder(self.front(delta))


@dataclass
class TrainingSet:
    """Everything sampled from during generator training, held in memory."""

    tasks: list[str]
    ckpt_task: torch.Tensor
    """Task index of each checkpoint [M]."""
    paths: list[str]
    tokens: torch.Tensor
    """Normalised reference tokens [M, T, width]."""
    deltas: torch.Tensor
    """δ targets divided by ``delta_scale`` [M, D] (permuted across tasks for --shuffle-delta)."""
    delta_scale: float
    prompts: list[list[str]]
    """Train-split prompts per task."""
    emb: list[torch.Tensor]
    """Their embeddings per task [n_train, 384]."""


def read_prompts(file: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (strings or objects with 'prompt')."""
    file = Path(file)
    try:
        lines = [ln for ln in file.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise GeneratorError(f"{file}: cannot read prompt file ({e})") from e
    if not lines:
        raise GeneratorError(f"{file}: no prompts (expected one prompt per line, or JSONL)")
    if file.suffix != ".jsonl":
        return [ln.replace("\\n", "\n") for ln in lines]
    prompts = []
    for n, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise GeneratorError(f"{file}: line {n}: not valid JSON ({e.msg})") from e
        p = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(p, str) or not p.strip():
            raise GeneratorError(f"{file}: line {n}: expected a string or an object with a non-empty 'prompt'")
        prompts.append(p)
    return prompts


def choose_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """Exactly n prompts: a seeded subset, or (with a warning) a draw with replacement when too few."""
    rng = random.Random(seed)
    if len(prompts) >= n:
        return rng.sample(prompts, n)
    log.warning("%d prompts given, the generator reads %d: sampling with replacement", len(prompts), n)
    return [rng.choice(prompts) for _ in range(n)]


def training_set(preset: Preset, workspace: Path, train_tasks: list[str], extra: list[TaskSpec] | None,
                 encoder: PromptEncoder, save_cache: bool = True) -> tuple[TrainingSet, LoraTokenizer, dict]:
    cfg = preset.generator
    root = zoo_dir(workspace)
    manifest = read_json(root / "manifest.json", "zoo manifest (run `deltalora zoo build` first)")
    ckpts = [c for c in manifest if c["task"] in train_tasks and not c.get("pair_of")]
    missing = sorted(set(train_tasks) - {c["task"] for c in ckpts})
    if missing:
        raise GeneratorError(f"{root / 'manifest.json'}: no checkpoints for training task(s) {missing}")
    rng = random.Random(stable_seed("data", cfg.seed))
    if cfg.data_fraction < 1:
        ckpts = [c for t in train_tasks for c in _fraction([c for c in ckpts if c["task"] == t], cfg.data_fraction, rng)]
    try:
        all_deltas = load_deltas(workspace, cfg.n_probes)
    except FileNotFoundError as e:
        raise GeneratorError(str(e)) from e
    no_delta = [c["path"] for c in ckpts if c["path"] not in all_deltas]
    if no_delta:
        raise GeneratorError(f"zoo checkpoints without δ (|P|={cfg.n_probes}), e.g. {no_delta[0]}; run `deltalora delta compute`")
    adapter_cfg, first = read_adapter(root / ckpts[0]["path"], ckpts[0].get("sha256"))
    sds = [first] + [read_adapter(root / c["path"], c.get("sha256"))[1] for c in ckpts[1:]]
    tokenizer = LoraTokenizer.from_state_dict(first).fit(sds)
    tokens = torch.stack([tokenizer.encode(sd) for sd in sds])
    deltas = torch.stack([all_deltas[c["path"]] for c in ckpts])
    tasks = list(train_tasks)
    ckpt_task = torch.tensor([tasks.index(c["task"]) for c in ckpts])
    if cfg.weight_noise > 0:
        tokens, deltas = _noisy(preset, adapter_cfg, tokenizer, tokens, cfg, rng)
    if cfg.mislabel_fraction > 0:
        tokens, deltas = _mislabelled(tokens, deltas, ckpt_task, cfg.mislabel_fraction, rng)
    scale = deltas.pow(2).mean().sqrt().item()
    if cfg.shuffle_delta:
        deltas = shuffled_deltas(deltas, ckpt_task, cfg.seed)
    loaded = [load_task(resolve_spec(t, extra), preset.tasks) for t in tasks]
    prompts = [[it.prompt for it in t.train] for t in loaded]
    if cfg.data_fraction < 1:
        prompts = [_fraction(p, cfg.data_fraction, rng) for p in prompts]
    emb = [encoder.encode(p) for p in prompts]
    if save_cache:
        encoder.save()
    meta = {"adapter_config": {k: adapter_cfg[k] for k in ("r", "lora_alpha", "target_modules", "base_model_name_or_path")},
            "shapes": {s.key: list(s.shape) for s in tokenizer.segments}, "width": tokenizer.width}
    ts = TrainingSet(tasks, ckpt_task, [c["path"] for c in ckpts], tokens, deltas / scale, scale, prompts, emb)
    return ts, tokenizer, meta


def _fraction(xs: list, f: float, rng: random.Random) -> list:
    """A seeded subset of ceil(f * len) elements, at least one, in the original order."""
    keep = sorted(rng.sample(range(len(xs)), max(1, math.ceil(f * len(xs)))))
    return [xs[i] for i in keep]


@torch.no_grad()
def _noisy(preset: Preset, adapter_cfg: dict, tokenizer: LoraTokenizer, tokens: torch.Tensor, cfg: GeneratorConfig,
           rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy weight targets and the δ of those noisy adapters, measured through the base model."""
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    noisy = tokens + cfg.weight_noise * torch.randn(tokens.shape, generator=g) * tokenizer.valid_mask()
    exact = ExactBehaviour(preset, adapter_cfg, cfg.n_probes)
    deltas = torch.stack([exact.delta({k: v[0] for k, v in tokenizer.decode(t[None]).items()}) for t in noisy])
    return noisy, deltas


def _mislabelled(tokens: torch.Tensor, deltas: torch.Tensor, ckpt_task: torch.Tensor, f: float,
                 rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
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
        out[mine] = deltas[theirs[torch.arange(len(mine)) % len(theirs)]]
    return out


class ExactBehaviour:
    """Exact δ and answer-position distributions of base + LoRA tensors, differentiable."""

    def __init__(self, preset: Preset, adapter_config: dict, n_probes: int):
        base, self.tok = load_base(preset.base)
        for p in base.parameters():
            p.requires_grad_(False)
        cfg = LoraConfig(r=adapter_config["r"], lora_alpha=adapter_config["lora_alpha"],
                         target_modules=adapter_config["target_modules"], lora_dropout=0.0, task_type="CAUSAL_LM")
        self.model = get_peft_model(base, cfg)
        self.model.eval()
        self.probe = DeltaProbe(self.tok, dataclasses.replace(preset.delta, n_probes=n_probes))
        with self.model.disable_adapter():
            self.probe.set_base(self.model)
        self.max_length = preset.zoo.max_length

    def delta(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.probe.delta_of_tensors(self.model, tensors)

    def answer_logprobs(self, tensors: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
        params = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
        return answer_logprobs(self.model, self.tok, prompts, self.max_length, params)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class GeneratorLoss(nn.Module):
    """All loss terms of one step for this rank's samples, as a module so DDP can wrap it.

    Every sample carries its own seed (prompt draw, noise, KL prompts) and its position in
    the global batch, and each term is a sum over local samples divided by the global
    count times the world size: DDP's gradient average then equals the single-process
    gradient of the same global batch.
    """

    def __init__(self, model: Generator, data: TrainingSet, tokenizer: LoraTokenizer, exact: ExactBehaviour | None,
                 cfg: GeneratorConfig, world: int = 1):
        super().__init__()
        self.model = model
        self.ctx = (data, tokenizer, exact)  # a tuple: not registered, so DDP leaves the frozen base alone
        self.cfg, self.world = cfg, world
        self.mask = tokenizer.valid_mask()

    def forward(self, idx: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, stage: int) -> dict[str, torch.Tensor]:
        data, tokenizer, exact = self.ctx
        cfg, model, mask, b_global = self.cfg, self.model, self.mask, self.cfg.batch_size
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        emb = torch.stack([_draw(data.emb[int(data.ckpt_task[i])], cfg.n_prompts, g) + cfg.cond_noise *
                           torch.randn(cfg.n_prompts, DIM, generator=g) for i, g in zip(idx, gens)])
        target = torch.stack([data.tokens[i] + cfg.target_noise * torch.randn(mask.shape, generator=g) * mask
                              for i, g in zip(idx, gens)])
        delta = data.deltas[idx]

        def mean(per_sample: torch.Tensor, n_global: int) -> torch.Tensor:
            return per_sample.sum() * self.world / n_global

        if cfg.variant == "B" and stage == 1:
            return {"delta_prompt": mean(((model.e_psi(emb) - delta) ** 2).mean(-1), b_global)}
        pred = model.from_delta(delta) if cfg.variant == "B" else model(emb)
        out: dict[str, torch.Tensor] = {}
        if cfg.lambda_w > 0 or cfg.variant == "dnd":
            out["mse"] = cfg.lambda_w * mean((((pred - target) * mask) ** 2).sum((1, 2)) / mask.sum(), b_global)
        if cfg.variant == "A1":
            out["delta_head"] = cfg.lambda_delta * mean(((model.head(pred) - delta) ** 2).mean(-1), b_global)
            out["head_fit"] = mean(((model.head(data.tokens[idx]) - delta) ** 2).mean(-1), b_global)
        if cfg.variant in ("A2", "B", "C"):
            n_exact = cfg.exact_samples or b_global
            sel = [k for k in range(len(idx)) if positions[k] < n_exact]
            weight = cfg.lambda_cons if cfg.variant == "B" else cfg.lambda_delta
            zero = pred.sum() * 0.0  # keeps every rank's graph the same shape when it has no exact sample
            if not sel:
                out["delta_exact"] = zero
                if cfg.variant == "C":
                    out["kl"] = zero
                return out
            decoded = tokenizer.decode(pred[sel])
            one = [{k: v[b] for k, v in decoded.items()} for b in range(len(sel))]
            exact_d = torch.stack([exact.delta(t) for t in one]) / data.delta_scale
            out["delta_exact"] = weight * mean(((exact_d - delta[sel]) ** 2).mean(-1), n_exact)
            if cfg.variant == "C":
                ref = tokenizer.decode(data.tokens[idx[sel]])
                kl = []
                for b, k in enumerate(sel):
                    task_prompts = data.prompts[int(data.ckpt_task[idx[k]])]
                    ps = [task_prompts[int(j)] for j in torch.randint(len(task_prompts), (cfg.kl_prompts,), generator=gens[k])]
                    lp_gen = exact.answer_logprobs(one[b], ps)
                    with torch.no_grad():
                        lp_ref = exact.answer_logprobs({key: v[b] for key, v in ref.items()}, ps)
                    kl.append((lp_gen.exp() * (lp_gen - lp_ref)).sum(-1).mean())
                out["kl"] = cfg.lambda_kl * mean(torch.stack(kl), n_exact)
        return out


def draw_batch(rng: torch.Generator, n_samples: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: checkpoint indices and one seed per sample, identical on every rank."""
    return torch.randint(n_samples, (batch_size,), generator=rng), torch.randint(2**62, (batch_size,), generator=rng)


def gradient_snapshot(preset: Preset, workspace: str | Path, train_tasks: list[str], idx: torch.Tensor,
                      seeds: torch.Tensor, init_seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of one step on a fixed global batch, under DDP when launched on several ranks.

    Used to check that data-parallel training is gradient-equivalent to one process.
    """
    info = init_distributed()
    cfg = preset.generator
    data, tok, meta = training_set(preset, Path(workspace), train_tasks, None, PromptEncoder(), save_cache=False)
    torch.manual_seed(init_seed)
    model = Generator(cfg, tok.n_tokens, tok.width, data.deltas.shape[1])
    exact = ExactBehaviour(preset, meta["adapter_config"], cfg.n_probes) if cfg.variant in ("A2", "B", "C") else None
    fn = loss_fn = GeneratorLoss(model, data, tok, exact, cfg, info.world)
    if info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fn = DistributedDataParallel(loss_fn, find_unused_parameters=True, broadcast_buffers=False)
    mine = torch.arange(info.rank, len(idx), info.world)
    sum(fn(idx[mine], seeds[mine], mine, 2).values()).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def train_generator(preset: Preset, workspace: str | Path, out_dir: str | Path, train_tasks: list[str],
                    extra: list[TaskSpec] | None = None, progress: bool = True) -> dict:
    """Train (or resume) a generator; writes ``out_dir`` with config, weights and a loss log.

    Under torchrun the global batch is split over ranks and the loss module runs in DDP
    (gloo on CPU, NCCL on GPU); every rank steps its own LR schedule; rank 0 alone writes.
    """
    cfg = preset.generator
    workspace, out_dir = Path(workspace), Path(out_dir)
    info = init_distributed()
    if cfg.batch_size % info.world:
        raise GeneratorError(f"generator.batch_size={cfg.batch_size} must be divisible by the {info.world} ranks")
    # ---- setup
    torch.manual_seed(cfg.seed)
    encoder = PromptEncoder(Path(workspace) / "cache" / "prompt_embeddings.safetensors")
    data, tokenizer, meta = training_set(preset, workspace, train_tasks, extra, encoder, save_cache=info.is_main)
    model = Generator(cfg, tokenizer.n_tokens, tokenizer.width, data.deltas.shape[1])
    exact = ExactBehaviour(preset, meta["adapter_config"], cfg.n_probes) if cfg.variant in ("A2", "B", "C") else None
    loss_fn = GeneratorLoss(model, data, tokenizer, exact, cfg, info.world)
    stage1 = cfg.stage1_steps if cfg.variant == "B" else 0
    total = stage1 + cfg.steps
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, total))
    rng = torch.Generator().manual_seed(stable_seed("generator", cfg.seed) % 2**63)
    config = {"preset": preset.to_dict(), "train_tasks": train_tasks, "workspace": str(workspace),
              "n_params": n_params(model), "lora_params": tokenizer.n_params, "n_tokens": tokenizer.n_tokens,
              "d_delta": data.deltas.shape[1], **meta}
    state_file, log_file = out_dir / "train_state.pt", out_dir / "log.jsonl"
    start, seconds = 0, 0.0
    if state_file.exists():
        start, seconds = _resume(state_file, out_dir, config, model, opt, sched, rng, truncate_log=info.is_main)
    elif info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "train_config.json", config)
        log_file.unlink(missing_ok=True)
    barrier()
    step_fn = loss_fn
    if info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_fn = DistributedDataParallel(loss_fn, find_unused_parameters=True, broadcast_buffers=False)
    # ---- run
    t0 = time.perf_counter() - seconds
    bar = tqdm(range(start, total), desc=f"generator {cfg.variant}", unit="step", disable=not (progress and info.is_main),
               initial=start, total=total)
    mine = torch.arange(info.rank, cfg.batch_size, info.world)
    for step in bar:
        idx, seeds = draw_batch(rng, len(data.paths), cfg.batch_size)
        losses = step_fn(idx[mine], seeds[mine], mine, 1 if step < stage1 else 2)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if info.is_main:
            record = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
            with log_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                _save_state(state_file, model, opt, sched, rng, step + 1, time.perf_counter() - t0)
    # ---- save
    train_seconds = time.perf_counter() - t0
    if info.is_main:
        save_generator(out_dir, model, tokenizer, data.delta_scale,
                       {**config, "train_seconds": train_seconds, "steps_done": total, "world_size": info.world})
    barrier()
    return {"train_seconds": train_seconds, **config}


def _draw(emb: torch.Tensor, n: int, rng: torch.Generator) -> torch.Tensor:
    if len(emb) >= n:
        return emb[torch.randperm(len(emb), generator=rng)[:n]]
    return emb[torch.randint(len(emb), (n,), generator=rng)]


def _save_state(path: Path, model, opt, sched, rng, step: int, seconds: float) -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "rng": rng.get_state(), "torch_rng": torch.get_rng_state(), "step": step, "seconds": seconds}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _resume(state_file: Path, out_dir: Path, config: dict, model, opt, sched, rng, truncate_log: bool = True) -> tuple[int, float]:
    cfg_file = out_dir / "train_config.json"
    if cfg_file.exists() and read_json(cfg_file) != json.loads(json.dumps(config, default=str)):
        raise GeneratorError(f"{cfg_file}: {out_dir} holds a run with another config; use a new --out")
    try:
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported by path
        raise GeneratorError(f"{state_file}: cannot resume from this checkpoint ({e})") from e
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rng.set_state(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    log.info("resuming generator training at step %d", state["step"])
    if truncate_log:
        _truncate_log(out_dir / "log.jsonl", state["step"])
    return state["step"], state["seconds"]


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the last checkpoint)."""
    if log_file.exists():
        lines = [ln for ln in log_file.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        log_file.write_text("".join(ln + "\n" for ln in lines))


def save_generator(out_dir: Path, model: Generator, tokenizer: LoraTokenizer, delta_scale: float, config: dict) -> None:
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"tokenizer.{k}": v for k, v in tokenizer.state().items()})
    tensors["delta_scale"] = torch.tensor([delta_scale])
    atomic_write_bytes(out_dir / "generator.safetensors", save(tensors))
    atomic_write_json(out_dir / "config.json", {"kind": "generator", **config})


def load_generator(gen_dir: str | Path) -> tuple[Generator, LoraTokenizer, float, dict]:
    """A trained generator, its LoRA tokenizer, δ scale and config; shape mismatches are reported by file."""
    gen_dir = Path(gen_dir)
    cfg_file, weights = gen_dir / "config.json", gen_dir / "generator.safetensors"
    try:
        config = read_json(cfg_file, "generator config")
    except (FileNotFoundError, ValueError) as e:
        raise GeneratorError(str(e)) from e
    if not isinstance(config, dict) or config.get("kind") != "generator":
        raise GeneratorError(f"{cfg_file}: not a trained generator (expected field 'kind' = 'generator')")
    if not weights.exists():
        raise GeneratorError(f"{weights}: missing")
    try:
        tensors = load_file(weights)
        gen = config["preset"]["generator"]
        cfg = GeneratorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in gen.items()})
        tokenizer = LoraTokenizer({k: tuple(v) for k, v in config["shapes"].items()}, config["width"])
        tokenizer.load_state({k[len("tokenizer."):]: v for k, v in tensors.items() if k.startswith("tokenizer.")})
        model = Generator(cfg, tokenizer.n_tokens, tokenizer.width, config["d_delta"])
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    except Exception as e:  # noqa: BLE001 - any inconsistency between config and weights is reported by path
        raise GeneratorError(f"{weights}: weights do not match the config in {cfg_file} ({type(e).__name__}: {e})") from e
    model.eval()
    return model, tokenizer, float(tensors["delta_scale"]), config


def write_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], adapter_config: dict, provenance: dict) -> Path:
    """A PEFT adapter folder (config + safetensors + provenance), written atomically."""
    cfg = LoraConfig(r=adapter_config["r"], lora_alpha=adapter_config["lora_alpha"], target_modules=adapter_config["target_modules"],
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     base_model_name_or_path=adapter_config.get("base_model_name_or_path"))
    with atomic_dir(out_dir) as tmp:
        cfg.save_pretrained(str(tmp))
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        atomic_write_json(tmp / "provenance.json", provenance)
    return Path(out_dir)


@torch.inference_mode()
def generate_tensors(model: Generator, tokenizer: LoraTokenizer, encoder: PromptEncoder, prompts: list[str],
                     n_prompts: int, seed: int) -> dict[str, torch.Tensor]:
    chosen = choose_prompts(prompts, n_prompts, seed)
    return {k: v[0] for k, v in tokenizer.decode(model(encoder.encode(chosen)[None])).items()}


def generate(gen_dir: str | Path, prompts: list[str], out_dir: str | Path, seed: int = 0,
             encoder: PromptEncoder | None = None) -> dict:
    """Prompts -> PEFT adapter folder, for a trained generator or a retrieval index."""
    import hashlib

    from .retrieval import is_retrieval, retrieve

    gen_dir = Path(gen_dir)
    if not prompts:
        raise GeneratorError("no prompts given")
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    encoder = encoder or PromptEncoder()
    t0 = time.perf_counter()
    if is_retrieval(gen_dir):
        task, src = retrieve(gen_dir, prompts, encoder)
        seconds = time.perf_counter() - t0
        prov = {"generator": str(gen_dir), "kind": "retrieval", "retrieved_task": task, "prompts_sha256": digest,
                "n_prompts_given": len(prompts), "seed": seed, "generation_seconds": seconds}
        config, tensors = read_adapter(src)
        write_adapter(out_dir, tensors, config, prov)
        return prov
    model, tokenizer, _, config = load_generator(gen_dir)
    n = config["preset"]["generator"]["n_prompts"]
    t0 = time.perf_counter()
    tensors = generate_tensors(model, tokenizer, encoder, prompts, n, seed)
    seconds = time.perf_counter() - t0
    prov = {"generator": str(gen_dir), "kind": "generator", "variant": config["preset"]["generator"]["variant"],
            "prompts_sha256": digest, "n_prompts_given": len(prompts), "n_prompts_used": n, "seed": seed,
            "generation_seconds": seconds, "base_model": config["adapter_config"]["base_model_name_or_path"]}
    write_adapter(out_dir, tensors, config["adapter_config"], prov)
    return prov
