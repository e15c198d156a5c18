"""What a weight loss converges to: each task's checkpoints scored one by one and as their mean.

A generator trained by MSE on every saved checkpoint of a task can at best emit their mean. This scores, on the
first --n-test test items of each task, every checkpoint of the task's first run and the mean of their tokens.

    python benchmarks/checkpoint_mean.py --preset families --workspace runs/fam_partial \\
        --tasks linguistic_mappings.pronoun_replacement_json,arithmetic.3_digit_division \\
        --out results/checkpoint_mean_families_partial.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from deltalora.data.tasks import load_task, resolve_spec
from deltalora.device import runtime
from deltalora.generator.dataset import zoo_targets
from deltalora.io import atomic_write_json
from deltalora.lm.evaluate import hits
from deltalora.lm.models import load_base
from deltalora.presets import get_preset
from deltalora.workspace import Workspace
from deltalora.zoo.adapters import AdapterSwapper
from deltalora.zoo.manifest import Manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="families")
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--tasks", required=True, help="comma-separated task names")
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    preset, ws, tasks = get_preset(args.preset), Workspace(args.workspace), args.tasks.split(",")
    ckpts = [c for c in Manifest.from_file(ws.manifest).singles() if c.task in tasks and c.seed == 0 and c.part == 0]
    _, lt, tokens = zoo_targets(ws, ckpts)
    base, tok = load_base(preset.base, runtime(preset.runtime).device)
    swapper = AdapterSwapper.like(base, ws.zoo / ckpts[0].path, preset.base)

    def accuracy(t, items) -> float:
        swapper.set_tensors(lt.decode(t))
        return statistics.fmean(hits(swapper.model, tok, items, preset.zoo.eval_batch_size, preset.zoo.max_length))

    rows = {}
    for task in tasks:
        items = load_task(resolve_spec(task, None), preset.tasks).test[: args.n_test]
        idx = [i for i, c in enumerate(ckpts) if c.task == task]
        rows[task] = {
            "by_step": {ckpts[i].step: accuracy(tokens[i], items) for i in idx},
            "mean_of_checkpoints": accuracy(tokens[idx].mean(0), items),
        }
        print(task, json.dumps(rows[task]), flush=True)
    swapper.unload()
    atomic_write_json(
        args.out,
        {
            "command": "python benchmarks/checkpoint_mean.py",
            **{k: str(v) for k, v in vars(args).items()},
            "tasks": rows,
        },
    )


if __name__ == "__main__":
    main()
