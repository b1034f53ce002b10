"""How fast is the sample builder on a log the size of Amazon Electronics 5-core?

The log: ``simulate(SimulationConfig.electronics_size())``, about 1.7M
clicks by 192k users on 62k items. Goal for :func:`build_samples` on it
(``max_len=50``): at most 10 s of wall time and 1.5 GB of peak memory on
the 2-core machine the book is built on.

For scale, the same log also goes through ``generate_seq_feature`` of
torch-rechub 0.9.0 (``max_len=50``, categories as the item attribute), the
function a reader would otherwise reach for. The two do not make identical
samples (torch-rechub, for instance, stops each user at 50 steps and
shuffles its output), but both turn one behaviour log into padded DIEN
histories with one sampled negative per target.

Each measurement runs in a fresh subprocess that times only the build call:
ours rebuilds the (deterministic) simulated log in the subprocess,
torch-rechub's reads it from a temporary CSV file. The subprocess reports its own
peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``, imports and the
loaded log included). torch-rechub runs with the Python of ``.venv-bench``,
made by ``benchmarks/setup_bench_env.sh``, so it never enters the project's
environment. The runs alternate, ours / theirs / ours / theirs, so a slow
patch of a shared machine hits both sides.

Usage (from the repository root)::

    bash benchmarks/setup_bench_env.sh     # once
    .venv/bin/python benchmarks/bench_samples.py

Prints a table and writes ``benchmarks/results/samples.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library up here: the torch-rechub child imports this file
# with the benchmark environment's Python, where dien_tutorial is absent.

ROOT = Path(__file__).resolve().parent.parent
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results" / "samples.json"
MAX_LEN = 50
GOAL_SECONDS = 10.0
GOAL_MB = 1500.0


def _rss_mb() -> float:
    """Current resident memory of this process in MB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------
# Children: each runs one build in a fresh process and prints one JSON line
# ---------------------------------------------------------------------------


def electronics_log(string_ids: bool):
    """The 1.7M-row simulated log; with ``string_ids`` ids are strings like Amazon's."""
    import warnings

    from dien_tutorial.data.log import validate_log
    from dien_tutorial.data.simulate import SimulationConfig, simulate

    log = simulate(SimulationConfig.electronics_size()).log
    if string_ids:
        frame = log.frame.copy()
        for col, prefix in (("user", "A"), ("item", "B"), ("category", "C")):
            frame[col] = prefix + frame[col].astype(str)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing may be dropped
            log = validate_log(frame, source="electronics_size(), string ids")
    return log


def time_build(log) -> tuple[float, object]:
    """Seconds of one ``build_samples(log, max_len=MAX_LEN, seed=0)``, and its result."""
    import warnings

    from dien_tutorial.data.samples import build_samples

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        start = time.perf_counter()
        samples = build_samples(log, max_len=MAX_LEN, seed=0)
        return time.perf_counter() - start, samples


def child_ours(kind: str) -> dict:
    """Time build_samples on the simulated log (``kind`` is "int" or "str" ids).

    The simulator is deterministic, so the child rebuilds the log instead of
    reading it from a file.
    """
    import gc

    log = electronics_log(kind == "str")
    gc.collect()
    rss_before = _rss_mb()
    seconds, samples = time_build(log)
    return {
        "seconds": seconds,
        "peak_mb": _peak_mb(),
        "rss_before_build_mb": rss_before,
        "samples": {name: len(s) for name, s in samples.splits.items()},
    }


def child_rechub(csv_path: str) -> dict:
    """Time torch-rechub's generate_seq_feature on the CSV at ``csv_path``."""
    import gc
    import random

    import numpy as np
    import pandas as pd
    import torch_rechub
    from torch_rechub.utils.data import generate_seq_feature

    data = pd.read_csv(csv_path)  # columns user_id, item_id, cate_id, time
    random.seed(0)  # its negative sampling and shuffle use the random module
    np.random.seed(0)
    gc.collect()
    rss_before = _rss_mb()
    start = time.perf_counter()
    train, valid, test = generate_seq_feature(
        data, "user_id", "item_id", "time", item_attribute_cols=["cate_id"], max_len=MAX_LEN
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mb": _peak_mb(),
        "rss_before_build_mb": rss_before,
        "samples": {"train": len(train), "valid": len(valid), "test": len(test)},
        "version": getattr(torch_rechub, "__version__", "unknown"),
    }


def run_child(python: Path, kind: str, path: Path) -> dict:
    """Run one child and return what it printed on its last stdout line."""
    done = subprocess.run(
        [str(python), __file__, "--child", kind, str(path)],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


def make_logs(workdir: Path, string_ids: bool) -> tuple[dict, str, Path | None]:
    """Simulate the log; write torch-rechub's copy as CSV (integer ids only).

    Returns the log's stats, the argument for our child, and the CSV path.
    """
    log = electronics_log(string_ids)
    ours = "str" if string_ids else "int"
    csv = None
    if not string_ids:
        csv = workdir / "log.csv"
        f = log.frame
        f.rename(columns={"user": "user_id", "item": "item_id", "category": "cate_id"})[
            ["user_id", "item_id", "cate_id", "time"]
        ].to_csv(csv, index=False)
    return log.stats(), ours, csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--no-rechub", action="store_true",
                        help="time only build_samples (no torch-rechub comparison)")
    args = parser.parse_args()
    if args.child:
        kind, path = args.child
        result = child_ours(path) if kind == "ours" else child_rechub(path)
        print(json.dumps(result))
        return

    with_rechub = not args.no_rechub
    if with_rechub and not BENCH_PYTHON.exists():
        sys.exit(f"{BENCH_PYTHON} is missing: run `bash benchmarks/setup_bench_env.sh` first "
                 "(or pass --no-rechub)")

    import numpy as np
    import pandas as pd
    import torch

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_samples_") as tmp:
        workdir = Path(tmp)
        print("simulating the electronics_size() log ...", flush=True)
        stats, ours_arg, csv = make_logs(workdir, string_ids=False)
        print(f"log: {stats['interactions']:,} clicks, {stats['users']:,} users, "
              f"{stats['items']:,} items, {stats['categories']:,} categories", flush=True)

        runs = []
        schedule = ["ours", "rechub", "ours", "rechub"] if with_rechub else ["ours", "ours"]
        for kind in schedule:
            python = BENCH_PYTHON if kind == "rechub" else Path(sys.executable)
            result = run_child(python, kind, csv if kind == "rechub" else ours_arg)
            result["kind"] = kind
            runs.append(result)
            print(f"  {kind:7s} {result['seconds']:8.2f} s  peak {result['peak_mb']:7.0f} MB",
                  flush=True)
        string_run = run_child(Path(sys.executable), "ours", "str")
        string_run["kind"] = "ours, string ids"
        print(f"  ours, string ids {string_run['seconds']:.2f} s  "
              f"peak {string_run['peak_mb']:.0f} MB", flush=True)

    ours = [r for r in runs if r["kind"] == "ours"]
    theirs = [r for r in runs if r["kind"] == "rechub"]
    ours_s = [r["seconds"] for r in ours]
    ours_mb = max(r["peak_mb"] for r in ours)
    summary = {
        "ours_seconds": ours_s,
        "ours_peak_mb": ours_mb,
        "ours_string_ids_seconds": string_run["seconds"],
        "ours_string_ids_peak_mb": string_run["peak_mb"],
        "meets_goal": bool(max(ours_s) <= GOAL_SECONDS and ours_mb <= GOAL_MB),
        "meets_goal_string_ids": bool(string_run["seconds"] <= GOAL_SECONDS
                                      and string_run["peak_mb"] <= GOAL_MB),
    }
    if theirs:
        theirs_s = [r["seconds"] for r in theirs]
        summary.update({
            "rechub_seconds": theirs_s,
            "rechub_peak_mb": max(r["peak_mb"] for r in theirs),
            # How many times faster ours is: per round (A/B pair), and of the means.
            "ratio_per_round": [t / o for o, t in zip(ours_s, theirs_s)],
            "ratio_of_means": float(np.mean(theirs_s) / np.mean(ours_s)),
        })

    print()
    print(f"build_samples on {stats['interactions']:,} clicks, max_len={MAX_LEN} "
          f"(goal <= {GOAL_SECONDS:.0f} s, <= {GOAL_MB:.0f} MB)")
    header = f"{'run':<28}{'wall s':>9}{'peak MB':>10}{'samples (train/valid/test)':>30}"
    print(header)
    print("-" * len(header))
    for r in runs + [string_run]:
        name = {"ours": "dien_tutorial build_samples",
                "rechub": "torch-rechub 0.9.0",
                "ours, string ids": "dien_tutorial, string ids"}[r["kind"]]
        n = r["samples"]
        print(f"{name:<28}{r['seconds']:>9.2f}{r['peak_mb']:>10.0f}"
              f"{n['train']:>14,}/{n['valid']:,}/{n['test']:,}")
    if theirs:
        print(f"torch-rechub / ours: {summary['ratio_of_means']:.1f}x "
              f"(rounds: {', '.join(f'{x:.1f}x' for x in summary['ratio_per_round'])})")
    print("goal met" if summary["meets_goal"] else "GOAL MISSED")

    report = {
        "benchmark": "build_samples on the electronics_size() simulated log",
        "max_len": MAX_LEN,
        "log": stats,
        "goal": {"seconds": GOAL_SECONDS, "peak_mb": GOAL_MB},
        "summary": summary,
        "runs": runs + [string_run],
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "torch": torch.__version__,
            "torch_rechub": theirs[0]["version"] if theirs else None,
        },
        "notes": [
            "wall seconds: build call only, in a fresh subprocess that first loads the log",
            "peak MB: the subprocess's ru_maxrss (imports and the loaded log included)",
            "torch-rechub: generate_seq_feature(data, 'user_id', 'item_id', 'time', "
            "item_attribute_cols=['cate_id'], max_len=50), in .venv-bench",
        ],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
