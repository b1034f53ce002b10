"""Command line: python -m dien_tutorial <command>.

Commands:
    data     load a behaviour log, build DIEN samples, print their statistics.
    train    train one model and write DIR/metrics.json and DIR/model.pt.
    compare  train DIEN and its three baselines on one split, several seeds.
    export   export a checkpoint to ONNX and check it against PyTorch.
    assignments  write the student edition of the notebooks, or grade notebooks with the released checks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from typing import Sequence

SOURCES = ("simulated", "toys", "csv", "amazon-raw")


def load_log(source: str, path: str | None = None, seed: int = 0):
    """Load a behaviour log by source name (the CLI's ``--source``).

    ``simulated`` is the embedded default and needs no files; the other
    sources read files from ``path`` (see :func:`dien_tutorial.data.amazon.load_source`).
    """
    if source == "simulated":
        from dien_tutorial.data.simulate import SimulationConfig, simulate

        if path is not None:
            raise ValueError("--path is not used with --source simulated")
        return simulate(SimulationConfig(seed=seed)).log
    from dien_tutorial.data.amazon import load_source

    return load_source(source, path)


def _cmd_data(args: argparse.Namespace) -> int:
    from dien_tutorial.data.samples import build_samples

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = load_log(args.source, args.path, seed=args.seed)
        samples = build_samples(log, max_len=args.max_len, seed=args.seed)
    stats = {"source": log.report.source, **log.stats(), "rows_read": log.report.rows_read}
    stats["dropped"] = log.report.dropped
    stats["notes"] = log.report.notes
    lengths = log.frame.groupby("user", sort=False).size()
    stats["behaviours_per_user"] = {
        f"p{q}": float(lengths.quantile(q / 100)) for q in (0, 25, 50, 75, 90, 99, 100)
    }
    stats.update(samples.stats())
    stats["warnings"] = [str(w.message) for w in caught]
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v:g}"
                              for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = "; ".join(value) or "-"
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    return 0


PRESETS = ("tiny", "paper")


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (a bad value is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1 or more), got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (``inf``, ``nan``, 0 and below are usage errors, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def model_names(text: str) -> list[str]:
    """An argparse ``type``: comma-separated distinct model names, all checked before any training."""
    from dien_tutorial.model import MODEL_NAMES

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no model; choose from {','.join(MODEL_NAMES)}")
    unknown = [name for name in names if name not in MODEL_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model {unknown[0]!r} in {text!r}; choose from "
                                         f"{','.join(MODEL_NAMES)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"model {repeated[0]!r} is named twice in {text!r}")
    return names


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=SOURCES, default="simulated",
                   help="where the behaviour log comes from (default: simulated)")
    p.add_argument("--path", default=None,
                   help="file or folder of the source (toys: defaults to the shared data folder)")
    p.add_argument("--max-len", type=int, default=50, help="history length (default 50)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="model widths: tiny (tests) or paper (embedding 18, hidden 36, MLP 200-80)")
    p.add_argument("--epochs", type=int, default=5, help="maximum epochs (early stopping on valid AUC)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam's learning rate (default 0.001)")
    p.add_argument("--patience", type=int, default=1,
                   help="epochs without a better valid AUC before stopping")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the simulator and the negative sampling (the split)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads (default 1, chosen from measurements: a second thread "
                        "helps only large batches on an idle machine and slows every step down many "
                        "times when another process is busy; see the book's Performance chapter)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _prepare(args: argparse.Namespace):
    """Log -> samples, shared by train and compare."""
    from dien_tutorial.data.samples import build_samples

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    log = load_log(args.source, args.path, seed=args.data_seed)
    return build_samples(log, max_len=args.max_len, seed=args.data_seed)


def run_record(args: argparse.Namespace, samples, model_name: str, seed: int, model, tcfg,
               history, test: dict, wall: float) -> dict:
    """The content of ``metrics.json`` for one trained model (also used by ``distributed``)."""
    import torch

    return {
        "model": model_name,
        "source": args.source,
        "test_auc": test["auc"],
        "test_gauc": test["gauc"],
        "test_logloss": test["logloss"],
        "test_samples": test["samples"],
        "train_samples_per_s": history.train_samples_per_s,
        "epochs_run": len(history.epochs),
        "best_epoch": history.best_epoch,
        "best_valid_auc": history.best_valid_auc,
        "stopped_early": history.stopped_early,
        "wall_seconds": wall,
        "seed": seed,
        "data_seed": args.data_seed,
        "threads": torch.get_num_threads(),
        "train_config": vars(tcfg),
        "model_config": model.config.to_dict(),
        "history": history.epochs,
        "data": {k: v for k, v in samples.stats().items() if not isinstance(v, dict)},
    }


def _train_one(args: argparse.Namespace, samples, model_name: str, seed: int,
               out_dir=None, log=print) -> dict:
    import time
    from pathlib import Path

    from dien_tutorial.config import DIENConfig
    from dien_tutorial.model import build_model
    from dien_tutorial.train import TrainConfig, TrainingDiverged, evaluate, fit, seed_everything

    preset = getattr(DIENConfig, args.preset)
    config = preset(n_items=len(samples.item_vocab), n_cates=len(samples.cate_vocab))
    seed_everything(seed)
    model = build_model(model_name, config)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       patience=args.patience, seed=seed, progress=not args.no_progress)
    ckpt = Path(out_dir) / "model.pt" if out_dir is not None else None
    t0 = time.perf_counter()
    try:
        history = fit(model, samples.dataset("train"), samples.dataset("valid"), tcfg,
                      checkpoint=ckpt, model_name=model_name, log=log)
    except TrainingDiverged as err:  # name the run and the flag to change
        raise TrainingDiverged(f"{model_name}, seed {seed}: {err}; on the command line, try "
                               f"--lr {args.lr / 10:g}") from err
    wall = time.perf_counter() - t0
    test = evaluate(model, samples.dataset("test"), tcfg.eval_batch_size)
    return run_record(args, samples, model_name, seed, model, tcfg, history, test, wall)


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = _prepare(args)
    result = _train_one(args, samples, args.model, args.seed, out_dir=out)
    from dien_tutorial.train import json_text

    (out / "metrics.json").write_text(json_text(result))
    print(f"{args.model}: test auc {_metric(result['test_auc'])}  gauc {_metric(result['test_gauc'])}  "
          f"logloss {_metric(result['test_logloss'])}  {result['train_samples_per_s']:,.0f} train samples/s")
    print(f"wrote {out / 'metrics.json'}, {out / 'model.pt'} (the best epoch) and {out / 'model.pt.last'} "
          "(the last epoch, for resuming)")
    return 0


def _metric(value: float) -> str:
    """A metric with 4 decimals, or ``n/a`` when it does not exist (GAUC without a user of both labels)."""
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def _cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np
    from pathlib import Path

    from dien_tutorial.model import MODEL_NAMES

    samples = _prepare(args)
    models = args.models or list(MODEL_NAMES)  # names checked by the parser, before any training
    seeds = list(range(args.seeds))
    rows = []
    for name in models:
        for seed in seeds:
            r = _train_one(args, samples, name, seed, log=None)
            print(f"  {name:12s} seed {seed}: test auc {_metric(r['test_auc'])}  "
                  f"gauc {_metric(r['test_gauc'])}  logloss {_metric(r['test_logloss'])}  "
                  f"{r['train_samples_per_s']:,.0f} samples/s  "
                  f"{r['epochs_run']} epochs  {r['wall_seconds']:.0f} s", flush=True)
            rows.append(r)
    keys = ("test_auc", "test_gauc", "test_logloss", "train_samples_per_s")
    print()
    print(f"{'model':12s} " + " ".join(f"{k:>20s}" for k in keys))
    table = {}
    for name in models:
        rs = [r for r in rows if r["model"] == name]
        cells = []
        table[name] = {}
        for k in keys:
            # A metric can be NaN for one run (GAUC when no user has both labels):
            # the mean is over the runs that have it, and "seeds" says how many.
            v = np.array([r[k] for r in rs], dtype=float)
            v = v[np.isfinite(v)]
            table[name][k] = {"mean": float(v.mean()) if len(v) else None,
                              "std": float(v.std(ddof=1)) if len(v) > 1 else None, "seeds": int(len(v))}
            fmt = "{:,.0f}" if k == "train_samples_per_s" else "{:.4f}"
            cell = fmt.format(table[name][k]["mean"]) if len(v) else "n/a"
            if len(v) > 1:
                cell += " ± " + fmt.format(table[name][k]["std"])
            cells.append(cell)
        print(f"{name:12s} " + " ".join(f"{c:>20s}" for c in cells))
    print(f"(mean ± standard deviation over seeds {seeds}; one split, data seed {args.data_seed})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from dien_tutorial.train import json_text

        (out / "compare.json").write_text(json_text({"table": table, "runs": rows}))
        print(f"wrote {out / 'compare.json'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dien_tutorial.export import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.out, max_len=args.max_len)
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dien_tutorial", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="load a log, build samples, print statistics")
    _add_data_args(data)
    data.add_argument("--seed", type=int, default=0, help="seed of simulation and sampling")
    data.add_argument("--json", action="store_true", help="print JSON instead of a table")
    data.set_defaults(func=_cmd_data)

    from dien_tutorial.model import MODEL_NAMES

    train = sub.add_parser("train", help="train one model")
    _add_train_args(train)
    train.add_argument("--model", choices=MODEL_NAMES, default="dien")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    train.add_argument("--out", required=True, help="folder for metrics.json and model.pt")
    train.set_defaults(func=_cmd_train)

    compare = sub.add_parser("compare", help="train DIEN and its baselines, several seeds")
    _add_train_args(compare)
    compare.add_argument("--models", type=model_names, default=None,
                         help=f"comma-separated subset of {','.join(MODEL_NAMES)}")
    compare.add_argument("--seeds", type=positive_int, default=3, help="number of seeds, 1 or more (default 3)")
    compare.add_argument("--out", default=None, help="folder for compare.json")
    compare.set_defaults(func=_cmd_compare, no_progress=True)

    export = sub.add_parser("export", help="export a checkpoint to ONNX and verify it")
    export.add_argument("--checkpoint", required=True, help="model.pt written by train")
    export.add_argument("--out", required=True, help="path of the .onnx file to write")
    export.add_argument("--max-len", type=int, default=50,
                        help="history length the model was trained with (parity is checked at 3, len and len+3)")
    export.set_defaults(func=_cmd_export)

    from dien_tutorial.assignments import add_subcommand

    add_subcommand(sub)  # assignments build / assignments check
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    import zlib

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, EOFError, OverflowError, RecursionError, zlib.error) as err:
        # ValueError covers DataFormatError. The loaders name the file in
        # their own errors; the others are a safety net, so that bad input
        # the loaders did not foresee still ends in one line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
