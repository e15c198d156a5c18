"""The benchmark scripts on the tiny preset: every fast path bench.py times gives the slow path's outputs, and the
GPU check's CPU half runs without the sentence encoder and its comparison flags what exceeds its tolerances.

Timings are printed, never asserted; what is asserted is that the scripts run and that the
equivalence checks they record hold.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from deltalora.delta.compute import delta_stage
from deltalora.generator.variants import VARIANTS
from deltalora.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def test_bench_script_runs_and_fast_paths_match(tiny_zoo, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(tiny_zoo.workspace, ws)
    delta_stage(tiny_zoo.preset, Workspace(ws))
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench.py"),
        "--preset",
        "tiny",
        "--workspace",
        str(ws),
        "--out",
        str(out),
        "--repeats",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())

    g = res["generation"]
    assert g["n_prompts"] == tiny_zoo.preset.generator.n_prompts and g["ratio"] > 0
    assert 0 < g["encode_seconds_median"] and g["encoder_tokens"] > 0
    assert -1 <= g["encoder_int8_dynamic"]["min_cosine_to_fp32"] <= 1
    d = res["delta"]
    assert d["n_adapters"] == len(tiny_zoo.manifest) and d["max_abs_diff"] < 1e-4
    for t in res["trainer"]["tasks"].values():
        assert t["max_loss_diff"] < 1e-4 and t["real_tokens"] > 0
    assert set(res["trainer"]["pool_shared_prefix_token_fraction"]) == set(tiny_zoo.preset.pool)
    assert set(res["generator"]["variants"]) == set(VARIANTS)  # every variant's step cost, the end-to-end ones too
    assert "skipped" in res["generator"]["variants"]["A2-lin"]  # tiny's conv head has no basis to linearise in
    for e in res["eval"]["tasks"].values():
        assert e["same_predictions"] and e["max_abs_score_diff"] < 1e-4

    md = out.with_suffix(".md").read_text()
    assert "| Delta Activations" in md and "## Where the time goes" in md and "Generator training" in md


# ---------------------------------------------------------------- the GPU check (its CPU half, and its comparison)


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_carries_every_prompt_the_tiny_preset_encodes(tiny_preset):
    from deltalora.data.tasks import load_pool
    from deltalora.generator.encoder import PromptEncoder

    carried = PromptEncoder(_gpu_check().PROMPT_CACHE)
    prompts = [it.prompt for t in load_pool(tiny_preset).values() for it in t.train]
    carried.encode(prompts)  # all cached: the sentence encoder is never loaded
    assert carried._model is None and not carried._dirty
    sample = prompts[::37]
    assert torch.allclose(PromptEncoder().encode(sample), carried.encode(sample), atol=1e-6)


def test_gpu_check_compares_two_runs_at_its_tolerances(tmp_path):
    gc = _gpu_check()
    run = gc.pipeline("cpu", tmp_path)
    same = gc.deltas_on("cpu", run["ws"])
    checks = gc.compare(run, run, same)
    assert set(checks) == {"zoo_losses", "generator_losses", "delta", "delta_same_zoo", "accuracies"}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["delta_same_zoo"]["max_diff"] == 0.0  # the same δ path on the same device: bit-identical
    off = copy.deepcopy({k: v for k, v in run.items() if k != "ws"})
    first = next(iter(off["zoo_losses"]))
    off["zoo_losses"][first][0] += 2 * gc.TOL_LOSS
    off["generator_losses"]["A2"][-1] -= 2 * gc.TOL_LOSS
    key = next(iter(off["deltas"]))
    off["deltas"][key] = off["deltas"][key] * (1 + 2 * gc.TOL_DELTA_REL)
    task = next(iter(off["lora_hits"]))
    off["lora_hits"][task][next(iter(off["lora_hits"][task]))][0] ^= 1
    checks = gc.compare(off, run)
    assert not any(c["ok"] for c in checks.values()), checks
    assert checks["accuracies"]["differing"] == [f"lora_hits:{task}"]


def test_checkpoint_mean_scores_each_checkpoint_and_their_mean(tiny_zoo, tmp_path):
    out = tmp_path / "mean.json"
    script = ROOT / "benchmarks" / "checkpoint_mean.py"
    args = ["--preset", "tiny", "--workspace", str(tiny_zoo.workspace), "--tasks", "syn.add,syn.copy"]
    proc = subprocess.run([sys.executable, str(script), *args, "--n-test", "8", "--out", str(out)], capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"syn.add", "syn.copy"}
    for row in res["tasks"].values():
        steps = [c.step for c in tiny_zoo.manifest.singles() if c.task == "syn.add"]
        assert sorted(int(s) for s in row["by_step"]) == sorted(steps)  # every kept checkpoint of the run
        assert all(a * 8 == round(a * 8) for a in [*row["by_step"].values(), row["mean_of_checkpoints"]])


def test_merge_rank_energy_matches_the_dense_svd_of_the_lora_sum(tiny_zoo, tmp_path):
    """The QR shortcut gives the share a dense SVD of every module's ΔW_a + ΔW_b gives; the script covers every pair."""
    spec = importlib.util.spec_from_file_location("merge_rank_energy", ROOT / "benchmarks" / "merge_rank_energy.py")
    mre = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mre)
    g = torch.Generator().manual_seed(0)
    x, y = (
        {"m.lora_A.weight": torch.randn(4, 12, generator=g), "m.lora_B.weight": torch.randn(10, 4, generator=g)}
        for _ in "xy"
    )
    s2 = torch.linalg.svdvals(sum(d["m.lora_B.weight"].double() @ d["m.lora_A.weight"].double() for d in (x, y))) ** 2
    assert abs(mre.top_r_share(x, y, 4) - (s2[:4].sum() / s2.sum()).item()) < 1e-9
    assert abs(mre.top_r_share(x, y, 8) - 1.0) < 1e-9  # the whole rank-2r sum
    out = tmp_path / "energy.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "merge_rank_energy.py"),
            "--workspace",
            str(tiny_zoo.workspace),
            "--out",
            str(out),
        ],
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = json.loads(out.read_text())["pairs"]
    assert set(pairs) == {"+".join(c.pair_of) for c in tiny_zoo.manifest if c.pair_of}
    assert all(0 < p["top_r_share"] <= 1 for p in pairs.values())
