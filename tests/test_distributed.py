"""Runs under torchrun with 2 CPU processes (gloo): sharded zoo and δ, DDP generator training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deltalora.delta.compute import delta_stage

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(nproc: int, *args: str, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    res = subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def sharded_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("sharded")
    torchrun(2, "-m", "deltalora", "zoo", "build", "--preset", "tiny", "--workspace", str(ws))
    torchrun(2, "-m", "deltalora", "delta", "compute", "--preset", "tiny", "--workspace", str(ws), "--probes", "5")
    return ws


def test_sharded_zoo_equals_single_process(tiny_zoo, sharded_ws):
    manifest = json.loads((sharded_ws / "zoo" / "manifest.json").read_text())["checkpoints"]
    key = lambda c: (c["task"], c["seed"], c["step"])  # noqa: E731
    single = sorted((c.to_dict() for c in tiny_zoo.manifest), key=key)
    assert [key(c) for c in sorted(manifest, key=key)] == [key(c) for c in single]
    for a, b in zip(sorted(manifest, key=key), single):
        assert a["sha256"] == b["sha256"], a["path"]  # byte-identical adapters
        assert a["loss"] == b["loss"]
    runs = list((sharded_ws / "zoo" / "runs").glob("*.json"))
    assert len(runs) == len(list((tiny_zoo.root / "runs").glob("*.json")))


def test_sharded_delta_equals_single_process(tiny_zoo, sharded_ws):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    single = load_file(tiny_zoo.workspace / "delta" / "deltas_p5.safetensors")
    sharded = load_file(sharded_ws / "delta" / "deltas_p5.safetensors")
    assert sharded.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], atol=1e-6, rtol=0)
    assert not list((sharded_ws / "delta").glob("*.rank*"))  # part files merged and removed


@pytest.mark.parametrize("variant", ["dnd", "A2", "C"])
def test_ddp_gradient_equals_single_process(tiny_zoo, tmp_path, variant):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    torchrun(
        1, "-m", "deltalora.generator.ddp_check", str(tiny_zoo.workspace), str(tmp_path / "g1.safetensors"), variant
    )
    torchrun(
        2, "-m", "deltalora.generator.ddp_check", str(tiny_zoo.workspace), str(tmp_path / "g2.safetensors"), variant
    )
    g1, g2 = load_file(tmp_path / "g1.safetensors"), load_file(tmp_path / "g2.safetensors")
    assert g1.keys() == g2.keys() and len(g1) > 0
    worst = max((g1[k] - g2[k]).abs().max().item() / (g1[k].abs().max().item() + 1e-12) for k in g1)
    assert worst < 1e-4, f"relative gradient difference {worst:.2e}"  # fp32 reduction order; a wrong split is ~1e-1


def test_train_generator_under_torchrun_only_rank0_writes(tiny_zoo, tmp_path):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    out = tmp_path / "gen"
    torchrun(
        2,
        "-m",
        "deltalora",
        "train-generator",
        "--preset",
        "tiny",
        "--workspace",
        str(tiny_zoo.workspace),
        "--variant",
        "dnd",
        "--out",
        str(out),
        "--set",
        "generator.steps=4",
        "--set",
        "generator.save_every=2",
    )
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # one writer
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and (out / "generator.safetensors").exists()


def test_batch_not_divisible_by_ranks_is_refused(tiny_zoo, tmp_path):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "deltalora",
        "train-generator",
        "--preset",
        "tiny",
        "--workspace",
        str(tiny_zoo.workspace),
        "--out",
        str(tmp_path / "g"),
        "--set",
        "generator.batch_size=3",
    ]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "divisible" in res.stdout + res.stderr
