#!/usr/bin/env bash
# The GPU check in one command: the tiny preset end to end on CUDA and on this machine's CPU, compared at fixed
# tolerances, then unit timings of both, written to results/device_<gpu>.json (benchmarks/gpu_check.py says what
# is checked). deltalora runs from this source tree: no install, no network; the machine needs torch, transformers,
# peft, safetensors, tokenizers, numpy, scipy, scikit-learn, tqdm and typer (sentence-transformers brings most).
# Exit status: 0 all checks pass, 1 a check failed, 2 a package is missing, 3 no CUDA (the CPU half ran alone).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
