"""How much of a LoRA sum a rank-r merge keeps: for each zoo pair (a, b), the share of ‖ΔW_a + ΔW_b‖²_F (summed over
modules) in the top r singular directions of each module's rank-2r sum, the part PEFT's ``svd`` merge keeps and its
``cat`` merge keeps all of. Each module's singular values come from QR factors of the stacked B and A (2r × 2r),
so no dense ΔW is built.

    python benchmarks/merge_rank_energy.py --workspace runs/families --out results/merge_rank_energy_families.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from deltalora.io import atomic_write_json
from deltalora.workspace import Workspace
from deltalora.zoo.manifest import Manifest


def top_r_share(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], r: int) -> float:
    """Share of the squared Frobenius norm of Σ_modules (B_x A_x + B_y A_y) kept by each module's top-r SVD."""
    kept = total = 0.0
    for k in (k for k in x if k.endswith(".lora_A.weight")):
        kb = k.replace("lora_A", "lora_B")
        b = torch.cat([x[kb], y[kb]], 1).double()  # out × 2r
        a = torch.cat([x[k], y[k]], 0).double()  # 2r × in
        s2 = torch.linalg.svdvals(torch.linalg.qr(b).R @ torch.linalg.qr(a.T).R.T) ** 2  # the sum's singular values
        kept, total = kept + s2[:r].sum().item(), total + s2.sum().item()
    return kept / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0, help="zoo seed whose final adapters are merged")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ws = Workspace(args.workspace)
    manifest = Manifest.from_file(ws.manifest)
    pairs = sorted({c.pair_of for c in manifest if c.pair_of})
    rows = {}
    for a, b in pairs:
        x, y = (load_file(ws.zoo / manifest.finals(t, args.seed)[0].path / "adapter_model.safetensors") for t in (a, b))
        r = next(v for k, v in x.items() if k.endswith(".lora_A.weight")).shape[0]
        rows[f"{a}+{b}"] = {"rank": r, "top_r_share": round(top_r_share(x, y, r), 5)}
        print(f"{a} + {b}: rank {r}, top-r share {rows[f'{a}+{b}']['top_r_share']:.4f}", flush=True)
    atomic_write_json(
        args.out,
        {
            "command": "python benchmarks/merge_rank_energy.py",
            **{k: str(v) for k, v in vars(args).items()},
            "pairs": rows,
        },
    )


if __name__ == "__main__":
    main()
