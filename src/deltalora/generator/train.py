"""Training a generator (setup -> run -> save), resumable after a kill, data-parallel under torchrun.

A training sample is (N prompts drawn fresh from a task's train split, one checkpoint of
that task, its δ); the loss is the variant's (``deltalora.generator.variants``). The network
is initialised on the CPU and moved to ``preset.runtime``'s device; batches are drawn on the
CPU, so a seed trains on the same samples on every device, and a run resumes on any device.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltalora.config import Preset
from deltalora.data.items import stable_seed
from deltalora.data.registry import TaskSpec
from deltalora.device import CPU, runtime
from deltalora.distributed import barrier, init_distributed
from deltalora.errors import GeneratorError
from deltalora.generator.artifact import GeneratorCard, save_generator, warm_start
from deltalora.generator.dataset import training_set
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.hypernet import n_params
from deltalora.generator.linear_delta import LinearDelta
from deltalora.generator.loss import ExactBehaviour, GeneratorLoss, draw, draw_batch
from deltalora.generator.model import Generator
from deltalora.generator.validation import Validation
from deltalora.generator.variants import VARIANTS
from deltalora.io import atomic_write_bytes
from deltalora.outputs import atomic_dir, claim_output_dir, own_dir
from deltalora.tracking import Curves
from deltalora.workspace import Workspace

log = logging.getLogger(__name__)


def lr_lambda(warmup: int, stages: tuple[int, ...]):
    """Linear warm-up then cosine to zero, restarted at every stage: variant B's E_ψ and G_θ each get a whole
    schedule (one cosine over both would leave G_θ under half of dnd's learning rate)."""

    def f(step: int) -> float:
        for n in stages[:-1]:
            if step < n:
                break
            step -= n
        else:
            n = stages[-1]
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, n - warmup))))

    return f


def _setup(
    preset: Preset,
    ws: Workspace,
    train_tasks: list[str],
    extra: list[TaskSpec] | None,
    encoder: PromptEncoder,
    world: int,
    save_cache: bool,
    device: torch.device = CPU,
    dtype: str = "fp32",
):
    """The training set, a freshly initialised generator (seeded by the caller, built on the CPU) and its loss
    module, all on ``device``."""
    cfg = preset.generator
    data, tokenizer = training_set(preset, ws, train_tasks, extra, encoder, save_cache, device)
    model = Generator(cfg, tokenizer.n_tokens, tokenizer.width, data.deltas.shape[1]).to(device)
    if cfg.init_from:
        warm_start(model, cfg.init_from, train_tasks)
    elif model.out.basis:
        model.basis.fit(data.tokens)
    spec = VARIANTS[cfg.variant]
    exact = ExactBehaviour(preset, data.adapter_config, cfg.n_probes, device) if spec.needs_base else None
    linear = None
    if spec.linear:
        if model.out.conv:
            raise GeneratorError(
                f"variant {cfg.variant} linearises δ in the basis coefficients: set generator.head=basis"
            )
        linear = LinearDelta(model.basis, data.tokens, tokenizer, exact, data.delta_scale, ws.linear_delta_cache)
    return data, tokenizer, model, GeneratorLoss(model, data, tokenizer, exact, cfg, world, dtype, linear)


def _ddp(loss_fn: GeneratorLoss, world: int, device: torch.device = CPU):
    if world == 1:
        return loss_fn
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(loss_fn, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)


def train_step(
    step_fn, model: torch.nn.Module, opt, sched, idx, seeds, mine, stage: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step on this rank's samples ``mine`` of the global batch (``idx``, ``seeds``): the summed loss
    and its terms, still on the device (the caller reads and logs them)."""
    losses = step_fn(idx[mine], seeds[mine], mine, stage)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss, losses


def gradient_snapshot(
    preset: Preset, ws: Workspace, train_tasks: list[str], idx: torch.Tensor, seeds: torch.Tensor, init_seed: int = 0
) -> dict[str, torch.Tensor]:
    """Gradients of one step on a fixed global batch, under DDP when launched on several ranks.

    Used to check that data-parallel training is gradient-equivalent to one process.
    """
    rt = runtime(preset.runtime)
    info = init_distributed(rt.device)
    encoder = PromptEncoder()
    torch.manual_seed(init_seed)
    _, _, model, loss_fn = _setup(preset, ws, train_tasks, None, encoder, info.world, False, rt.device, rt.dtype)
    mine = torch.arange(info.rank, len(idx), info.world, device=idx.device)
    step_fn = _ddp(loss_fn, info.world, rt.device)  # held until backward: DDP's reducer lives on the wrapper
    sum(step_fn(idx[mine], seeds[mine], mine, 2).values()).backward()
    return {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}


def train_generator(
    preset: Preset,
    ws: Workspace,
    out_dir: str | Path,
    train_tasks: list[str],
    extra: list[TaskSpec] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    tensorboard: Path | None = None,
) -> GeneratorCard:
    """Train (or resume) a generator; writes ``out_dir`` with its card, weights and a loss log.

    ``out_dir`` must be new, empty or a generator folder of ours (resumed); with ``overwrite`` a finished
    one is replaced only once the new generator is complete (a killed ``overwrite`` run starts again).
    With ``tensorboard``, every loss term and the learning rate go to ``<dir>/generator/<out_dir name>``.
    Under torchrun the global batch is split over ranks and the loss module runs in DDP
    (gloo on CPU, NCCL on GPU); every rank steps its own LR schedule; rank 0 alone writes.
    """
    out_dir = Path(out_dir)
    main = init_distributed(runtime(preset.runtime).device).is_main
    curves = Curves(tensorboard if main else None, f"generator/{out_dir.name}")
    try:
        if main:  # the only rank that writes; checked before any work
            state = claim_output_dir(out_dir, "generator", overwrite=overwrite, resume=True, protected=ws.protected)
            if overwrite and state == "own":  # train beside the old generator, replace it once complete
                with atomic_dir(out_dir, "generator", overwrite=True, protected=ws.protected) as tmp:
                    return _train(preset, ws, tmp, train_tasks, extra, progress, False, curves)
        return _train(preset, ws, out_dir, train_tasks, extra, progress, not overwrite, curves)
    finally:
        curves.close()


def _train(
    preset: Preset,
    ws: Workspace,
    out_dir: Path,
    train_tasks: list[str],
    extra: list[TaskSpec] | None,
    progress: bool,
    resume: bool,
    curves: Curves,
) -> GeneratorCard:
    cfg, spec = preset.generator, VARIANTS[preset.generator.variant]
    rt = runtime(preset.runtime)
    info = init_distributed(rt.device)
    if cfg.batch_size % info.world:
        raise GeneratorError(f"generator.batch_size={cfg.batch_size} must be divisible by the {info.world} ranks")
    # ---- setup
    torch.manual_seed(cfg.seed)
    encoder = PromptEncoder(ws.prompt_cache, device=rt.device)
    data, tokenizer, model, loss_fn = _setup(
        preset, ws, train_tasks, extra, encoder, info.world, info.is_main, rt.device, rt.dtype
    )
    stage1 = cfg.stage1_steps if spec.stage1 else 0
    total = stage1 + cfg.steps
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stages = (stage1, cfg.steps) if stage1 else (cfg.steps,)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, stages))
    rng = torch.Generator().manual_seed(stable_seed("generator", cfg.seed) % 2**63)
    card = GeneratorCard(
        preset,
        list(train_tasks),
        str(ws.root),
        n_params(model),
        tokenizer.n_params,
        tokenizer.n_tokens,
        data.deltas.shape[1],
        data.adapter_config,
        {s.key: list(s.shape) for s in tokenizer.segments},
        tokenizer.width,
    )
    val = None  # rank 0 alone validates: it alone saves
    if cfg.val_every and info.is_main:
        val = Validation(data.val_emb, data.tokens, data.ckpt_task, tokenizer.valid_mask(), cfg)
    best = val.best if val else {}
    state_file, log_file = out_dir / "train_state.pt", out_dir / "log.jsonl"
    start, seconds = 0, 0.0
    if resume and state_file.exists():
        start, seconds = _resume(state_file, out_dir, card, model, opt, sched, rng, best, truncate_log=info.is_main)
    elif info.is_main:
        own_dir(out_dir, "generator", protected=ws.protected)
        card.to_file(out_dir / "train_config.json")
        log_file.unlink(missing_ok=True)  # a log without a training state is this run's own, from before its first save
    barrier()
    step_fn = _ddp(loss_fn, info.world, rt.device)
    # ---- run
    t0 = time.perf_counter() - seconds
    bar = tqdm(
        range(start, total),
        desc=f"generator {cfg.variant}",
        unit="step",
        disable=not (progress and info.is_main),
        initial=start,
        total=total,
    )
    mine = torch.arange(info.rank, cfg.batch_size, info.world, device=CPU)  # indexes the batch drawn on the CPU
    for step in bar:
        idx, seeds = draw_batch(rng, len(data.paths), cfg.batch_size)
        lr = opt.param_groups[0]["lr"]  # the rate this step uses, before the schedule moves on
        loss, losses = train_step(step_fn, model, opt, sched, idx, seeds, mine, 1 if step < stage1 else 2)
        if info.is_main:
            record = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
            # a first stage (B's E_ψ, A1's H) leaves the generator's adapters as they were: nothing to validate yet
            if val is not None and step >= stage1 and ((step + 1) % cfg.val_every == 0 or step + 1 == total):
                record["val_loss"] = val.update(model, step + 1)
            with log_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            curves.log(
                step + 1, lr=lr, **{k if k == "loss" else f"loss/{k}": v for k, v in record.items() if k != "step"}
            )
            if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                _save_state(state_file, model, opt, sched, rng, step + 1, time.perf_counter() - t0, best)
    # ---- save
    card = dataclasses.replace(card, train_seconds=time.perf_counter() - t0, steps_done=total, world_size=info.world)
    if best:
        model.load_state_dict(best["state"])
        card = dataclasses.replace(card, best_step=best["step"], val_loss=best["loss"])
    if loss_fn.linear is not None and info.is_main:
        card = dataclasses.replace(card, linear_check=_linear_check(model, data, loss_fn.linear, cfg))
    if info.is_main:
        save_generator(out_dir, model, tokenizer, data.delta_scale, card)
    barrier()
    return card


@torch.no_grad()
def _linear_check(model, data, linear: LinearDelta, cfg) -> dict[str, float]:
    """``LinearDelta.check`` on one adapter per training task, generated from a seeded draw of its train prompts."""
    g = torch.Generator().manual_seed(stable_seed("linear check", cfg.seed) % 2**63)
    first = [int((data.ckpt_task == t).nonzero()[0, 0]) for t in range(len(data.tasks))]
    emb = torch.stack([draw(data.emb[t], cfg.n_prompts, g) for t in range(len(data.tasks))])
    idx = torch.tensor(first, device=emb.device)
    return linear.check(model(emb).float(), idx)


def _save_state(path: Path, model, opt, sched, rng, step: int, seconds: float, best: dict) -> None:
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "rng": rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "seconds": seconds,
            **({"best": best} if best else {}),
        },
        buf,
    )
    atomic_write_bytes(path, buf.getvalue())


def _resume(
    state_file: Path, out_dir: Path, card: GeneratorCard, model, opt, sched, rng, best: dict, truncate_log: bool = True
) -> tuple[int, float]:
    cfg_file = out_dir / "train_config.json"
    if cfg_file.exists() and not GeneratorCard.from_file(cfg_file).same_run(card):
        raise GeneratorError(f"{cfg_file}: {out_dir} holds a run with another config; use a new --out or --overwrite")
    try:
        state = torch.load(state_file, weights_only=True, map_location=CPU)  # saved on any device
        model.load_state_dict(state["model"])
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported by path
        raise GeneratorError(f"{state_file}: cannot resume from this checkpoint ({e})") from e
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rng.set_state(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    best.update(state.get("best", {}))
    log.info("resuming generator training at step %d", state["step"])
    if truncate_log:
        _truncate_log(out_dir / "log.jsonl", state["step"])
    return state["step"], state["seconds"]


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the last checkpoint)."""
    if log_file.exists():
        lines = [ln for ln in log_file.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        log_file.write_text("".join(ln + "\n" for ln in lines))
