"""The canonical behaviour log that every loader produces.

A behaviour log is a :class:`pandas.DataFrame` with one row per click
(a review, in the Amazon data) and exactly these columns:

========== ======================= =========================================
column     dtype                   meaning
========== ======================= =========================================
user       int64 or str            raw user id as the source spells it
item       int64 or str            raw item id
category   int64 or str            raw category id of the item
time       int64                   unix seconds
order      int64                   tie-breaker: among rows of one user with
                                   equal ``time``, the smaller ``order``
                                   happened first
========== ======================= =========================================

:func:`validate_log` checks a frame against this schema, normalises dtypes,
drops exact duplicates and repeated (user, item) pairs (counting both in a
:class:`LoadReport`), and sorts rows by (user, time, order). Loaders call it
last, so every log downstream is already clean and sorted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

LOG_COLUMNS = ("user", "item", "category", "time", "order")
ID_COLUMNS = ("user", "item", "category")

_INT64_MAX = np.iinfo(np.int64).max

# Above 2**53 a float64 cannot hold every integer, so a float id there may
# already have been rounded to a neighbour's value: refuse it.
_FLOAT_EXACT = 2.0**53


class DataFormatError(ValueError):
    """Input data that does not follow the documented format.

    The message always names the source (file or frame) and, where it can,
    the line or field at fault.
    """


@dataclass
class LoadReport:
    """What a loader did to its input, so nothing disappears silently.

    Attributes:
        source: file or description the log came from.
        rows_read: rows in the input before any cleaning.
        dropped: reason -> number of rows removed for that reason.
        notes: free-form remarks (for example "100 rows is too few").
    """

    source: str
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, count: int) -> None:
        """Record ``count`` rows removed for ``reason`` (zero is ignored)."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(count)


@dataclass
class BehaviourLog:
    """A validated, sorted behaviour log and the report of how it was made."""

    frame: pd.DataFrame
    report: LoadReport

    def stats(self) -> dict[str, int]:
        """Counts of users, items, categories and interactions."""
        f = self.frame
        return {
            "users": int(f["user"].nunique()),
            "items": int(f["item"].nunique()),
            "categories": int(f["category"].nunique()),
            "interactions": int(len(f)),
        }


def _first_row(mask: np.ndarray) -> int:
    """Position of the first ``True`` in ``mask``."""
    return int(np.flatnonzero(mask)[0])


def _check_int64(col: pd.Series, name: str, source: str) -> None:
    """Refuse unsigned values that int64 cannot hold (the cast would wrap them).

    ``col`` must be of an integer dtype without nulls.

    Raises:
        DataFormatError: naming the source, the column and the row.
    """
    if pd.api.types.is_unsigned_integer_dtype(col.dtype):
        too_big = col.to_numpy(dtype=np.uint64) > np.uint64(_INT64_MAX)
        if too_big.any():
            row = _first_row(too_big)
            raise DataFormatError(
                f"{source}: column '{name}' holds {int(col.iloc[row])} at row {row}, "
                "which does not fit in a 64-bit signed integer"
            )


def _normalise_ids(col: pd.Series, name: str, source: str) -> pd.Series:
    """Integer ids stay int64; anything else becomes str. Nulls are errors."""
    if col.isna().any():
        row = int(np.flatnonzero(col.isna().to_numpy())[0])
        raise DataFormatError(f"{source}: column '{name}' is empty at row {row}")
    if pd.api.types.is_integer_dtype(col.dtype):
        _check_int64(col, name, source)
        return col.astype(np.int64)
    if pd.api.types.is_float_dtype(col.dtype):
        values = col.to_numpy(dtype=np.float64)
        # Checked before the cast, which would turn inf into an error without
        # a row and 1e19 into int64's minimum without any error at all.
        inexact = ~np.isfinite(values) | (np.abs(values) > _FLOAT_EXACT)
        if inexact.any():
            row = _first_row(inexact)
            raise DataFormatError(
                f"{source}: column '{name}' holds {values[row].item()!r} at row {row}; "
                "float ids must be finite and at most 2**53 in size to be exact integers"
            )
        if not np.all(values == np.round(values)):
            row = int(np.flatnonzero(values != np.round(values))[0])
            raise DataFormatError(
                f"{source}: column '{name}' holds a non-integer number "
                f"{values[row].item()!r} at row {row}"
            )
        return col.astype(np.int64)
    as_str = col.astype(str)
    if (as_str.str.len() == 0).any():
        row = int(np.flatnonzero((as_str.str.len() == 0).to_numpy())[0])
        raise DataFormatError(f"{source}: column '{name}' is an empty string at row {row}")
    return as_str


def validate_log(frame: pd.DataFrame, source: str, report: LoadReport | None = None) -> BehaviourLog:
    """Check, normalise, de-duplicate and sort a behaviour log.

    Args:
        frame: rows with at least the columns of :data:`LOG_COLUMNS`.
        source: name used in error messages (a file path, or a description).
        report: the loader's report to extend; a new one if omitted.

    Returns:
        A :class:`BehaviourLog` whose frame has exactly the canonical columns,
        sorted by (user, time, order), with a fresh RangeIndex.

    Raises:
        DataFormatError: a column is missing, empty, or of the wrong type,
            holds a value int64 cannot represent exactly (an unsigned value
            above its maximum, a float id that is not finite or above
            2**53), or one item is given two different categories. The
            message names the column and the row (its position in
            ``frame``).
    """
    report = report or LoadReport(source=source, rows_read=len(frame))
    missing = [c for c in LOG_COLUMNS if c not in frame.columns]
    if missing:
        raise DataFormatError(
            f"{source}: missing column(s) {missing}; found {list(frame.columns)}"
        )
    if len(frame) == 0:
        raise DataFormatError(f"{source}: the log has no rows")

    out = pd.DataFrame({c: _normalise_ids(frame[c], c, source) for c in ID_COLUMNS})
    for c in ("time", "order"):
        col = frame[c]
        if not pd.api.types.is_integer_dtype(col.dtype):
            raise DataFormatError(
                f"{source}: column '{c}' must hold integers, found dtype {col.dtype}"
            )
        # A nullable Int64 column can hold NA, which has no int64 value.
        missing = col.isna().to_numpy()
        if missing.any():
            raise DataFormatError(f"{source}: column '{c}' is empty at row {_first_row(missing)}")
        _check_int64(col, c, source)
        out[c] = col.to_numpy(dtype=np.int64)

    # One category per item: the sample builder looks categories up by item.
    per_item = out.groupby("item", sort=False)["category"].nunique()
    if (per_item > 1).any():
        bad = per_item[per_item > 1].index[0]
        bad = bad.item() if hasattr(bad, "item") else bad  # plain Python value for the message
        cats = sorted(map(str, out.loc[out["item"] == bad, "category"].unique()))
        raise DataFormatError(
            f"{source}: item {bad!r} has {len(cats)} categories {cats}; "
            "each item must have exactly one"
        )

    # Sort first so "keep the first" below means "keep the earliest".
    out = out.sort_values(["user", "time", "order"], kind="stable", ignore_index=True)

    exact = out.duplicated(["user", "item", "time"])
    report.drop("duplicate rows (same user, item, time)", int(exact.sum()))
    out = out[~exact.to_numpy()]
    # A repeated (user, item) at a later time would let a test target leak
    # into that user's training histories, so only the first click is kept.
    repeat = out.duplicated(["user", "item"])
    report.drop("repeated (user, item) pairs, later clicks", int(repeat.sum()))
    out = out[~repeat.to_numpy()].reset_index(drop=True)

    if report.dropped:
        summary = ", ".join(f"{n:,} {why}" for why, n in report.dropped.items())
        warnings.warn(f"{source}: dropped {summary}", stacklevel=2)
    return BehaviourLog(frame=out, report=report)
