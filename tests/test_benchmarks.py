"""The benchmark script end to end on the tiny preset: every fast path it times gives the slow path's outputs.

Timings are printed, never asserted; what is asserted is that the script runs and that the
equivalence checks it records hold.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from deltalora.delta.compute import delta_stage
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
    assert set(res["generator"]["variants"]) == {"dnd", "A1", "A2", "B", "C"}
    for e in res["eval"]["tasks"].values():
        assert e["same_predictions"] and e["max_abs_score_diff"] < 1e-4

    md = out.with_suffix(".md").read_text()
    assert "| Delta Activations" in md and "## Where the time goes" in md and "Generator training" in md
