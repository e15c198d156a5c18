"""Speed benchmarks: every number is a median over repeats measured in this one run.

    python benchmarks/bench.py --preset small            # needs `deltalora run --preset small` (zoo + δ)
    python benchmarks/bench.py --preset small --only eval  # one section
    python benchmarks/bench.py --preset small --device cuda  # every model on the GPU (the preset's device by default)

Sections (each printed as a ratio with the two absolute medians beside it):
  generation  fine-tuning one reference LoRA (the zoo's steps) vs `generate` from 32 prompts
  delta       Delta Activations: this project's way vs the reference recipe, >= 20 adapters
  trainer     zoo trainer vs a plain PEFT + transformers loop, same data, hyper-parameters, loss
  generator   generator training steps/s and peak memory per variant
  eval        multiple-choice scoring with a shared prompt cache vs one pass per choice

Model loading is excluded from every timing. Writes results/bench_<preset>.json (each
section as it finishes; sections already there are kept) and docs/performance.md (another
preset: docs/performance_<preset>.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SECTIONS = ("generation", "delta", "trainer", "generator", "eval")


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def device_of(preset) -> torch.device:
    from deltalora.device import resolve_device

    return resolve_device(preset.runtime.device)


def machine(device: torch.device) -> dict:
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def tokens_run(tok, items, cfg, steps: int, run_name: str, seed: int = 0) -> tuple[int, int]:
    """(real tokens, tokens the zoo trainer runs through the body) over ``train_lora``'s batches:
    a prefix shared by a whole micro-batch runs once, not once per row."""
    from deltalora.data.items import stable_seed
    from deltalora.zoo.training import batches, micro_batches, shared_prefix_length

    total = run = 0
    for b in batches(items, cfg.batch_size, steps, stable_seed("batches", run_name, seed)):
        for chunk in micro_batches(tok, b, cfg.max_length, cfg.micro_batch):
            n = sum(len(ids) for ids, _ in chunk)
            total += n
            run += n - (len(chunk) - 1) * shared_prefix_length(chunk, cfg.min_shared_prefix)
    return total, run


def linear_params(module: torch.nn.Module) -> int:
    """Weights of the linear layers: 2x this many FLOPs per token in a forward pass."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


# ---------------------------------------------------------------- 1. generation vs fine-tuning


def bench_generation(preset, ws, repeats: int) -> dict:
    from deltalora.data.tasks import load_task, resolve_spec
    from deltalora.generator.artifact import load_generator
    from deltalora.generator.encoder import PromptEncoder
    from deltalora.generator.generate import choose_prompts, generate_tensors, write_adapter
    from deltalora.generator.train import train_generator
    from deltalora.lm.models import load_base
    from deltalora.presets import apply_overrides
    from deltalora.zoo.training import train_lora

    task_name = preset.experiment.seen_eval[0] if preset.experiment.seen_eval else preset.pool[0]
    task = load_task(resolve_spec(task_name), preset.tasks)
    base, tok = load_base(preset.base, device_of(preset))
    ft_runs = max(2, repeats // 2)  # a fine-tuning run is long; its spread is small
    ft, ft_all = median_time(
        lambda: train_lora(
            base, tok, task.train, preset.zoo, preset.zoo.steps, 0, f"bench__{task_name}", lambda *a: None
        ),
        ft_runs,
    )
    with tempfile.TemporaryDirectory() as tmp:
        gen_dir = Path(tmp) / "gen"
        # generation cost does not depend on how long the generator trained
        train_generator(apply_overrides(preset, ["generator.steps=5"]), ws, gen_dir, list(preset.pool), progress=False)
        loaded = load_generator(gen_dir, device_of(preset))
        model, tokenizer = loaded.model, loaded.tokenizer
        # loading excluded; its per-prompt cache is emptied before every run
        encoder = PromptEncoder(device=device_of(preset))
        prompts = [it.prompt for it in task.train]
        n = loaded.card.n_prompts
        counter = iter(range(10**6))

        def emit():
            encoder.cache.clear()
            k = next(counter)
            tensors = generate_tensors(loaded, encoder, prompts, k)
            write_adapter(
                Path(tmp) / f"adapter{k}", tensors, loaded.card.adapter_config, {"bench": True}, loaded.card.preset.base
            )

        emit()  # warm-up: first-call allocations
        gen, gen_all = median_time(emit, repeats)
        # where the time goes: the same three steps, timed apart
        chosen = choose_prompts(prompts, n, 0)
        encode = median_time(lambda: (encoder.cache.clear(), encoder.encode(chosen)), repeats)[0]
        cond = encoder.encode(chosen)[None].to(loaded.device)
        with torch.inference_mode():  # as in generate_tensors
            decode = median_time(lambda: tokenizer.decode(model(cond)), repeats)[0]
            tensors = {k: v[0] for k, v in tokenizer.decode(model(cond)).items()}
        write = median_time(
            lambda: write_adapter(
                Path(tmp) / f"adapter{next(counter)}", tensors, loaded.card.adapter_config, {}, loaded.card.preset.base
            ),
            repeats,
        )[0]
        enc_tokens = sum(len(x) for x in encoder.model.tokenizer(chosen).input_ids)
        # int8 dynamic quantisation is a CPU kernel
        int8 = _int8_encoder(encoder, chosen, repeats) if encoder.device.type == "cpu" else None
        enc_flops = 2 * linear_params(encoder.model) * enc_tokens
    ft_tokens = tokens_run(tok, task.train, preset.zoo, preset.zoo.steps, f"bench__{task_name}")[1]
    ft_flops = (
        4 * linear_params(base.get_decoder()) * ft_tokens
    )  # forward, and a backward of the same size (input gradients only: the base is frozen)
    return {
        "task": task_name,
        "finetune_steps": preset.zoo.steps,
        "batch_size": preset.zoo.batch_size,
        "n_prompts": n,
        "finetune_seconds_median": ft,
        "finetune_seconds": ft_all,
        "generate_seconds_median": gen,
        "generate_seconds": gen_all,
        "ratio": ft / gen,
        "encode_seconds_median": encode,
        "generator_forward_and_decode_seconds_median": decode,
        "write_seconds_median": write,
        "encoder_tokens": enc_tokens,
        "encoder_int8_dynamic": int8,
        "finetune_tokens_run": ft_tokens,
        "finetune_gflop_estimate": ft_flops / 1e9,
        "encoder_gflop_estimate": enc_flops / 1e9,
        "flop_ratio_estimate": ft_flops / enc_flops,
        "note": "model loading excluded from both; prompt encoding (empty cache) and writing the PEFT folder included",
    }


def _int8_encoder(encoder, prompts: list[str], repeats: int) -> dict:
    """The cheaper encoder we did not adopt: int8 dynamic quantisation (per channel) of MiniLM's
    linear layers, timed against fp32 and compared by embedding cosine."""
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    fp32 = encoder.model
    q = quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear: per_channel_dynamic_qconfig})
    run = lambda m: m.encode(prompts, batch_size=encoder.batch_size, convert_to_tensor=True, show_progress_bar=False)  # noqa: E731
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(run(q), run(fp32))
        t_q, t_f = median_time(lambda: run(q), repeats)[0], median_time(lambda: run(fp32), repeats)[0]
    return {
        "seconds_median": t_q,
        "fp32_seconds_median": t_f,
        "speedup": t_f / t_q,
        "min_cosine_to_fp32": cos.min().item(),
        "mean_cosine_to_fp32": cos.mean().item(),
    }


# ---------------------------------------------------------------- 2. Delta Activations throughput


def bench_delta(preset, ws, repeats: int, n_adapters: int = 20) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deltalora.delta.compute import compute_zoo_deltas
    from deltalora.delta.probes import probe_prompts
    from deltalora.lm.models import _resolve, load_base
    from deltalora.workspace import Workspace
    from deltalora.zoo.manifest import Manifest

    root = ws.zoo
    manifest = list(Manifest.from_file(ws.manifest))[:n_adapters]
    base, tok = load_base(preset.base, device_of(preset))

    def ours():
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Workspace(Path(tmp))  # δ written here; its zoo is the benchmarked one
            scratch.zoo.symlink_to(root.resolve(), target_is_directory=True)
            return compute_zoo_deltas(base, tok, scratch, manifest, preset.delta, preset.base)

    ours_t, ours_all = median_time(ours, repeats)
    ours_d = ours()
    probes = probe_prompts(preset.delta.n_probes)

    @torch.inference_mode()
    def last_state(model, prompt):
        ids = tok(prompt, return_tensors="pt").input_ids.to(device_of(preset))
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].float()

    if preset.base == "tiny":  # in-memory model: give the reference recipe a folder to load from
        path = tempfile.mkdtemp()
        base.save_pretrained(path)
    else:
        path = _resolve(preset.base)
    ref_base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device_of(preset)).eval()
    base_mean = torch.stack([last_state(ref_base, p) for p in probes]).mean(0)  # once, not counted per adapter
    per_adapter, loading, max_diff = [], [], 0.0
    for c in manifest:
        t0 = time.perf_counter()
        m = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device_of(preset)),
            str(root / c.path),
            torch_device=str(device_of(preset)),
        ).eval()
        loading.append(time.perf_counter() - t0)
        d = torch.stack([last_state(m, p) for p in probes]).mean(0) - base_mean
        per_adapter.append(time.perf_counter() - t0)
        max_diff = max(max_diff, (d.cpu() - ours_d[c.path]).abs().max().item())
    ref_t = statistics.median(per_adapter) * len(manifest)
    return {
        "n_adapters": len(manifest),
        "n_probes": len(probes),
        "ours_seconds_median": ours_t,
        "ours_seconds": ours_all,
        "reference_seconds_median": ref_t,
        "reference_seconds_per_adapter": per_adapter,
        "reference_loading_seconds_per_adapter_median": statistics.median(loading),
        "ours_seconds_per_adapter": ours_t / len(manifest),
        "ours_adapters_per_min": 60 * len(manifest) / ours_t,
        "reference_adapters_per_min": 60 * len(manifest) / ref_t,
        "ratio": ref_t / ours_t,
        "max_abs_diff": max_diff,
        "note": "reference: base + adapter loaded from disk per adapter, one probe at a time (base activations once, "
        "not counted); ours: base once, batched probes, adapters swapped by weights",
    }


# ---------------------------------------------------------------- 3. zoo trainer vs plain loop


def bench_trainer(
    preset, repeats: int, steps: int = 8, tasks: tuple[str, ...] = ("arithmetic.2_digit_addition", "intent_recognition")
) -> dict:
    from deltalora.data.items import stable_seed
    from deltalora.data.tasks import load_task, resolve_spec
    from deltalora.lm.models import load_base
    from deltalora.presets import get_preset
    from deltalora.zoo.training import batches, completion_batch, train_lora

    base, tok = load_base(preset.base, device_of(preset))
    cfg = preset.zoo

    def shared_fraction(items, n_steps: int, run: str) -> float:
        total, run_ = tokens_run(tok, items, cfg, n_steps, run)
        return 1 - run_ / total

    pool = get_preset(preset.name).pool  # the preset's whole default pool, whatever --set pool= says
    train = {name: load_task(resolve_spec(name), preset.tasks).train for name in pool}
    pool_fractions = {name: shared_fraction(train[name], cfg.steps, f"{name}__seed0") for name in pool}
    tasks = tuple(t for t in tasks if t in pool) or pool[:2]
    out = {}
    for name in tasks:
        items = train[name]
        plan = batches(items, cfg.batch_size, steps, stable_seed("batches", "bench", 0))
        n_tokens = sum(int(completion_batch(tok, b, cfg.max_length)[1].sum()) for b in plan)
        losses: dict[str, list[float]] = {}

        def transformers_loss(model, batch):
            """What one writes with PEFT + transformers: a padded batch, labels=, logits at every position."""
            ids, mask, labels = (t.to(device_of(preset)) for t in completion_batch(tok, batch, cfg.max_length))
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss

        def run(key, loss_fn, items=items):  # same run name and seed: the same init and batches (`plan`)
            losses[key] = train_lora(base, tok, items, cfg, steps, 0, "bench", lambda *a: None, loss_fn).losses  # noqa: B023

        plain = lambda: run("plain", transformers_loss)  # noqa: E731
        ours = lambda: run("ours", None)  # noqa: E731

        t_plain, t_ours = [], []
        for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
            t_plain.append(median_time(plain, 1)[0])
            t_ours.append(median_time(ours, 1)[0])
        out[name] = {
            "steps": steps,
            "real_tokens": n_tokens,
            "plain_tokens_per_s": n_tokens / statistics.median(t_plain),
            "ours_tokens_per_s": n_tokens / statistics.median(t_ours),
            "ratio": statistics.median(t_plain) / statistics.median(t_ours),
            "plain_seconds": t_plain,
            "ours_seconds": t_ours,
            "max_loss_diff": max(abs(a - b) for a, b in zip(losses["plain"], losses["ours"])),
            "shared_prefix_token_fraction": shared_fraction(items, steps, "bench"),
        }
    return {
        "tasks": out,
        "ratio": statistics.median(v["ratio"] for v in out.values()),
        "pool_shared_prefix_token_fraction": pool_fractions,
        "pool_shared_prefix_token_fraction_overall": statistics.mean(pool_fractions.values()),
        "min_shared_prefix": cfg.min_shared_prefix,
        "note": "the same loop (init, batches, AdamW, schedule, clipping); only the loss computation differs: "
        "transformers' labels= loss on the padded batch vs the lean completion loss (LM head at answer "
        "positions only, a batch's common prefix run once); losses compared step by step",
    }


# ---------------------------------------------------------------- 4. generator training per variant

_CHILD = """
import json, resource, sys, time
from pathlib import Path
from deltalora.generator.train import train_generator
from deltalora.presets import apply_overrides, get_preset
from deltalora.workspace import Workspace
preset, ws, out, variant, steps, overrides = sys.argv[1:7]
# the main stage only: a first stage (B's E_ψ, A1's H) fits a small module and would dilute the per-step cost
p = apply_overrides(get_preset(preset), json.loads(overrides) + [f"generator.variant={variant}", f"generator.steps={steps}",
                    "generator.stage1_steps=0", f"generator.save_every={10**6}"])
card = train_generator(p, Workspace(Path(ws)), Path(out), list(p.pool), progress=False)
total = int(steps)
# VmHWM is this process image's own peak; ru_maxrss carries the parent's peak across fork + exec on Linux
status = Path("/proc/self/status")
hwm = [int(ln.split()[1]) / 1024 for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")] if status.exists() else []
print(json.dumps({"train_seconds": card.train_seconds, "steps": total, "n_params": card.n_params,
                  "peak_rss_mb": hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_generator(preset, ws, repeats: int, overrides: list[str], steps: int = 10) -> dict:
    from deltalora.generator.basis import HEADS
    from deltalora.generator.variants import VARIANTS

    out = {}
    for v, spec in VARIANTS.items():
        if spec.linear and not HEADS[preset.generator.head].basis:
            out[v] = {"skipped": f"linearises δ in basis coefficients; the preset's head is {preset.generator.head}"}
            continue
        runs = []
        for _ in range(repeats):  # a dnd run of 10 steps lasts about a second: take the median of several
            with tempfile.TemporaryDirectory() as tmp:
                res = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        _CHILD,
                        preset.name,
                        str(ws.root),
                        str(Path(tmp) / "g"),
                        v,
                        str(steps),
                        json.dumps(overrides),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        sps = [r["steps"] / r["train_seconds"] for r in runs]
        out[v] = {
            "steps_per_s": statistics.median(sps),
            "seconds_per_step": 1 / statistics.median(sps),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "n_params": runs[0]["n_params"],
            "runs": runs,
        }
    for v in out:
        if "skipped" not in out[v]:
            out[v]["cost_vs_dnd"] = out["dnd"]["steps_per_s"] / out[v]["steps_per_s"]
    return {
        "variants": out,
        "steps_per_run": steps,
        "exact_samples": preset.generator.exact_samples,
        "batch_size": preset.generator.batch_size,
        "note": "train loop only, the main stage only (setup excluded: loading, a first stage's fit of E_ψ or H, "
        "and for A2-lin measuring its Jacobians once per training set, cached in the workspace); peak RSS of the "
        "whole process",
    }


# ---------------------------------------------------------------- 5. evaluation throughput


def bench_eval(
    preset,
    repeats: int,
    n_items: int = 64,
    tasks: tuple[str, ...] = ("arithmetic.2_digit_addition", "unit_conversion.si_conversion"),
) -> dict:
    """A long prompt with its choices listed (arithmetic) and a short one (SI units): sharing the
    prompt's cache saves the most on the first, the trimmed LM head on the second."""
    from deltalora.data.tasks import load_task, resolve_spec
    from deltalora.lm.evaluate import choice_scores, choice_scores_unshared
    from deltalora.lm.models import load_base
    from deltalora.presets import get_preset

    base, tok = load_base(preset.base, device_of(preset))
    loaded = {n: load_task(resolve_spec(n), preset.tasks) for n in get_preset(preset.name).pool}
    mc = [n for n, t in loaded.items() if t.test[0].is_mc]
    out = {}
    for name in [t for t in tasks if t in mc] or mc[:2]:
        items = loaded[name].test[:n_items]
        args = (base, tok, items, preset.zoo.eval_batch_size, preset.zoo.max_length)
        shared, t_sh = median_time(lambda args=args: choice_scores(*args), repeats)
        unshared, t_un = median_time(lambda args=args: choice_scores_unshared(*args), repeats)
        s1, s2 = choice_scores(*args), choice_scores_unshared(*args)
        pick = lambda s: [max(range(len(x)), key=x.__getitem__) for x in s]  # noqa: E731
        out[name] = {
            "n_items": len(items),
            "n_choices": statistics.mean(len(it.choices) for it in items),
            "mean_prompt_tokens": statistics.mean(len(tok(it.prompt).input_ids) for it in items),
            "mean_choice_tokens": statistics.mean(
                len(tok(" " + c, add_special_tokens=False).input_ids) for it in items for c in it.choices
            ),
            "shared_items_per_s": len(items) / shared,
            "unshared_items_per_s": len(items) / unshared,
            "ratio": unshared / shared,
            "same_predictions": pick(s1) == pick(s2),
            "max_abs_score_diff": max(abs(a - b) for x, y in zip(s1, s2) for a, b in zip(x, y)),
        }
    return {"tasks": out, "ratio": statistics.median(v["ratio"] for v in out.values())}


# ---------------------------------------------------------------- report


def write_markdown(res: dict, json_file: Path, out: Path) -> None:
    m = res["machine"]
    sets = "".join(f" --set {o}" for o in res.get("overrides", []))
    L = [
        "# Performance",
        "",
        f"Measured by `python benchmarks/bench.py --preset {res['preset']}{sets}` on "
        + (f"{m['gpu']} ({m['device']}) with " if m.get("gpu") else "")
        + f"{m['cpu']} ({m['cores']} cores, "
        f"{m['threads']} torch threads, torch {m['torch']}, Python {m['python']}). Medians over repeats in one run; "
        f"numbers are read from `{json_file}`. Model loading is excluded from every timing."
        + (
            f" The zoo behind the δ and generator sections holds {len(res['pool'])} tasks ({', '.join(res['pool'])}); "
            "per-adapter and per-step costs do not depend on how many tasks it holds."
            if res.get("overrides")
            else ""
        ),
        "",
        "| benchmark | ours | baseline | ratio | target | check |",
        "|---|---|---|---|---|---|",
    ]
    if "generation" in res:
        g = res["generation"]
        L.append(
            f"| adapter from {g['n_prompts']} prompts (`generate`) vs fine-tuning one LoRA ({g['finetune_steps']} steps × {g['batch_size']}) | "
            f"{g['generate_seconds_median']:.3f} s | {g['finetune_seconds_median']:.1f} s | {g['ratio']:.0f}× | < 1 s, ≥ 500× | "
            f"{'met' if g['generate_seconds_median'] < 1 and g['ratio'] >= 500 else 'not met'} |"
        )
    if "delta" in res:
        d = res["delta"]
        L.append(
            f"| Delta Activations, {d['n_adapters']} adapters, {d['n_probes']} probes | {d['ours_adapters_per_min']:.0f} adapters/min | "
            f"{d['reference_adapters_per_min']:.0f} adapters/min | {d['ratio']:.1f}× | ≥ 5×, identical δ | "
            f"{'met' if d['ratio'] >= 5 else 'not met'}; max abs diff {d['max_abs_diff']:.1e} |"
        )
    if "trainer" in res:
        for name, t in res["trainer"]["tasks"].items():
            L.append(
                f"| zoo trainer, {name} ({t['steps']} steps) | {t['ours_tokens_per_s']:.0f} tok/s | {t['plain_tokens_per_s']:.0f} tok/s | "
                f"{t['ratio']:.2f}× | ≥ 1.5× | {'met' if t['ratio'] >= 1.5 else 'not met'}; max loss diff {t['max_loss_diff']:.1e} |"
            )
    if "eval" in res:
        for name, e in res["eval"]["tasks"].items():
            L.append(
                f"| multiple-choice scoring, {name} ({e['n_items']} items, {e['n_choices']:.1f} choices) | "
                f"{e['shared_items_per_s']:.1f} items/s | {e['unshared_items_per_s']:.1f} items/s | {e['ratio']:.1f}× | ≥ 3×, same accuracy | "
                f"{'met' if e['ratio'] >= 3 and e['same_predictions'] else 'not met'}; max score diff {e['max_abs_score_diff']:.1e} |"
            )
    if "generator" in res:
        gen = res["generator"]
        L += [
            "",
            f"Generator training ({gen['steps_per_run']} steps per run, batch {gen['batch_size']}, "
            f"exact-δ/KL terms on {gen['exact_samples'] or 'every'} sample(s) per step):",
            "",
            "| variant | steps/s | s/step | cost vs dnd | peak RSS (MB) | parameters |",
            "|---|---|---|---|---|---|",
        ]
        L += [
            f"| {v} | {x['steps_per_s']:.2f} | {x['seconds_per_step']:.3f} | {x['cost_vs_dnd']:.1f}× | {x['peak_rss_mb']:.0f} | {x['n_params']:,} |"
            if "skipped" not in x
            else f"| {v} | skipped: {x['skipped']} | | | | |"
            for v, x in gen["variants"].items()
        ]
    L += _where_the_time_goes(res)
    out.write_text("\n".join(L) + "\n")


def _where_the_time_goes(res: dict) -> list[str]:
    """Each target's breakdown, from the same run's numbers."""
    L = ["", "## Where the time goes", ""]
    if "generation" in res and "encode_seconds_median" in res["generation"]:
        g = res["generation"]
        q = g["encoder_int8_dynamic"]
        L.append(
            f"- **Generation.** Of {g['generate_seconds_median']:.3f} s, encoding the {g['n_prompts']} prompts "
            f"({g['encoder_tokens']} MiniLM tokens, no padding beyond length-sorted batches of 8, inference mode, cache emptied) "
            f"takes {g['encode_seconds_median']:.3f} s, the generator forward and LoRA decode {g['generator_forward_and_decode_seconds_median']:.3f} s "
            f"and writing the PEFT folder {g['write_seconds_median']:.3f} s. Both sides are matrix products at similar "
            f"efficiency: counting 2 FLOPs per linear weight per token, fine-tuning runs ≈{g['finetune_gflop_estimate']:,.0f} GFLOP "
            f"({g['finetune_tokens_run']:,} tokens, forward and input-gradient backward) and the encoder ≈{g['encoder_gflop_estimate']:.1f} GFLOP, "
            f"a ratio of ≈{g['flop_ratio_estimate']:.0f}× that bounds ours while the fp32 encoder stays "
            f"(fine-tuning / encoding alone: {g['finetune_seconds_median'] / g['encode_seconds_median']:.0f}×)."
            + (
                f" int8 dynamic quantisation of its linear layers "
                f"(per channel) was {q['speedup']:.2f}× faster but moved embeddings to a cosine of {q['min_cosine_to_fp32']:.3f} "
                f"(mean {q['mean_cosine_to_fp32']:.3f}) with fp32, so the generator would see conditions it was not trained on; not adopted."
                if q
                else ""
            )
        )
    if "delta" in res and "reference_loading_seconds_per_adapter_median" in res["delta"]:
        d = res["delta"]
        load, per = d["reference_loading_seconds_per_adapter_median"], d["ours_seconds_per_adapter"]
        ref_per = d["reference_seconds_median"] / d["n_adapters"]
        L.append(
            f"- **Delta Activations.** Ours spends {per:.3f} s per adapter (the base loaded once, its "
            f"{d['n_probes']} probes in one batch). The reference spends {ref_per:.3f} s: {load:.3f} s loading the base and the adapter "
            f"and {ref_per - load:.3f} s in {d['n_probes']} one-prompt forwards. Loading the base from local safetensors "
            f"is cheap: with loading free the reference would be {(ref_per - load) / per:.1f}× slower, which is what "
            f"batching the probes buys on this CPU, and loading takes it to {d['ratio']:.1f}×."
        )
    if "trainer" in res and "pool_shared_prefix_token_fraction" in res["trainer"]:
        t = res["trainer"]
        per_task = ", ".join(f"{n}: {v['shared_prefix_token_fraction']:.0%}" for n, v in t["tasks"].items())
        frac = t["pool_shared_prefix_token_fraction"]
        top = sorted(frac.items(), key=lambda kv: -kv[1])[:3]
        L.append(
            f"- **Zoo trainer.** Two savings, both exact: the LM head runs only at answer positions, and a prefix common to "
            f"the whole batch (at least {t['min_shared_prefix']} tokens) is run once, its keys and values shared by every row. "
            f"The share of tokens the second removes in the benchmark runs: {per_task}. Over the zoo's own batches it is "
            f"{t['pool_shared_prefix_token_fraction_overall']:.0%} on average across the {len(frac)} pool tasks, highest for "
            + ", ".join(f"{n} ({v:.0%})" for n, v in top)
            + ". Where a batch shares no prefix, only the LM-head saving is left."
        )
    if "eval" in res and all("mean_prompt_tokens" in e for e in res["eval"]["tasks"].values()):

        def bound(e: dict) -> float:  # tokens run one pass per choice / tokens run with the prompt shared
            p, c, k = e["mean_prompt_tokens"], e["mean_choice_tokens"], e["n_choices"]
            return k * (p + c) / (p + k * c)

        per = "; ".join(
            f"{n}: {e['mean_prompt_tokens']:.0f}-token prompts, {e['n_choices']:.1f} choices of {e['mean_choice_tokens']:.1f} tokens, "
            f"{bound(e):.1f}× fewer tokens, {e['ratio']:.1f}× faster"
            for n, e in res["eval"]["tasks"].items()
        )
        L.append(
            f"- **Multiple-choice scoring.** Each prompt runs once and its keys/values are repeated for the item's choices; "
            f"the LM head runs only where a position predicts a later token of its own choice. The saving is bounded by "
            f"the prompt's share of the tokens: {per}. Where the choices are longer than the prompt, 3× is out of reach "
            f"by token count alone."
        )
    return L if len(L) > 3 else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--workspace", type=Path, default=None, help="default runs/<preset>")
    ap.add_argument("--only", action="append", choices=SECTIONS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="default results/bench_<preset>.json")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="preset overrides as in `deltalora --set`, e.g. pool=a,b,c,d for a smaller benchmark zoo",
    )
    ap.add_argument("--device", default=None, help="cpu, auto, cuda or cuda:N (default: the preset's runtime.device)")
    args = ap.parse_args()
    if args.device:
        args.overrides.append(f"runtime.device={args.device}")  # the generator section's child processes read it too
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from deltalora.io import atomic_write_json
    from deltalora.presets import apply_overrides, get_preset
    from deltalora.workspace import Workspace

    preset = apply_overrides(get_preset(args.preset), args.overrides)
    ws = Workspace.of(args.workspace, preset.name)
    out = args.out or Path(f"results/bench_{preset.name}.json")
    res = json.loads(out.read_text()) if out.exists() else {}
    res.update(
        {
            "preset": preset.name,
            "overrides": args.overrides,
            "pool": list(preset.pool),
            "machine": machine(device_of(preset)),
        }
    )
    fns = {
        "generation": lambda: bench_generation(preset, ws, args.repeats),
        "delta": lambda: bench_delta(preset, ws, args.repeats),
        "trainer": lambda: bench_trainer(preset, args.repeats),
        "generator": lambda: bench_generator(preset, ws, args.repeats, args.overrides),
        "eval": lambda: bench_eval(preset, args.repeats),
    }
    for name in args.only or SECTIONS:
        print(f"[bench] {name} ...", flush=True)
        res[name] = fns[name]()
        res[name]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_json(out, res)
        print(json.dumps({k: v for k, v in res[name].items() if not isinstance(v, (dict, list))}), flush=True)
    # the small preset's page is docs/performance.md; another preset's goes beside it, never over it
    page = "performance" if preset.name == "small" else f"performance_{preset.name}"
    doc = Path(f"docs/{page}.md") if args.out is None else out.with_suffix(".md")
    write_markdown(res, out, doc)
    print(f"wrote {out} and {doc}")


if __name__ == "__main__":
    main()
