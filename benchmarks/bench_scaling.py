"""Sample building as the log grows: ``build_samples`` against torch-rechub.

The logs
--------
Sizes of about 10k, 100k, 500k and 1.7M rows. Up to the size of the real
Amazon Toys 5-core (167,597 rows) the log is a subset of Toys: whole users,
taken in a seeded random order until the size is reached; the full Toys log
is one more point. Beyond Toys, and at every size when the Toys files are
absent, the log comes from the simulator, ``SimulationConfig.
electronics_size()`` with the users and items scaled to the size (the
1.7M-row point is that preset itself, the log of ``bench_samples.py``).

The measurements
----------------
Each build runs in a fresh subprocess that times only the build call and
reports its own peak resident memory, imports and the loaded log included:
``VmHWM`` of ``/proc/self/status``, not ``getrusage``'s ``ru_maxrss``. On
Linux a process keeps, across ``exec``, the memory high-water mark of the
process that started it, so a child's ``ru_maxrss`` is never below its
parent's peak (a child of this 1 GB parent reported 1 GB after building a
10k-row log); ``VmHWM`` belongs to the new program alone.

- ours: the child rebuilds the log (subsets and the simulator are
  deterministic), then times ``build_samples(log, max_len=50, seed=0)``;
- torch-rechub: ``bench_samples.py``'s own child function, run with the
  Python of ``.venv-bench`` on a CSV of the same log, times
  ``generate_seq_feature(..., item_attribute_cols=["cate_id"], max_len=50)``;
  this file's ``--rechub-child`` calls it and replaces its ``ru_maxrss``
  figure with ``VmHWM`` (the original is kept as ``peak_mb_ru_maxrss``).

At every size the two alternate (ours, theirs, then theirs, ours, ...), so
a slow patch of a shared machine hits both. A torch-rechub run that passes
the time cap is stopped and recorded as such, and the larger sizes skip it.

``run_all.py`` calls :func:`sweep`; this file's command line only serves
the children.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Only the standard library up here, like the other benchmark scripts.

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
MAX_LEN = 50
TOYS_ROWS = 167_597  # rows of the full Toys 5-core log
ELECTRONICS_ROWS = 1_695_095  # rows of simulate(SimulationConfig.electronics_size())
ELECTRONICS_USERS = 192_403
ELECTRONICS_ITEMS = 63_001
SUBSET_SEED = 0


def short_size(rows: int) -> str:
    """10000 -> "10k", 1700000 -> "1.7M"."""
    return f"{rows / 1e6:g}M" if rows >= 1_000_000 else f"{rows / 1e3:g}k"


def log_specs(sizes: list[int], toys: bool, toys_full: bool) -> list[dict]:
    """The logs of the sweep, smallest first: ``{"source", "rows", "label"}``.

    ``rows`` is the target size (the log itself may be a little larger:
    users are taken whole); ``source`` is ``"toys_subset"``, ``"toys"`` or
    ``"sim"``. ``toys``: the Toys files exist; ``toys_full``: add the whole
    Toys log as a point.
    """
    specs = []
    for rows in sorted(sizes):
        if toys and rows < TOYS_ROWS:
            specs.append({"source": "toys_subset", "rows": rows, "label": f"Toys subset, {short_size(rows)}"})
        else:
            specs.append({"source": "sim", "rows": rows, "label": f"simulated, {short_size(rows)}"})
    if toys and toys_full:
        specs.append({"source": "toys", "rows": TOYS_ROWS, "label": "Toys, all"})
        specs.sort(key=lambda s: s["rows"])
    return specs


def make_log(spec: dict):
    """Build the log a spec describes (deterministic)."""
    import warnings

    import numpy as np

    from dien_tutorial.data.log import validate_log

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if spec["source"] in ("toys", "toys_subset"):
            from dien_tutorial.data.amazon import default_data_dir, load_toys_5core

            log = load_toys_5core(default_data_dir() / "amazon_toys_5core")
            if spec["source"] == "toys":
                return log
            frame = log.frame
            users, counts = np.unique(frame["user"].to_numpy(), return_counts=True)
            order = np.random.default_rng(SUBSET_SEED).permutation(len(users))
            enough = int(np.searchsorted(np.cumsum(counts[order]), spec["rows"])) + 1
            keep = frame["user"].isin(users[order[:enough]]).to_numpy()
            return validate_log(frame[keep].reset_index(drop=True), source=spec["label"])

        from dien_tutorial.data.simulate import SimulationConfig, simulate

        scale = spec["rows"] / ELECTRONICS_ROWS
        if abs(scale - 1) < 0.01:
            config = SimulationConfig.electronics_size()
        else:
            config = SimulationConfig.electronics_size(n_users=max(50, round(ELECTRONICS_USERS * scale)),
                                                       n_items=max(2_000, round(ELECTRONICS_ITEMS * scale)))
        return simulate(config).log


def own_peak_mb() -> float:
    """This program's own resident-memory high-water mark in MB (``VmHWM``).

    Falls back to ``ru_maxrss`` (which may include the parent's peak, see
    the module docstring) where ``/proc`` is absent.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_rechub_csv(log, path: Path) -> None:
    """The log in the columns ``bench_samples.py``'s torch-rechub child reads."""
    frame = log.frame.rename(columns={"user": "user_id", "item": "item_id", "category": "cate_id"})
    frame[["user_id", "item_id", "cate_id", "time"]].to_csv(path, index=False)


# ---------------------------------------------------------------------------
# Child: one build of ours in a fresh process
# ---------------------------------------------------------------------------


def child_ours(spec: dict) -> dict:
    """Time ``build_samples`` on the log of ``spec``; report the peak memory too."""
    import gc

    sys.path.insert(0, str(HERE))
    import bench_samples

    log = make_log(spec)
    gc.collect()
    seconds, samples = bench_samples.time_build(log)
    return {
        "seconds": seconds,
        "peak_mb": own_peak_mb(),
        "samples": {name: len(s) for name, s in samples.splits.items()},
        "log": log.stats(),
    }


def child_rechub(csv_path: str) -> dict:
    """``bench_samples.child_rechub`` on ``csv_path``, with this program's own peak memory."""
    sys.path.insert(0, str(HERE))
    import bench_samples

    result = bench_samples.child_rechub(csv_path)
    result["peak_mb_ru_maxrss"] = result["peak_mb"]
    result["peak_mb"] = own_peak_mb()
    return result


def _run(command: list[str], timeout: float) -> dict:
    """Run one child; its last stdout line is its JSON answer."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                              env={**os.environ, "PYTHONHASHSEED": "0"})
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "cap_seconds": timeout, "wall_seconds": time.perf_counter() - start}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ours(spec: dict, timeout: float) -> dict:
    return _run([sys.executable, __file__, "--child", json.dumps(spec)], timeout)


def run_rechub(csv: Path, timeout: float) -> dict:
    return _run([str(BENCH_PYTHON), __file__, "--rechub-child", str(csv)], timeout)


def sweep(sizes: list[int], toys: bool, toys_full: bool, rounds: int, rechub: bool, cap_seconds: float,
          workdir: Path, say=print) -> list[dict]:
    """Every log of :func:`log_specs`, ours and torch-rechub alternating.

    Returns one row per log: its spec and stats, and the runs of both sides
    (a torch-rechub run may be ``{"timed_out": True}`` or ``{"skipped": ...}``).
    """
    rows = []
    rechub_note = None if rechub else "not run: .venv-bench is missing"
    for spec in log_specs(sizes, toys, toys_full):
        log = make_log(spec)
        row = {**spec, "log": log.stats(), "ours": [], "rechub": []}
        csv = workdir / f"log_{spec['source']}_{spec['rows']}.csv"
        if rechub_note is None:
            write_rechub_csv(log, csv)
        del log
        for r in range(rounds):
            order = ("ours", "rechub") if r % 2 == 0 else ("rechub", "ours")
            for side in order:
                if side == "ours":
                    result = run_ours(spec, cap_seconds)
                elif rechub_note is not None:
                    result = {"skipped": rechub_note}
                else:
                    result = run_rechub(csv, cap_seconds)
                    load = os.getloadavg()[0]
                    result["load_after"] = load
                    if result.get("timed_out"):
                        rechub_note = f"not run: over the {cap_seconds:.0f} s cap at {row['label']}"
                row[side].append(result)
                if "seconds" in result:
                    say(f"    {row['label']:<28} {side:7s} {result['seconds']:8.2f} s  "
                        f"peak {result['peak_mb']:6.0f} MB")
                else:
                    say(f"    {row['label']:<28} {side:7s} {next(iter(result.items()))}")
        csv.unlink(missing_ok=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("--child", "--rechub-child"):
        sys.exit("usage: bench_scaling.py --child SPEC_JSON | --rechub-child CSV (started by run_all.py)")
    if sys.argv[1] == "--child":
        print(json.dumps(child_ours(json.loads(sys.argv[2]))))
    else:
        print(json.dumps(child_rechub(sys.argv[2])))
