"""Every benchmark of the book's Performance chapter, in one run: ``make bench``.

What it measures (each section's details are in the file it names)
----------------------------------------------------------------------
1. ``training``: our DIEN against torch-rechub 0.9.0's and DeepCTR-Torch
   0.3.0's on the same Amazon Toys samples and settings
   (``bench_frameworks.py``, ``bench_train.py``): training samples/s at
   batch 256 and 4096, then one epoch per framework and batch size, followed
   by a timed forward pass over the test split (inference samples/s and
   the test AUC), and each worker's peak resident memory.
2. ``din``: our DIN against torch-rechub's DIN at batch 256, training
   samples/s, twice: with torch-rechub's DIN given our widths (attention
   MLP 80-40 with sigmoid, head 200-80), and with the widths of its own
   Amazon example (attention MLP 256-128 with Dice, head 256-128); then
   one epoch of each side's DIN of our widths and its test AUC
   (``bench_train.py`` builds both sides). Each side's DIN runs in a
   fresh worker process (see ``run_din_fresh``).
3. ``onnx``: ONNX Runtime against eager PyTorch, median latency at batch
   1 and 256 (``dien_tutorial.export.benchmark_latency``).
4. ``history``: time per sample as the history grows (``T`` = 10 .. 200):
   on batches whose histories all have ``T`` steps (ours and
   torch-rechub), and on the real Toys batches built with ``max_len=T``
   (ours).
5. ``threads``: our training step at 1 and 2 intra-op threads, on the
   machine as it is ("quiet") and with one CPU-burning child process of
   this run ("loaded").
6. ``samples``: sample building as the log grows, ``build_samples`` against
   torch-rechub's ``generate_seq_feature`` (``bench_scaling.py``).

How
---
One parent (this file) and its children: a long-lived worker per
framework (ours in ``.venv``, the others in ``.venv-bench``), a fresh
process per sample build, and the CPU burner. Only one of them works at a
time. Whatever is compared is measured in this run, alternating A/B (and
B/A in the next round), so slow patches of a shared machine hit both
sides; ratios are taken round by round and averaged over the means.
Timed runs use 1 intra-op thread unless the section is about threads. The
1-minute load average is recorded with every measurement.

Without the Toys files (``DIEN_DATA_DIR`` or ``../shared/data``) the run
says so and uses the simulator's default data set for sections 1 to 5
and simulated logs for section 5. Without ``.venv-bench`` it runs our side
only. A section that fails is recorded and the run goes on.

Writes into ``--out`` (default ``benchmarks/results``; a ``--quick`` run or
one limited by ``--only`` defaults to a folder under the system's temporary
directory, so a smoke test never overwrites the committed results):

- ``summary.json``: every run, the summaries, the machine, the date;
- ``summary.md``: the tables, one block per section between
  ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` (the book includes them);
- ``machine.md``: one paragraph saying when, where and how it was measured;
- ``figures/*.png``: one plot per section (a section that was not measured
  gets a figure saying so, so that every file the book includes exists).

Usage (from the repository root)::

    make bench                                   # setup_bench_env.sh, then a full run (~15 min)
    .venv/bin/python benchmarks/run_all.py --quick --out /tmp/bench   # smoke test, a few minutes
    .venv/bin/python benchmarks/run_all.py --only training,onnx       # some sections
    .venv/bin/python benchmarks/run_all.py --render benchmarks/results   # tables and plots again
    .venv/bin/python benchmarks/run_all.py --render benchmarks/results --out /tmp/r   # ... elsewhere

Bad arguments (an ``--out`` that is a file, an ``--only`` that selects no
section) stop the run before anything is measured; ``--render`` of a
summary.json with missing or malformed fields writes nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_frameworks as bf  # noqa: E402
import bench_scaling as bs  # noqa: E402
import bench_train as bt  # noqa: E402

ROOT = HERE.parent
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
DEEPCTR_INSTALL_LOG = ROOT / ".venv-bench" / "deepctr-torch-install.log"
DEFAULT_OUT = HERE / "results"
SECTIONS = ("training", "din", "onnx", "history", "threads", "samples")
KINDS = ("ours", "rechub", "deepctr")
NAMES = bf.FRAMEWORKS
CONDITIONS = {"quiet": "quiet (no load added)", "loaded": "loaded (+1 busy process)"}

# Steps and rounds of the two modes. Steps are (timed, warm-up) per batch size.
FULL = {
    "train_batches": [256, 4096], "train_rounds": 2, "train_steps": {256: [150, 10], 4096: [12, 2]},
    "train_max_seconds": 45.0, "epoch_steps": None, "infer_max_batches": None,
    "din_models": ["din", "din_example"], "din_batch": 256, "din_rounds": 2,
    "din_steps": {"din": [400, 10], "din_example": [30, 3]},
    "onnx_rounds": 3, "onnx_repeats": 50, "onnx_batches": [1, 256], "onnx_steps_t": 50,
    "history_lengths": [10, 25, 50, 100, 200], "history_batch": 256, "history_rounds": 2,
    "history_steps": 20, "toys_len_steps": 60, "history_max_seconds": 6.0,
    "threads_batches": [256, 4096], "threads_rounds": 3, "threads_steps": {256: [100, 5], 4096: [10, 2]},
    "threads_max_seconds": 15.0, "burner_warmup_seconds": 5.0,
    "sample_sizes": [10_000, 100_000, 500_000, 1_700_000], "sample_rounds": 2, "sample_cap_seconds": 300.0,
    "sample_toys_full": True,
}
QUICK = {
    **FULL,
    "train_steps": {256: [20, 3], 4096: [3, 1]}, "train_max_seconds": 20.0,
    "epoch_steps": {256: 40, 4096: 4}, "infer_max_batches": {256: 20, 4096: 2},
    "din_steps": {"din": [40, 3], "din_example": [4, 1]},
    "onnx_rounds": 2, "onnx_repeats": 10,
    "history_lengths": [10, 50, 200], "history_rounds": 1, "history_steps": 5, "toys_len_steps": 10,
    "history_max_seconds": 3.0,
    "threads_batches": [256], "threads_rounds": 1, "threads_steps": {256: [20, 3]}, "threads_max_seconds": 6.0,
    "burner_warmup_seconds": 2.0,
    "sample_sizes": [10_000, 100_000], "sample_rounds": 2, "sample_cap_seconds": 120.0,
    "sample_toys_full": False,
}


def say(text: str) -> None:
    print(text, flush=True)


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def rotate(items: list, r: int) -> list:
    """Round ``r``'s order: A B C, then B C A, ...; two items alternate A B, B A."""
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


# ---------------------------------------------------------------------------
# Machine, data, workers
# ---------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU model, cores, memory, versions and the commit being measured."""
    cpu, mem_kb = "unknown", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    import numpy
    import pandas
    import torch

    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "numpy": numpy.__version__, "pandas": pandas.__version__}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
        info["uncommitted_changes"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def toys_available() -> bool:
    from dien_tutorial.data.amazon import default_data_dir

    data_dir = default_data_dir()
    return data_dir is not None and (data_dir / "amazon_toys_5core").is_dir()


def write_arrays(samples, path: Path) -> None:
    """Both splits as ``bench_train.samples_to_arrays`` makes them (DeepCTR-Torch also reads the lengths)."""
    import numpy as np

    np.savez(path, **bt.samples_to_arrays(samples))


def deepctr_missing_reason() -> str | None:
    """Why DeepCTR-Torch cannot run in .venv-bench, or None if it is installed."""
    found = subprocess.run([str(BENCH_PYTHON), "-c", "import importlib.util as u, sys; "
                            "sys.exit(0 if u.find_spec('deepctr_torch') else 1)"], capture_output=True)
    if found.returncode == 0:
        return None
    reason = "deepctr-torch==0.3.0 is not installed in .venv-bench"
    if DEEPCTR_INSTALL_LOG.exists():
        tail = " ".join(DEEPCTR_INSTALL_LOG.read_text().split())[-400:]
        reason += f"; setup_bench_env.sh's pip said: {tail}"
    return reason


def new_worker(kind: str, npz: Path, source: str, log: Path) -> bt.Worker:
    """A fresh worker process of one framework (``bench_frameworks.py --worker``)."""
    python = Path(sys.executable) if kind == "ours" else BENCH_PYTHON
    return bt.Worker([str(python), str(HERE / "bench_frameworks.py"), "--worker", kind, str(npz), source],
                     kind, NAMES[kind], log)


def start_workers(npz: Path, source: str, workdir: Path, only_ours: bool) -> tuple[dict, dict]:
    """Start every framework that can run; the reasons of those that cannot."""
    workers, missing = {}, {}
    for kind in KINDS:
        if kind != "ours" and only_ours:
            missing[kind] = "not needed by the sections asked for"
            continue
        if kind != "ours" and not BENCH_PYTHON.exists():
            missing[kind] = f"{BENCH_PYTHON.relative_to(ROOT)} is missing: run `bash benchmarks/setup_bench_env.sh`"
            continue
        if kind == "deepctr":
            reason = deepctr_missing_reason()
            if reason:
                missing[kind] = reason
                continue
        try:
            workers[kind] = new_worker(kind, npz, source, workdir / f"{kind}.log")
            say(f"  {NAMES[kind]} worker ready ({workers[kind].info.get('rss_mb', 0):.0f} MB)")
        except RuntimeError as err:
            missing[kind] = " ".join(str(err).split())[-600:]
            say(f"  {NAMES[kind]} could not start: {missing[kind]}")
    return workers, missing


def ask(worker: Worker, record: list, label: dict, **request) -> dict:
    """Send one request, keep the answer with its labels, print one line."""
    answer = worker.ask(**request)
    answer.update({"framework": NAMES[worker.kind], "kind": worker.kind, **label})
    record.append(answer)
    if "error" in answer:
        say(f"    {label} {NAMES[worker.kind]}: ERROR {answer['error'].strip().splitlines()[-1]}")
    return answer


# ---------------------------------------------------------------------------
# The sections
# ---------------------------------------------------------------------------


def timed_rounds(workers: dict, kinds: list[str], runs: list[dict], rounds: int, label: dict, title: str,
                 **request) -> None:
    """Training throughput runs, alternating the frameworks round by round (1 thread)."""
    for r in range(rounds):
        for kind in rotate(kinds, r):
            a = ask(workers[kind], runs, {"phase": "throughput", **label, "round": r}, cmd="train", threads=1,
                    **request)
            if "samples_per_s" in a:
                say(f"    {title} round {r}  {NAMES[kind]:14s} {a['samples_per_s']:9,.0f} samples/s  "
                    f"({a['steps']} steps, {a['seconds']:.1f} s, load {a['load_before']:.2f})")


def run_training(workers: dict, plan: dict) -> dict:
    runs: list[dict] = []
    kinds = [k for k in KINDS if k in workers]
    for batch in plan["train_batches"]:
        steps, warmup = plan["train_steps"][batch]
        timed_rounds(workers, kinds, runs, plan["train_rounds"], {"batch": batch}, f"train  batch {batch:5d}",
                     batch=batch, steps=steps, warmup=warmup, max_seconds=plan["train_max_seconds"])
        epoch = None if plan["epoch_steps"] is None else plan["epoch_steps"][batch]
        infer_max = None if plan["infer_max_batches"] is None else plan["infer_max_batches"][batch]
        for kind in kinds:
            a = ask(workers[kind], runs, {"phase": "epoch", "batch": batch},
                    cmd="train", batch=batch, steps=epoch, warmup=0, threads=1, infer_batch=batch,
                    infer_max_batches=infer_max)
            if "samples_per_s" in a:
                auc = f"{a['test_auc']:.4f}" if a.get("test_auc") is not None else "n/a"
                say(f"    epoch  batch {batch:5d}          {NAMES[kind]:14s} {a['samples_per_s']:9,.0f} "
                    f"samples/s train, {a['infer_samples_per_s']:9,.0f} inference, AUC {auc}, "
                    f"peak {a['peak_rss_mb']:.0f} MB ({a['seconds']:.1f} s)")
    summary = []
    for batch in plan["train_batches"]:
        ours = [r for r in runs if r["kind"] == "ours" and r["phase"] == "throughput"
                and r["batch"] == batch and "samples_per_s" in r]
        ours_by_round = {r["round"]: r["samples_per_s"] for r in ours}
        for kind in kinds:
            mine = [r for r in runs if r["kind"] == kind and r["batch"] == batch and "error" not in r]
            thr = [r for r in mine if r["phase"] == "throughput"]
            ep = [r for r in mine if r["phase"] == "epoch"]
            row = {"framework": NAMES[kind], "kind": kind, "batch": batch,
                   "train_samples_per_s": mean([r["samples_per_s"] for r in thr]),
                   "train_runs": [r["samples_per_s"] for r in thr],
                   "runs_cut_short": sum(bool(r.get("cut_short")) for r in thr),
                   "epoch_samples_per_s": ep[0]["samples_per_s"] if ep else None,
                   "epoch_steps": ep[0]["steps"] if ep else None,
                   "infer_samples_per_s": ep[0].get("infer_samples_per_s") if ep else None,
                   "test_auc": ep[0].get("test_auc") if ep else None,
                   "peak_rss_mb": max((r["peak_rss_mb"] for r in mine), default=None),
                   "errors": sum("error" in r for r in runs if r["kind"] == kind and r["batch"] == batch)}
            if kind != "ours" and ours and thr:
                per_round = [ours_by_round[r["round"]] / r["samples_per_s"] for r in thr
                             if r["round"] in ours_by_round]
                row["ours_faster_by"] = mean([o["samples_per_s"] for o in ours]) / row["train_samples_per_s"]
                row["ours_faster_by_per_round"] = per_round
            summary.append(row)
    return {"summary": summary, "runs": runs}


def run_din_fresh(workers: dict, plan: dict, npz: Path, source: str, workdir: Path) -> dict:
    """:func:`run_din` in a fresh worker per framework, started for it and closed after it.

    A training run starts in a fresh process, and torch-rechub's DIN is
    sensitive to what its process did before: in the worker that had just
    trained DIEN it ran about 20% faster than in a fresh one (its memory
    allocator had grown its thresholds on DIEN's larger tensors, and no
    longer handed memory back to the system between steps). Ours changed
    by 2%. Fresh workers measure both as a user's DIN run would meet them.
    """
    fresh = {}
    try:
        for kind in ("ours", "rechub"):
            if kind in workers:
                fresh[kind] = new_worker(kind, npz, source, workdir / f"{kind}-din.log")
        return run_din(fresh, plan)
    finally:
        for w in fresh.values():
            w.close()


def run_din(workers: dict, plan: dict) -> dict:
    """Our DIN against torch-rechub's, in its two builds; then one epoch of the like-for-like pair."""
    runs: list[dict] = []
    kinds = [k for k in ("ours", "rechub") if k in workers]
    batch = plan["din_batch"]
    for model in plan["din_models"]:
        steps, warmup = plan["din_steps"][model]
        timed_rounds(workers, kinds, runs, plan["din_rounds"], {"model": model}, f"{model:11s}", model=model,
                     batch=batch, steps=steps, warmup=warmup, max_seconds=plan["train_max_seconds"])
    epoch = None if plan["epoch_steps"] is None else plan["epoch_steps"][batch]
    infer_max = None if plan["infer_max_batches"] is None else plan["infer_max_batches"][batch]
    for kind in kinds:
        a = ask(workers[kind], runs, {"phase": "epoch", "model": "din"}, cmd="train", model="din", batch=batch,
                steps=epoch, warmup=0, threads=1, infer_batch=batch, infer_max_batches=infer_max)
        if "samples_per_s" in a:
            auc = f"{a['test_auc']:.4f}" if a.get("test_auc") is not None else "n/a"
            say(f"    epoch din           {NAMES[kind]:14s} {a['samples_per_s']:9,.0f} samples/s train, "
                f"AUC {auc} ({a['seconds']:.1f} s)")
    summary = []
    for model in plan["din_models"]:
        thr = {k: {r["round"]: r["samples_per_s"] for r in runs if r["kind"] == k and r["model"] == model
                   and r["phase"] == "throughput" and "samples_per_s" in r} for k in ("ours", "rechub")}
        row = {"model": model, "batch": batch,
               "ours_runs": list(thr["ours"].values()), "rechub_runs": list(thr["rechub"].values()),
               "ours_samples_per_s": mean(list(thr["ours"].values())),
               "rechub_samples_per_s": mean(list(thr["rechub"].values())),
               "runs_cut_short": sum(bool(r.get("cut_short")) for r in runs
                                     if r["model"] == model and r["phase"] == "throughput")}
        if row["ours_samples_per_s"] and row["rechub_samples_per_s"]:
            row["ours_faster_by"] = row["ours_samples_per_s"] / row["rechub_samples_per_s"]
            row["ours_faster_by_per_round"] = [thr["ours"][r] / thr["rechub"][r] for r in thr["ours"]
                                               if r in thr["rechub"]]
        summary.append(row)
    epochs = {r["kind"]: {"samples_per_s": r["samples_per_s"], "steps": r["steps"],
                          "test_auc": r.get("test_auc")}
              for r in runs if r["phase"] == "epoch" and "samples_per_s" in r}
    return {"summary": summary, "epochs": epochs, "runs": runs}


def run_onnx(workers: dict, plan: dict, workdir: Path) -> dict:
    runs: list[dict] = []
    for r in range(plan["onnx_rounds"]):
        a = ask(workers["ours"], runs, {"round": r}, cmd="latency", batches=plan["onnx_batches"],
                steps_t=plan["onnx_steps_t"], repeats=plan["onnx_repeats"], threads=1, workdir=str(workdir))
        for b in plan["onnx_batches"]:
            if str(b) in a:
                say(f"    round {r} batch {b:4d}: PyTorch {a[str(b)]['torch_ms']:8.3f} ms, "
                    f"ONNX Runtime {a[str(b)]['onnxruntime_ms']:8.3f} ms")
    summary = []
    for b in plan["onnx_batches"]:
        rows = [a[str(b)] for a in runs if str(b) in a]
        if not rows:
            continue
        per_round = [x["torch_ms"] / x["onnxruntime_ms"] for x in rows]
        summary.append({"batch": b, "torch_ms": statistics.median(x["torch_ms"] for x in rows),
                        "onnxruntime_ms": statistics.median(x["onnxruntime_ms"] for x in rows),
                        "torch_ms_rounds": [x["torch_ms"] for x in rows],
                        "onnxruntime_ms_rounds": [x["onnxruntime_ms"] for x in rows],
                        "ort_faster_by_per_round": per_round, "ort_faster_by": mean(per_round),
                        "steps_t": plan["onnx_steps_t"], "threads": 1})
    return {"summary": summary, "runs": runs}


def run_history(workers: dict, plan: dict, source: str) -> dict:
    runs: list[dict] = []
    sides = [("ours", "synthetic"), ("ours", "toys_len")] + ([("rechub", "synthetic")] if "rechub" in workers else [])
    batch, cap = plan["history_batch"], plan["history_max_seconds"]
    for steps_t in plan["history_lengths"]:
        for r in range(plan["history_rounds"]):
            for kind, cmd in rotate(sides, r):
                n = plan["toys_len_steps"] if cmd == "toys_len" else plan["history_steps"]
                a = ask(workers[kind], runs, {"cmd": cmd, "steps_t": steps_t, "round": r}, cmd=cmd,
                        steps_t=steps_t, batch=batch, train_steps=n, infer_steps=n, warmup=1,
                        max_seconds=cap, threads=1)
                if "train" in a:
                    say(f"    T {steps_t:4d} round {r} {NAMES[kind]:14s} {cmd:9s} train "
                        f"{1e6 * a['train']['seconds'] / a['train']['samples']:8.1f} us/sample, inference "
                        f"{1e6 * a['infer']['seconds'] / a['infer']['samples']:7.1f} us/sample")
    summary = []
    for kind, cmd in sides:
        for steps_t in plan["history_lengths"]:
            rows = [a for a in runs if a["kind"] == kind and a["cmd"] == cmd and a["steps_t"] == steps_t
                    and "train" in a]
            if not rows:
                continue
            series = "toys" if cmd == "toys_len" else "fixed"
            summary.append({
                "framework": NAMES[kind], "kind": kind, "series": series, "steps_t": steps_t,
                "train_us_per_sample": mean([1e6 * a["train"]["seconds"] / a["train"]["samples"] for a in rows]),
                "infer_us_per_sample": mean([1e6 * a["infer"]["seconds"] / a["infer"]["samples"] for a in rows]),
                "padded_width_mean": mean([a.get("padded_width_mean") for a in rows]),
                "valid_step_share": mean([a.get("valid_step_share") for a in rows]),
                "peak_rss_mb": max(a["peak_rss_mb"] for a in rows),
            })
    return {"summary": summary, "runs": runs, "batch": batch, "data": source}


def run_threads(workers: dict, plan: dict) -> dict:
    runs: list[dict] = []
    for condition in ("quiet", "loaded"):
        burner = None
        try:
            if condition == "loaded":
                # One busy child of this run takes a core for the whole phase.
                burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(plan["burner_warmup_seconds"])
            for batch in plan["threads_batches"]:
                steps, warmup = plan["threads_steps"][batch]
                for r in range(plan["threads_rounds"]):
                    for threads in rotate([1, 2], r):
                        a = ask(workers["ours"], runs, {"condition": condition, "batch": batch, "round": r},
                                cmd="train", batch=batch, steps=steps, warmup=warmup, threads=threads,
                                max_seconds=plan["threads_max_seconds"])
                        if "samples_per_s" in a:
                            cut = " (cut short)" if a.get("cut_short") else ""
                            say(f"    {condition:6s} batch {batch:5d} round {r} threads {threads}: "
                                f"{a['samples_per_s']:9,.0f} samples/s, load {a['load_before']:.2f} -> "
                                f"{a['load_after']:.2f}{cut}")
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
    summary = []
    for condition in ("quiet", "loaded"):
        for batch in plan["threads_batches"]:
            rows = [a for a in runs if a["condition"] == condition and a["batch"] == batch and "samples_per_s" in a]
            by = {t: [a for a in rows if a["threads"] == t] for t in (1, 2)}
            one = {a["round"]: a["samples_per_s"] for a in by[1]}
            per_round = [a["samples_per_s"] / one[a["round"]] for a in by[2] if a["round"] in one]
            summary.append({
                "condition": condition, "batch": batch,
                "samples_per_s_1": mean([a["samples_per_s"] for a in by[1]]),
                "samples_per_s_2": mean([a["samples_per_s"] for a in by[2]]),
                "two_over_one_per_round": per_round, "two_over_one": mean(per_round),
                "load_1min": [round(a["load_before"], 2) for a in rows] + [round(rows[-1]["load_after"], 2)]
                if rows else [],
                "runs_cut_short": sum(bool(a.get("cut_short")) for a in rows),
            })
    return {"summary": summary, "runs": runs}


def run_samples(plan: dict, toys: bool, workdir: Path) -> dict:
    sizes = list(plan["sample_sizes"])
    rows = bs.sweep(sizes, toys, plan["sample_toys_full"], plan["sample_rounds"], BENCH_PYTHON.exists(),
                    plan["sample_cap_seconds"], workdir, say=say)
    summary = []
    for row in rows:
        ours = [r for r in row["ours"] if "seconds" in r]
        theirs = [r for r in row["rechub"] if "seconds" in r]
        item = {"label": row["label"], "source": row["source"], "rows": row["log"]["interactions"],
                "users": row["log"]["users"],
                "ours_seconds": mean([r["seconds"] for r in ours]),
                "ours_peak_mb": max((r["peak_mb"] for r in ours), default=None),
                "rechub_seconds": mean([r["seconds"] for r in theirs]) if theirs else None,
                "rechub_peak_mb": max((r["peak_mb"] for r in theirs), default=None),
                "rechub_note": next((r.get("skipped") or (f"over the {r['cap_seconds']:.0f} s cap"
                                                          if r.get("timed_out") else r.get("error"))
                                     for r in row["rechub"] if "seconds" not in r), None)}
        if ours and theirs:
            per_round = [t["seconds"] / o["seconds"] for o, t in zip(ours, theirs)]
            item["ours_faster_by_per_round"] = per_round
            item["ours_faster_by"] = item["rechub_seconds"] / item["ours_seconds"]
        summary.append(item)
    return {"summary": summary, "runs": rows, "max_len": bs.MAX_LEN}


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _n(x: float | None, digits: int = 0) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _block(name: str, lines: list[str]) -> str:
    return "\n".join([f"<!-- begin {name} -->", "", *lines, "", f"<!-- end {name} -->", ""])


def table_training(sec: dict, plan: dict, frameworks: dict, data: dict) -> list[str]:
    speed = ["| framework | batch | training samples/s (runs) | ours faster by | inference samples/s |",
             "|---|---:|---:|---:|---:|"]
    epoch_rows = ["| framework | batch | one epoch: samples/s | test AUC | peak RSS (MB) |",
                  "|---|---:|---:|---:|---:|"]
    for row in sec["summary"]:
        runs = " / ".join(_n(x) for x in row["train_runs"])
        auc = "–" if row["test_auc"] is None else f"{row['test_auc']:.4f}"
        speed.append(f"| {row['framework']} | {row['batch']:,} | {_n(row['train_samples_per_s'])} ({runs}) "
                     f"| {_ratio(row.get('ours_faster_by'))} | {_n(row['infer_samples_per_s'])} |")
        epoch_rows.append(f"| {row['framework']} | {row['batch']:,} | {_n(row['epoch_samples_per_s'])} | {auc} "
                          f"| {_n(row['peak_rss_mb'])} |")
    for kind, info in frameworks.items():
        if not info["available"]:
            speed.append(f"| {NAMES[kind]} | – | not run | – | – |")
            epoch_rows.append(f"| {NAMES[kind]} | – | not run | – | – |")
    lines = speed + [""] + epoch_rows
    lines.append("")
    epoch = ("one full epoch" if plan["epoch_steps"] is None
             else "**quick run: only the first " + " / ".join(f"{s} batches at {b}" for b, s in
                                                         plan["epoch_steps"].items()) + "**")
    test = ("the whole test split" if plan["infer_max_batches"] is None
            else "**only the first " + " / ".join(f"{s} test batches at {b}" for b, s in
                                                  plan["infer_max_batches"].items()) + "**")
    steps = ", ".join(f"{s} steps at {b}" for b, (s, _) in plan["train_steps"].items())
    lines.append(f"Data: {data['description']}. DIEN, embeddings of width 8, histories of at most 50 steps, "
                 f"Adam lr 1e-3, 1 intra-op thread. Training samples/s: the mean of {plan['train_rounds']} "
                 f"alternating runs ({steps}, after warm-up steps; the runs in brackets). \"Ours faster by\": "
                 f"our mean over theirs. Then {epoch} from a fresh model, the samples/s of that epoch, and a "
                 f"timed forward pass in eval mode over {test} at the same batch size, which gives the "
                 "inference samples/s and the test AUC. Peak RSS: the worker's resident-memory high-water "
                 "mark over its runs at that batch size, loaded data included.")
    for kind, info in frameworks.items():
        if not info["available"]:
            lines.append("")
            lines.append(f"{NAMES[kind]} did not run: {_plain(info['reason'])}")
    return lines


DIN_BUILDS = {
    "din": "our widths: attention MLP 80-40 with sigmoid, head 200-80 with Dice",
    "din_example": "its Amazon example's widths: attention MLP 256-128 with Dice, head 256-128 with Dice",
}


def _by_batch(table: dict, batch: int):
    """``table[batch]``; a plan read back from summary.json has its keys as strings."""
    return table[batch] if batch in table else table[str(batch)]


def table_din(sec: dict, plan: dict, data: dict) -> list[str]:
    lines = ["| torch-rechub's DIN built with | batch | ours: samples/s (runs) | torch-rechub: samples/s (runs) "
             "| ours faster by |", "|---|---:|---:|---:|---:|"]
    for row in sec["summary"]:
        ours = " / ".join(_n(x) for x in row["ours_runs"])
        theirs = " / ".join(_n(x) for x in row["rechub_runs"])
        cut = " (some runs cut short)" if row["runs_cut_short"] else ""
        lines.append(f"| {DIN_BUILDS[row['model']]} | {row['batch']:,} | {_n(row['ours_samples_per_s'])} ({ours}) "
                     f"| {_n(row['rechub_samples_per_s'])} ({theirs}){cut} | {_ratio(row.get('ours_faster_by'))} |")
    epochs = sec["epochs"]
    if epochs:
        lines += ["", "| one epoch, DIN of our widths, batch " + f"{plan['din_batch']:,}"
                  + " | training samples/s | test AUC |", "|---|---:|---:|"]
        for kind in ("ours", "rechub"):
            if kind in epochs:
                e = epochs[kind]
                auc = "–" if e["test_auc"] is None else f"{e['test_auc']:.4f}"
                lines.append(f"| {NAMES[kind]} | {_n(e['samples_per_s'])} | {auc} |")
    epoch = ("one full epoch" if plan["epoch_steps"] is None
             else f"**quick run: only the first {_by_batch(plan['epoch_steps'], plan['din_batch'])} batches**")
    steps = ", ".join(f"{s} steps for the {'first' if m == 'din' else 'second'} row"
                      for m, (s, _) in plan["din_steps"].items())
    lines += ["", f"Data: {data['description']}. Our DIN (`build_model(\"din\", ...)`: attention pooling of the "
              "embeddings with the attention MLP 80-40 and sigmoid, head 200-80 with Dice) against "
              "torch-rechub 0.9.0's `DIN`, embeddings of width 8, histories of at most 50 steps, Adam lr 1e-3, "
              f"1 intra-op thread, each side in a fresh worker process. Samples/s: the mean of {plan['din_rounds']} "
              f"alternating runs ({steps}, after warm-up steps; the runs in brackets). The first row gives torch-rechub's DIN our widths; the "
              "second builds it as its own Amazon example does, a larger network (our DIN is the same in both "
              f"rows). Then {epoch} of each side's DIN of our widths from a fresh model, and the test AUC."]
    return lines


def _plain(text: str) -> str:
    """One line of text safe inside a markdown paragraph."""
    return " ".join(str(text).replace("|", "/").replace("`", "'").replace("<", "(").replace(">", ")").split())


def table_onnx(sec: dict, plan: dict) -> list[str]:
    lines = ["| batch | PyTorch (ms) | ONNX Runtime (ms) | ONNX Runtime faster by | rounds (PyTorch / ORT ms) |",
             "|---:|---:|---:|---:|---|"]
    for row in sec["summary"]:
        rounds = "; ".join(f"{t:.2f} / {o:.2f}" for t, o in zip(row["torch_ms_rounds"], row["onnxruntime_ms_rounds"]))
        lines.append(f"| {row['batch']} | {row['torch_ms']:.3f} | {row['onnxruntime_ms']:.3f} "
                     f"| {_ratio(row['ort_faster_by'])} | {rounds} |")
    lines += ["", f"Median latency of one forward pass of an untrained DIEN of the benchmark's widths, histories "
              f"of up to {plan['onnx_steps_t']} steps (mixed lengths, `random_inputs`), 1 thread, "
              f"{plan['onnx_repeats']} timed runs per framework and round, {plan['onnx_rounds']} rounds "
              "(PyTorch then ONNX Runtime in each). The ratio is the mean of the per-round ratios."]
    return lines


def table_history(sec: dict, plan: dict, data: dict) -> list[str]:
    rows = sec["summary"]
    series = [("ours", "fixed", "ours, every history T steps"),
              ("rechub", "fixed", "torch-rechub, every history T steps"),
              ("ours", "toys", f"ours, {data['short']} with max_len T")]
    series = [s for s in series if any(r["kind"] == s[0] and r["series"] == s[1] for r in rows)]
    head = " | ".join(f"{label}: train / inference" for _, _, label in series)
    lines = [f"| T | {head} |", "|---:|" + "---:|" * len(series)]
    for steps_t in plan["history_lengths"]:
        cells = []
        for kind, ser, _ in series:
            r = next((r for r in rows if r["kind"] == kind and r["series"] == ser and r["steps_t"] == steps_t), None)
            cells.append("–" if r is None else f"{r['train_us_per_sample']:,.0f} / {r['infer_us_per_sample']:,.1f}")
        lines.append(f"| {steps_t} | " + " | ".join(cells) + " |")
    toys = [r for r in rows if r["series"] == "toys"]
    share = ", ".join(f"{r['valid_step_share']:.0%} at T = {r['steps_t']}" for r in toys)
    lines += ["", f"Microseconds per sample, batch {plan['history_batch']}, 1 thread, mean of "
              f"{plan['history_rounds']} alternating round(s) of up to {plan['history_steps']} steps "
              f"({plan['toys_len_steps']} on the real batches), each run stopped after "
              f"{plan['history_max_seconds']:.0f} s. \"Every history T steps\": one batch of random ids, all "
              f"T slots valid. Real batches: valid share of the padded slots {share}."]
    return lines


def table_threads(sec: dict, plan: dict) -> list[str]:
    lines = ["| machine | batch | 1 thread (samples/s) | 2 threads (samples/s) | 2 threads ÷ 1 thread "
             "| 1-minute load average during the runs |", "|---|---:|---:|---:|---:|---|"]
    for row in sec["summary"]:
        load = ", ".join(f"{x:.2f}" for x in row["load_1min"])
        cut = " (some runs cut short)" if row["runs_cut_short"] else ""
        lines.append(f"| {CONDITIONS[row['condition']]} | {row['batch']:,} | {_n(row['samples_per_s_1'])} "
                     f"| {_n(row['samples_per_s_2'])}{cut} | {_ratio(row['two_over_one'])} | {load} |")
    lines += ["", f"Our DIEN training step, {plan['threads_rounds']} round(s) per setting, 1 and 2 threads "
              "alternating (1 then 2, then 2 then 1); each run stopped after "
              f"{plan['threads_max_seconds']:.0f} s. \"loaded\": one CPU-burning child process of the "
              "benchmark runs throughout. The load average lags by about a minute."]
    return lines


def table_samples(sec: dict, plan: dict) -> list[str]:
    lines = ["| log | rows | users | ours (s) | ours peak (MB) | torch-rechub (s) | torch-rechub peak (MB) "
             "| ours faster by |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sec["summary"]:
        theirs = (_n(row["rechub_seconds"], 2) if row["rechub_seconds"] is not None
                  else _plain(row["rechub_note"] or "–"))
        lines.append(f"| {row['label']} | {row['rows']:,} | {row['users']:,} | {_n(row['ours_seconds'], 2)} "
                     f"| {_n(row['ours_peak_mb'])} | {theirs} | {_n(row['rechub_peak_mb'])} "
                     f"| {_ratio(row.get('ours_faster_by'))} |")
    lines += ["", f"`build_samples(log, max_len={bs.MAX_LEN})` against torch-rechub's `generate_seq_feature(..., "
              f"max_len={bs.MAX_LEN})`, each build in a fresh process, mean of {plan['sample_rounds']} alternating "
              f"runs; peak: the process's resident-memory high-water mark, imports and the loaded log included. "
              f"A torch-rechub run is stopped after {plan['sample_cap_seconds']:.0f} s."]
    return lines


def machine_paragraph(report: dict) -> str:
    m = report["machine"]
    when = datetime.fromisoformat(report["date_utc"]).strftime("%Y-%m-%d at %H:%M UTC")
    versions = [f"Python {m['python']}", f"torch {m['torch']}"]
    ours = report["frameworks"]["ours"].get("info", {})
    if ours.get("onnxruntime"):
        versions.append(f"ONNX Runtime {ours['onnxruntime']}")
    for kind, key in (("rechub", "torch_rechub"), ("deepctr", "deepctr_torch")):
        info = report["frameworks"][kind].get("info", {})
        if info.get(key):
            versions.append(f"{NAMES[kind]} {info[key]}")
    commit = (m.get("commit") or "unknown")[:10]
    dirty = " with uncommitted changes" if m.get("uncommitted_changes") else ""
    start, end = report["load_average_start"], report["load_average_end"]
    text = (f"These numbers come from `make bench` (`benchmarks/run_all.py{' --quick' if report['quick'] else ''}`), "
            f"run on {when} on one machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB of memory, "
            f"{', '.join(versions)}; code at commit `{commit}`{dirty}. The 1-minute load average was "
            f"{start[0]:.2f} at the start and {end[0]:.2f} at the end; the whole run took "
            f"{report['wall_seconds'] / 60:.1f} minutes.")
    if report["data"]["source"] != "toys":
        text += (" **The Amazon Toys data was missing: the training, history and thread numbers come from "
                 "the simulator's default data set, the sample-building sweep from simulated logs.**")
    if report["quick"]:
        text += (" **This was a quick run (`--quick`): few steps and partial epochs, a smoke test whose "
                 "numbers are not for reading.**")
    return text + "\n"


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------

COLORS = {"ours": "#1f77b4", "rechub": "#ff7f0e", "deepctr": "#2ca02c"}


def _bars(ax, groups: list[str], series: list[tuple[str, list, str]], fmt: str = "{:,.0f}") -> None:
    """Grouped bars with their values written on top."""
    import numpy as np

    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (label, values, color) in enumerate(series):
        pos = x - 0.4 + width * (i + 0.5)
        heights = [0 if v is None else v for v in values]
        bars = ax.bar(pos, heights, width, label=label, color=color)
        for bar, v in zip(bars, values):
            if v is not None:
                ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(x, groups)
    ax.margins(y=0.15)


def _save(fig, title: str, quick: bool, path: Path) -> None:
    """Title the figure (marking a quick run), lay it out, write it and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title + (" (quick run)" if quick else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_missing(text: str, path: Path) -> None:
    """A figure that only says why there is no plot."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(sec: dict, path: Path, quick: bool, data: dict) -> None:
    import matplotlib.pyplot as plt

    rows = sec["summary"]
    batches = sorted({r["batch"] for r in rows})
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    panels = [("train_samples_per_s", "training samples/s"), ("infer_samples_per_s", "inference samples/s"),
              ("peak_rss_mb", "peak RSS (MB)")]
    for ax, (key, title) in zip(axes, panels):
        series = []
        for kind in kinds:
            values = [next((r[key] for r in rows if r["kind"] == kind and r["batch"] == b), None) for b in batches]
            series.append((NAMES[kind], values, COLORS[kind]))
        _bars(ax, [f"batch {b:,}" for b in batches], series)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    where = "Amazon Toys" if data["source"] == "toys" else "simulated data"
    _save(fig, f"DIEN on {where}, 1 thread", quick, path)


def plot_din(sec: dict, path: Path, quick: bool) -> None:
    import matplotlib.pyplot as plt

    rows = sec["summary"]
    built = {"din": "torch-rechub's DIN\nwith our widths", "din_example": "torch-rechub's DIN\nas in its Amazon example"}
    labels = [built[r["model"]] + (f"\n(ours {r['ours_faster_by']:.1f}× faster)" if r.get("ours_faster_by") else "")
              for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    _bars(ax, labels, [(NAMES["ours"], [r["ours_samples_per_s"] for r in rows], COLORS["ours"]),
                       (NAMES["rechub"], [r["rechub_samples_per_s"] for r in rows], COLORS["rechub"])])
    ax.set_ylabel("training samples/s")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, f"DIN, batch {rows[0]['batch'] if rows else ''}, 1 thread", quick, path)


def plot_onnx(sec: dict, path: Path, quick: bool) -> None:
    import matplotlib.pyplot as plt

    rows = sec["summary"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 0.5, 3.4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        _bars(ax, [f"batch {row['batch']}"], [("PyTorch", [row["torch_ms"]], COLORS["ours"]),
                                              ("ONNX Runtime", [row["onnxruntime_ms"]], "#9467bd")],
              fmt="{:.2f} ms")
        ax.set_ylabel("median latency (ms)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, "One forward pass, 1 thread", quick, path)


def plot_history(sec: dict, path: Path, quick: bool, data: dict) -> None:
    import matplotlib.pyplot as plt

    rows = sec["summary"]
    lines = [("ours", "fixed", "ours, every history T steps", "-", "o"),
             ("rechub", "fixed", "torch-rechub, every history T steps", "-", "s"),
             ("ours", "toys", f"ours, {data['short']}, max_len T", "--", "^")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "train_us_per_sample", "training step"),
                           (axes[1], "infer_us_per_sample", "inference")):
        for kind, series, label, style, marker in lines:
            pts = sorted((r["steps_t"], r[key]) for r in rows if r["kind"] == kind and r["series"] == series)
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, color=COLORS[kind], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([10, 25, 50, 100, 200], ["10", "25", "50", "100", "200"])
        ax.set_xlabel("history length T")
        ax.set_ylabel("µs per sample")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    _save(fig, f"Time per sample against history length, batch {sec['batch']}, 1 thread", quick, path)


def plot_threads(sec: dict, path: Path, quick: bool) -> None:
    import matplotlib.pyplot as plt

    rows = sec["summary"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.8 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches):
        mine = [r for r in rows if r["batch"] == b]
        groups = [f"{CONDITIONS[r['condition']]}\nload {mean(r['load_1min']) or 0:.1f}" for r in mine]
        _bars(ax, groups, [("1 thread", [r["samples_per_s_1"] for r in mine], COLORS["ours"]),
                           ("2 threads", [r["samples_per_s_2"] for r in mine], "#d62728")])
        ax.set_title(f"batch {b:,}", fontsize=10)
        ax.set_ylabel("training samples/s")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, "Our training step at 1 and 2 intra-op threads", quick, path)


def plot_samples(sec: dict, path: Path, quick: bool) -> None:
    import matplotlib.pyplot as plt

    rows = sec["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, suffix, title in ((axes[0], "seconds", "build time (s)"), (axes[1], "peak_mb", "peak RSS (MB)")):
        for kind, name in (("ours", "dien_tutorial build_samples"), ("rechub", "torch-rechub generate_seq_feature")):
            pts = sorted((r["rows"], r[f"{kind}_{suffix}"], r["source"]) for r in rows
                         if r[f"{kind}_{suffix}"] is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=COLORS[kind], label=name)
            for source, marker, fill in (("sim", "o", COLORS[kind]), ("toys_subset", "s", "white"),
                                         ("toys", "D", "white")):
                sel = [p for p in pts if p[2] == source]
                if sel:
                    ax.plot([p[0] for p in sel], [p[1] for p in sel], marker, color=COLORS[kind],
                            markerfacecolor=fill, linestyle="none")
        ax.set_xscale("log")
        if suffix == "seconds":
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("rows of the behaviour log (squares, diamond: real Toys data; dots: simulated)", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    _save(fig, f"Sample building, max_len {bs.MAX_LEN}", quick, path)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


OUTPUT_FILES = ("summary.json", "summary.md", "machine.md")  # plus figures/*.png

# The fields of summary.json that --render reads, and their JSON types.
REPORT_FIELDS = {"quick": bool, "date_utc": str, "machine": dict, "settings": dict, "sections": dict,
                 "errors": dict, "data": dict, "frameworks": dict, "load_average_start": list,
                 "load_average_end": list, "wall_seconds": (int, float)}


def out_problem(out: Path) -> str | None:
    """Why the results cannot be written into ``out``, or None if they can.

    ``out`` must be a folder, or a path where one can be created; inside it
    ``figures`` must be (or become) a folder and the three output files
    must not be folders. Nothing is created here.
    """
    if out.exists():
        if not out.is_dir():
            return f"--out {out} is a file, not a folder"
        for name in OUTPUT_FILES:
            if (out / name).is_dir():
                return f"{out / name} is a folder; the run writes a file of that name"
        if (out / "figures").exists() and not (out / "figures").is_dir():
            return f"{out / 'figures'} is a file; the run writes its plots into a folder of that name"
        if not os.access(out, os.W_OK | os.X_OK):
            return f"--out {out} is not writable"
        return None
    parent = out.parent
    while not parent.exists():  # the nearest existing folder above, where out would be created
        parent = parent.parent
    if not parent.is_dir():
        return f"--out {out} cannot be created: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out} cannot be created: {parent} is not writable"
    return None


def load_report(source: Path) -> dict:
    """Read a summary.json written by a run, checking the fields ``--render`` needs.

    Raises:
        ValueError: unreadable JSON, or a field missing or of the wrong type (named).
    """
    try:
        report = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{source}: cannot read it ({err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err})") from err
    if not isinstance(report, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(report).__name__}")
    for name, kind in REPORT_FIELDS.items():
        if name not in report:
            raise ValueError(f"{source}: the field {name!r} is missing; summary.json comes from a run of "
                             "run_all.py")
        if not isinstance(report[name], kind) or (kind is not bool and isinstance(report[name], bool)):
            raise ValueError(f"{source}: the field {name!r} has the wrong type ({type(report[name]).__name__})")
    for name in ("ours", "rechub", "deepctr"):
        if not isinstance(report["frameworks"].get(name), dict):
            raise ValueError(f"{source}: the field 'frameworks' lacks the framework {name!r}")
    if not isinstance(report["data"].get("source"), str):
        raise ValueError(f"{source}: the field 'data' lacks its 'source'")
    unknown = sorted(set(report["sections"]) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown} under 'sections'")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before anything is measured (usage errors exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps and small logs: a smoke test of a few minutes")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results for a full run of every section; "
                             "with --quick or --only, a folder under the system's temporary directory; "
                             "with --render, DIR itself)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--render", type=Path, metavar="DIR",
                        help="measure nothing: write the tables and plots again from DIR/summary.json, "
                             "into DIR (or --out)")
    args = parser.parse_args(argv)
    if args.render is not None:
        if args.quick or args.only is not None:
            parser.error("--render measures nothing: --quick and --only do not apply to it")
        source = args.render / "summary.json"
        if not source.is_file():
            parser.error(f"{source} does not exist")
        args.out = args.out or args.render
        args.wanted = []
    else:
        text = ",".join(SECTIONS) if args.only is None else args.only
        args.wanted = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
        if not args.wanted:
            parser.error(f"--only {args.only!r} selects no section; choose from {', '.join(SECTIONS)}")
        unknown = sorted(set(args.wanted) - set(SECTIONS))
        if unknown:
            parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
        partial = args.quick or set(args.wanted) != set(SECTIONS)
        args.out = args.out or (Path(tempfile.gettempdir()) / "dien_bench_partial" if partial else DEFAULT_OUT)
    problem = out_problem(args.out)
    if problem:
        parser.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        source = args.render / "summary.json"
        try:
            report = load_report(source)
        except ValueError as err:
            print(f"error: {err}; nothing was written", file=sys.stderr)
            return 2
        try:
            files = render_outputs(report, report["settings"])
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
            print(f"error: {source}: cannot render the tables, a field is missing or malformed "
                  f"({type(err).__name__}: {err}); nothing was written", file=sys.stderr)
            return 2
        write_files(report, files, args.out)
        return 0
    wanted, out = args.wanted, args.out
    plan = QUICK if args.quick else FULL

    wall = time.perf_counter()
    report: dict = {
        "benchmark": "DIEN performance: training, inference, ONNX, history length, threads, sample building",
        "command": "benchmarks/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "sections_run": wanted,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()),
        "machine": machine_info(), "settings": plan, "sections": {}, "errors": {},
    }
    m = report["machine"]
    say(f"{report['date_utc']}  {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; "
        f"load {report['load_average_start'][0]:.2f}; {'quick' if args.quick else 'full'} run -> {out}")

    toys = toys_available()
    if toys:
        data = {"source": "toys", "short": "Toys",
                "description": "Amazon Toys & Games 5-core (real), samples of build_samples(max_len=50, seed=0)"}
    else:
        data = {"source": "sim", "short": "simulated data",
                "description": "NOT the Amazon data (missing): the simulator's default data set, "
                               "simulate(SimulationConfig.default())"}
        say("!! The Amazon Toys 5-core files were not found (set DIEN_DATA_DIR, or put them in "
            "../shared/data/amazon_toys_5core). Training, history and thread benchmarks run on the "
            "simulator's default data set instead, and the log-size sweep uses simulated logs only. "
            "These numbers are not the book's.")
    report["data"] = data

    if not BENCH_PYTHON.exists():
        say(f"!! {BENCH_PYTHON.relative_to(ROOT)} is missing (run `bash benchmarks/setup_bench_env.sh`): "
            "torch-rechub and DeepCTR-Torch are skipped.")

    frameworks: dict = {}
    with tempfile.TemporaryDirectory(prefix="run_all_") as tmp:
        workdir = Path(tmp)
        worker_sections = [s for s in wanted if s != "samples"]
        if worker_sections:
            say("building the benchmark samples ...")
            log, samples = bf.ours_samples(data["source"], bf.MAX_LEN)
            data.update({"log": log.stats(), **{k: v for k, v in samples.stats().items()
                                                  if k in ("train_samples", "test_samples", "item_vocab",
                                                           "cate_vocab", "train_history_length_quantiles")}})
            npz = workdir / "samples.npz"
            write_arrays(samples, npz)
            del log, samples
            only_ours = not any(s in ("training", "din", "history") for s in worker_sections)
            workers, missing = start_workers(npz, data["source"], workdir, only_ours)
        else:
            workers, missing = {}, {k: "not needed by the sections asked for" for k in KINDS}
        for kind in KINDS:
            frameworks[kind] = ({"available": True, "info": workers[kind].info} if kind in workers
                                else {"available": False, "reason": missing.get(kind, "not started")})
        report["frameworks"] = frameworks

        steps = [("training", lambda: run_training(workers, plan)),
                 ("din", lambda: run_din_fresh(workers, plan, npz, data["source"], workdir)),
                 ("onnx", lambda: run_onnx(workers, plan, workdir)),
                 ("history", lambda: run_history(workers, plan, data["source"])),
                 ("threads", lambda: run_threads(workers, plan)),
                 ("samples", lambda: run_samples(plan, toys, workdir))]
        try:
            for name, run in steps:
                if name not in wanted:
                    continue
                if name == "samples":  # fresh processes only: the workers can go
                    for w in workers.values():
                        w.close()
                if name != "samples" and "ours" not in workers:
                    report["errors"][name] = "our worker did not start: " + frameworks["ours"].get("reason", "")
                    continue
                say(f"== {name} ({(time.perf_counter() - wall) / 60:.1f} min so far)")
                try:
                    report["sections"][name] = run()
                except Exception:  # recorded; the other sections still run
                    report["errors"][name] = traceback.format_exc()[-3000:]
                    say(f"!! section {name} failed:\n{report['errors'][name]}")
        finally:
            for w in workers.values():
                w.close()

    report["load_average_end"] = list(os.getloadavg())
    report["wall_seconds"] = time.perf_counter() - wall
    write_outputs(report, plan, out)
    return 0


def write_outputs(report: dict, plan: dict, out: Path) -> None:
    """summary.json, summary.md, machine.md and the figures of a run that measured.

    If the tables cannot be made, summary.json (the measurements) is still
    written before the error propagates.
    """
    try:
        files = render_outputs(report, plan)
    except Exception:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        raise
    write_files(report, files, out)


def _png(draw) -> bytes:
    """What ``draw(file)`` saves, as PNG bytes."""
    buffer = io.BytesIO()
    draw(buffer)
    return buffer.getvalue()


def render_outputs(report: dict, plan: dict) -> dict[str, bytes]:
    """Every output file, in memory: ``{path relative to the output folder: bytes}``.

    Nothing is written, so a report that cannot be rendered leaves the
    folder as it was. summary.json comes last, after any plot failure has
    been recorded in ``report["errors"]``.
    """
    sec, data, quick = report["sections"], report["data"], report["quick"]
    blocks = []
    makers = {
        "training": (lambda s: table_training(s, plan, report["frameworks"], data),
                     lambda s, p: plot_training(s, p, quick, data)),
        "din": (lambda s: table_din(s, plan, data), lambda s, p: plot_din(s, p, quick)),
        "onnx": (lambda s: table_onnx(s, plan), lambda s, p: plot_onnx(s, p, quick)),
        "history": (lambda s: table_history(s, plan, data), lambda s, p: plot_history(s, p, quick, data)),
        "threads": (lambda s: table_threads(s, plan), lambda s, p: plot_threads(s, p, quick)),
        "samples": (lambda s: table_samples(s, plan), lambda s, p: plot_samples(s, p, quick)),
    }
    figures: dict[str, bytes] = {}
    for name in SECTIONS:
        table, plot = makers[name]
        figure = f"figures/{name}.png"
        if name in sec:
            lines = table(sec[name])
            try:
                figures[figure] = _png(lambda f: plot(sec[name], f))
            except Exception:
                report["errors"][f"{name}_plot"] = traceback.format_exc()[-2000:]
                figures[figure] = _png(lambda f: plot_missing(f"{name}: the plot failed (see summary.json)", f))
        elif name in report["errors"]:
            last_line = (str(report["errors"][name]).strip().splitlines() or ["no message"])[-1]
            lines = [f"Not measured: the section failed ({_plain(last_line)})."]
            figures[figure] = _png(lambda f: plot_missing(f"{name}: not measured, the section failed "
                                                          "(see summary.json)", f))
        else:
            lines = ["Not measured in this run."]
            figures[figure] = _png(lambda f: plot_missing(f"{name}: not measured in this run", f))
        if quick:
            lines += ["", "*Quick run: a smoke test, not numbers to read.*"]
        blocks.append(_block(name, lines))
    machine = machine_paragraph(report)
    return {"summary.md": "\n".join(blocks).encode(), "machine.md": machine.encode(), **figures,
            "summary.json": (json.dumps(report, indent=2, default=str) + "\n").encode()}


def write_files(report: dict, files: dict[str, bytes], out: Path) -> None:
    """Write what :func:`render_outputs` made into ``out``, and print the tables."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in files.items():
        (out / name).write_bytes(content)
        written.append(out / name)
    say("")
    say(files["summary.md"].decode())
    say(files["machine.md"].decode())
    if report["errors"]:
        say(f"!! errors in: {', '.join(report['errors'])} (details in summary.json)")
    say("wrote " + ", ".join(str(p) for p in written) + f" ({report['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    sys.exit(main())
