#!/usr/bin/env bash
# Create .venv-bench, the benchmark-only virtualenv holding the baselines.
#
# torch-rechub 0.9.0 and DeepCTR-Torch 0.3.0 are comparison baselines for
# benchmarks/run_all.py (and bench_train.py, bench_samples.py), not
# dependencies of dien_tutorial, so they live in their own environment.
# torch is installed first and pinned: an unpinned torch would make pip pull
# a multi-gigabyte CUDA build; this one is the CPU wheel the project uses.
#
# DeepCTR-Torch is optional: if pip cannot install it, the script says so,
# keeps pip's output in .venv-bench/deepctr-torch-install.log (run_all.py
# quotes it in its results) and still succeeds.
#
# Usage: bash benchmarks/setup_bench_env.sh   (from anywhere; idempotent)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-bench"

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"

has() {  # is the module importable (found, without running its code)?
    "$py" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)"
}

if ! has torch_rechub; then
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==2.13.0"
    # torch stays at the version above: pip only adds what torch-rechub needs.
    "$py" -m pip install --quiet "torch==2.13.0" "torch-rechub==0.9.0" pyarrow
fi

if ! has deepctr_torch; then
    log="$venv/deepctr-torch-install.log"
    if "$py" -m pip install --quiet "torch==2.13.0" "deepctr-torch==0.3.0" >"$log" 2>&1; then
        rm -f "$log"
    else
        echo "warning: deepctr-torch==0.3.0 did not install (see $log); benchmarks run without it" >&2
    fi
fi

"$py" -c "import torch, torch_rechub, pandas; print('bench env ready: torch', torch.__version__, '| pandas', pandas.__version__)"
if has deepctr_torch; then
    echo "DeepCTR-Torch: $("$py" -m pip show deepctr-torch 2>/dev/null | sed -n 's/^Version: //p')"
else
    echo "DeepCTR-Torch: not installed"
fi
