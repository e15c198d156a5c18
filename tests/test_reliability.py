"""Fault injection: SIGKILL at random points and resume; corrupted artifacts are reported by path."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deltalora.delta.compute import delta_stage
from deltalora.errors import AdapterError, GeneratorError
from deltalora.generator.train import train_generator
from deltalora.presets import apply_overrides
from deltalora.workspace import Workspace
from deltalora.zoo.manifest import Manifest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CLI = [sys.executable, "-m", "deltalora"]


def kill_when(cmd: list[str], ready, timeout: float = 300) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true. False if it finished first."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


def run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def n_files(root: Path, pattern: str) -> int:
    return sum(1 for _ in root.glob(pattern)) if root.exists() else 0


@pytest.mark.parametrize("kill_after", [1, 5])
def test_zoo_build_killed_and_resumed_is_identical(tiny_zoo, tmp_path, kill_after):
    ws = tmp_path / "ws"
    cmd = [*CLI, "zoo", "build", "--preset", "tiny", "--workspace", str(ws)]
    killed = kill_when(cmd, lambda: n_files(ws / "zoo" / "adapters", "*/*/*/adapter_model.safetensors") >= kill_after)
    assert killed, "the build finished before the kill point"
    assert not (ws / "zoo" / "manifest.json").exists() or kill_after > 8
    run(cmd)
    resumed = {(c.task, c.seed, c.step): c.sha256 for c in Manifest.from_file(ws / "zoo" / "manifest.json")}
    reference = {(c.task, c.seed, c.step): c.sha256 for c in tiny_zoo.manifest}
    assert resumed == reference
    assert not [p for p in ws.rglob("*") if p.name.endswith(".tmp")]


def test_delta_killed_and_resumed_is_identical(tiny_zoo, tmp_path):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (20,))
    reference = load_file(tiny_zoo.ws.deltas(20))
    ws = tmp_path / "ws"
    shutil.copytree(tiny_zoo.workspace / "zoo", ws / "zoo")
    cmd = [*CLI, "delta", "compute", "--preset", "tiny", "--workspace", str(ws), "--probes", "20"]
    delay = random.Random(0).uniform(2.0, 6.0)  # somewhere in start-up or compute
    t0 = time.time()
    kill_when(cmd, lambda: time.time() - t0 > delay)
    run(cmd)
    resumed = load_file(ws / "delta" / "deltas_p20.safetensors")
    assert resumed.keys() == reference.keys()
    assert all((resumed[k] - reference[k]).abs().max() <= 1e-6 for k in reference)


def test_generator_killed_and_resumed_is_identical(tiny_zoo, tmp_path):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    args = [
        "--preset",
        "tiny",
        "--workspace",
        str(tiny_zoo.workspace),
        "--variant",
        "A1",
        "--set",
        "generator.steps=12",
        "--set",
        "generator.save_every=3",
        "--set",
        "generator.stage1_steps=4",  # A1 fits its δ-head alone first: the kill lands after the stage boundary
    ]
    run([*CLI, "train-generator", *args, "--out", str(tmp_path / "full")])
    out = tmp_path / "cut"
    cmd = [*CLI, "train-generator", *args, "--out", str(out)]
    lines = lambda: len((out / "log.jsonl").read_text().splitlines()) if (out / "log.jsonl").exists() else 0  # noqa: E731
    assert kill_when(cmd, lambda: lines() >= 7)
    assert not (out / "generator.safetensors").exists()
    run(cmd)
    a, b = load_file(tmp_path / "full" / "generator.safetensors"), load_file(out / "generator.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == list(range(1, 17))


def _corrupt(folder: Path, how: str) -> Path:
    f = folder / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:-8] + b"\x00" * 8)
    return f


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupted_checkpoint_is_reported_by_path_not_loaded(tiny_zoo, tmp_path, how):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_zoo.ws.zoo, ws.zoo)
    victim = _corrupt(ws.zoo / tiny_zoo.manifest.checkpoints[3].path, how)
    with pytest.raises(AdapterError, match="checksum") as err:
        delta_stage(tiny_zoo.preset, ws, (5,))
    assert str(victim) in str(err.value)


def test_corrupted_checkpoint_stops_generator_training(tiny_zoo, tmp_path):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_zoo.workspace, ws.root)
    victim = _corrupt(ws.zoo / next(c.path for c in tiny_zoo.manifest if not c.pair_of), "flip")
    with pytest.raises(AdapterError, match="checksum") as err:
        train_generator(
            apply_overrides(tiny_zoo.preset, ["generator.steps=2"]),
            ws,
            tmp_path / "g",
            list(tiny_zoo.preset.pool),
            progress=False,
        )
    assert str(victim) in str(err.value)


def test_corrupted_training_state_is_reported(tiny_zoo, tmp_path):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    preset = apply_overrides(tiny_zoo.preset, ["generator.steps=4", "generator.save_every=2"])
    out = tmp_path / "g"
    train_generator(preset, tiny_zoo.ws, out, list(preset.pool), progress=False)
    state = out / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(GeneratorError, match=str(state)):
        train_generator(preset, tiny_zoo.ws, out, list(preset.pool), progress=False)
