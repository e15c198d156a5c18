"""Measure how far DDP generator gradients (2 gloo ranks) are from one process on the same global batch.

    python benchmarks/ddp_equivalence.py            # tiny preset, variants dnd, A1, A2, B, C

Prints, per variant, the largest relative difference max|g1 - g2| / max|g1| over all parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file


def main() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ws = tmp / "ws"
        for verb in (["zoo", "build"], ["delta", "compute", "--probes", "5"]):
            subprocess.run(
                [sys.executable, "-m", "deltalora", *verb, "--preset", "tiny", "--workspace", str(ws)],
                env=env,
                check=True,
                capture_output=True,
            )
        out = {}
        for variant in ("dnd", "A1", "A2", "B", "C"):
            files = []
            for n in (1, 2):
                f = tmp / f"{variant}_{n}.safetensors"
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--standalone",
                        f"--nproc-per-node={n}",
                        "-m",
                        "deltalora.generator.ddp_check",
                        str(ws),
                        str(f),
                        variant,
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                files.append(load_file(f))
            g1, g2 = files
            out[variant] = max((g1[k] - g2[k]).abs().max().item() / (g1[k].abs().max().item() + 1e-12) for k in g1)
            print(f"{variant:4s} max relative gradient difference, 2 ranks vs 1: {out[variant]:.2e}")
        print(json.dumps(out))


if __name__ == "__main__":
    main()
