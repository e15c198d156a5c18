"""The CUDA paths that benchmarks/gpu_check.py does not reach, through the real CLI on the tiny preset.

    PYTHONPATH=src python benchmarks/gpu_paths.py --out FILE            # on a machine with CUDA
    PYTHONPATH=src python benchmarks/gpu_paths.py --device cpu --low fp32 --out FILE   # dry run of the plumbing

Three legs, each a `deltalora` command in a subprocess, compared with the plain single-process fp32 run on the same
device:
  bf16_zoo        `zoo build --dtype bf16`: per-step losses and test accuracies against fp32. bf16 keeps 8 bits of
                  mantissa (relative step 2^-8 = 0.4%), so on losses of about 5.5 a difference up to 0.1 over the
                  tiny preset's steps is rounding; more means autocast reaches something it should not.
  bf16_generator  `train-generator --dtype bf16` (dnd and A2) on the fp32 zoo's δ: per-step losses within 5% of fp32.
  nccl_zoo        `torchrun --nproc-per-node 1 ... zoo build`: the process group (NCCL on CUDA) and LOCAL_RANK device
                  selection; per-step losses within 1e-6 of the single process, checkpoint hashes compared.
Written to --out as JSON; exit status 0 when every leg holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_check import PROMPT_CACHE, loss_diff  # run as a script: benchmarks/ is on sys.path

from deltalora.workspace import Workspace

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


def cli(*args: str, torchrun: bool = False) -> float:
    """Run one deltalora command; its wall seconds. A failure prints its output's tail and stops the script."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"] if torchrun else []
    cmd = [*(launch or [sys.executable]), "-m", "deltalora", *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if res.returncode:
        print(" ".join(cmd), "\n", res.stdout[-3000:], res.stderr[-3000:], flush=True)
        raise SystemExit(1)
    return time.perf_counter() - t0


def zoo(ws: Path, device: str, dtype: str, torchrun: bool = False) -> dict:
    seconds = cli(
        "zoo", "build", "--preset", "tiny", "-w", str(ws), "--device", device, "--dtype", dtype, torchrun=torchrun
    )
    runs = {f.stem: json.loads(f.read_text()) for f in sorted((ws / "zoo" / "runs").glob("*.json"))}
    manifest = json.loads((ws / "zoo" / "manifest.json").read_text())["checkpoints"]
    return {
        "losses": {k: r["losses"] for k, r in runs.items()},
        "test_acc": {k: r["test_acc"] for k, r in runs.items()},
        "sha256": {c["path"]: c["sha256"] for c in manifest},
        "seconds": round(seconds, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the plumbing")
    ap.add_argument("--low", default="bf16", help="the reduced precision to compare (fp32 for a CPU dry run)")
    args = ap.parse_args()
    dev, low = args.device, args.low
    legs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = zoo(tmp / "fp32", dev, "fp32")
        half = zoo(tmp / "low", dev, low)
        legs["bf16_zoo"] = {
            "max_loss_diff": loss_diff(half["losses"], ref["losses"]),
            "tolerance": 0.1,
            "test_acc_fp32": ref["test_acc"],
            "test_acc_low": half["test_acc"],
            "seconds": {"fp32": ref["seconds"], "low": half["seconds"]},
        }
        legs["bf16_zoo"]["ok"] = legs["bf16_zoo"]["max_loss_diff"] <= 0.1

        nccl = zoo(tmp / "torchrun", dev, "fp32", torchrun=True)
        same = [p for p in ref["sha256"] if nccl["sha256"].get(p) == ref["sha256"][p]]
        legs["nccl_zoo"] = {
            "max_loss_diff": loss_diff(nccl["losses"], ref["losses"]),
            "tolerance": 1e-6,
            "identical_checkpoints": f"{len(same)} of {len(ref['sha256'])}",
        }
        legs["nccl_zoo"]["ok"] = legs["nccl_zoo"]["max_loss_diff"] <= 1e-6

        ws = tmp / "fp32"
        cli("delta", "compute", "--preset", "tiny", "-w", str(ws), "--probes", "5", "--device", dev)
        cache = Workspace(ws).prompt_cache
        cache.parent.mkdir(exist_ok=True)
        shutil.copy(PROMPT_CACHE, cache)
        worst = 0.0
        for variant in ("dnd", "A2"):
            logs = {}
            for dtype in ("fp32", low):
                out = tmp / f"gen_{variant}_{dtype}"
                cli(
                    "train-generator", "--preset", "tiny", "-w", str(ws), "--variant", variant, "--out", str(out),
                    "--device", dev, "--dtype", dtype,
                )  # fmt: skip
                logs[dtype] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
            rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(logs[low], logs["fp32"]))
            gen = legs.setdefault("bf16_generator", {"max_rel_loss_diff": {}, "losses": {}})
            gen["max_rel_loss_diff"][variant], gen["losses"][variant] = rel, logs
            worst = max(worst, rel if len(logs[low]) == len(logs["fp32"]) else math.inf)
        legs["bf16_generator"].update(tolerance=0.05, ok=worst <= 0.05)
    result = {"device": dev, "low": low, "legs": legs, "all_ok": all(leg["ok"] for leg in legs.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, leg in legs.items():
        print(f"[gpu_paths] {'PASS' if leg['ok'] else 'FAIL'} {name}: " + json.dumps(
            {k: v for k, v in leg.items() if k not in ("losses", "test_acc_fp32", "test_acc_low")}
        ), flush=True)  # fmt: skip
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
