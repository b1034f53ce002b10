"""Command line: ``python -m dien_tutorial <command>``.

Commands:
    data   load a behaviour log, build DIEN samples, print their statistics.
"""

from __future__ import annotations

import argparse
import json
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dien_tutorial", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="load a log, build samples, print statistics")
    data.add_argument("--source", choices=SOURCES, default="simulated",
                      help="where the behaviour log comes from (default: simulated)")
    data.add_argument("--path", default=None,
                      help="file or folder of the source (toys: defaults to the shared data folder)")
    data.add_argument("--max-len", type=int, default=50, help="history length (default 50)")
    data.add_argument("--seed", type=int, default=0, help="seed of simulation and sampling")
    data.add_argument("--json", action="store_true", help="print JSON instead of a table")
    data.set_defaults(func=_cmd_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
