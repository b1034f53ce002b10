#!/usr/bin/env bash
# Create .venv-bench, the benchmark-only virtualenv holding torch-rechub.
#
# torch-rechub is a comparison baseline for benchmarks/bench_samples.py, not
# a dependency of dien_tutorial, so it lives in its own environment.
# torch is installed first and pinned: an unpinned torch would make pip pull
# a multi-gigabyte CUDA build; this one is the CPU wheel the project uses.
#
# Usage: bash benchmarks/setup_bench_env.sh   (from anywhere; idempotent)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-bench"

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"

if ! "$py" -c "import torch_rechub" 2>/dev/null; then
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==2.13.0"
    # torch stays at the version above: pip only adds what torch-rechub needs.
    "$py" -m pip install --quiet "torch==2.13.0" "torch-rechub==0.9.0" pyarrow
fi

"$py" -c "import torch, torch_rechub, pandas; print('bench env ready: torch', torch.__version__, '| pandas', pandas.__version__)"
