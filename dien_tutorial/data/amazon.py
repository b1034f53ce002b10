"""Loaders for the Amazon review data and the plain CSV format.

Every loader here reads one on-disk format, turns it into the canonical
behaviour log of :mod:`dien_tutorial.data.log` (columns ``user``, ``item``,
``category``, ``time``, ``order``) and ends by calling
:func:`~dien_tutorial.data.log.validate_log`, so what comes back is always
checked, de-duplicated and sorted. Anything removed on the way is counted in
the :class:`~dien_tutorial.data.log.LoadReport` and announced with
:func:`warnings.warn`; anything malformed raises
:class:`~dien_tutorial.data.log.DataFormatError` naming the file and, where
there is one, the line and column.

The formats
-----------

**McAuley Amazon 2014** (:func:`load_amazon_raw`), the files the DIN and DIEN
papers start from, published by the UCSD McAuley lab:

- ``reviews_<Category>_5.json`` (or ``.json.gz``): JSON lines, one review per
  line. Only three fields are used: ``reviewerID`` becomes ``user``,
  ``asin`` becomes ``item`` (both strings) and ``unixReviewTime`` (int,
  seconds) becomes ``time``. ``order`` is the 1-based line number, which
  breaks ties between reviews of one day (the timestamps are day-level).
- ``meta_<Category>.json`` (or ``.json.gz``): one product per line, written
  with Python's ``repr``, so single quotes, not JSON. Its ``categories``
  field is a list of category paths, each a list from general to specific,
  for example ``[['Toys & Games', 'Puzzles', 'Jigsaw Puzzles']]``. As in the
  DIN/DIEN preprocessing, the item's category is ``categories[-1][-1]``: the
  last element of the last path, the most specific label
  (``'Jigsaw Puzzles'`` above). That label must be a string: any other
  value (``None``, a number, a list) is an error naming the line. A label
  that is empty or blank, like an empty ``categories`` list, means the
  product has no category: its reviews are dropped and counted. Each line
  is parsed with :mod:`ast` and checked to contain literals only before
  :func:`ast.literal_eval` builds it; nothing from the file is ever
  executed.

**Toys & Games 5-core CSVs** (:func:`load_toys_5core`): the same Toys data
after upstream re-mapping to integer ids, as three files:

- ``train_set_Toys_CTR.csv`` and ``test_set_Toys_CTR.csv`` with header
  ``user_id,item_id,class,reviewTime,overall``. ``class`` (an integer,
  1..24) is the category, ``reviewTime`` a ``YYYY-MM-DD`` date. ``overall``
  is derived from the star rating, not a click label, and is ignored; so is
  the upstream split, which is random per row rather than by time.
- ``Toys.txt``: one line per user, ``user_id item_1 item_2 ...`` in
  chronological order; the position of an item on its user's line is the
  ``order`` that ranks reviews of the same day. Tokens are integers
  separated by spaces or tabs. Lines end in ``\\n`` or ``\\r\\n`` (the
  published file uses ``\\r\\n``); no other character ends a line, so a
  stray ``\\r`` or U+2028 inside a line is part of a token, an error.

Each may also be gzip-compressed (``.gz`` appended to the name).

**Rechub CSV** (:func:`load_rechub_csv`): header
``user_id,item_id,time,cate_id`` with ``time`` in unix seconds, the format of
torch-rechub's DIN/DIEN examples. ``order`` is the row number. An id column
is read as integers only when every value is a canonical integer (ASCII
digits, no plus sign, no leading zero, no ``-0``, at most 18 digits);
otherwise it is kept as strings, so two spellings are never one id.

Wherever a number is read from text, only the ASCII digits 0-9 count as
digits: a ``time``, an integer id of the Toys files or a date written with
another script's digits (``'３００'``) is an error naming the line.

In every CSV a row must have as many fields as the header, and the header
must name each column once. A damaged or truncated compressed file, in any
format, is an error naming the file, never a partial log.

:func:`load_source` picks a loader by name, for the command line.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import json
import lzma
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from dien_tutorial.data.log import BehaviourLog, DataFormatError, LoadReport, validate_log

SOURCES = ("toys", "csv", "amazon-raw")
"""Names accepted by :func:`load_source`."""

RECHUB_COLUMNS = ("user_id", "item_id", "time", "cate_id")
TOYS_COLUMNS = ("user_id", "item_id", "class", "reviewTime")
TOYS_FILES = ("train_set_Toys_CTR.csv", "test_set_Toys_CTR.csv", "Toys.txt")

MIN_USEFUL_INTERACTIONS = 1_000
"""Below this many interactions a log can only check a format, not teach."""

# Node types a meta line may contain. Everything ast.literal_eval accepts
# except BinOp (complex numbers), which the meta files never use: fewer
# node types, fewer surprises. Load is the context tag on the containers.
_LITERAL_NODES = (
    ast.Expression,
    ast.Constant,
    ast.Dict,
    ast.List,
    ast.Tuple,
    ast.Set,
    ast.UnaryOp,
    ast.UAdd,
    ast.USub,
    ast.Load,
)

# The one spelling an integer id may have to be read as an int64: ASCII
# digits only (re's \d also matches other scripts' digits, so it is never
# used here), no plus sign, no leading zeros and no "-0", each of which
# would merge two spellings into one id. At most 18 digits, so every such
# id fits in int64 without checking.
_CANONICAL_INT = r"(?:0|-?[1-9][0-9]{0,17})"

# An integer as the integer-only columns may write it: an optional sign and
# ASCII digits (see above for why not \d).
_ANY_INT = r"[+-]?[0-9]+"

# A token of Toys.txt: short enough to fit in int64 without checking.
_SEQUENCE_ID = r"[+-]?[0-9]{1,18}"

# A reviewTime date; pandas alone would accept other scripts' digits in the year.
_DATE = r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"

_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)

# What each compressed suffix is called in an error message (pandas infers
# the compression of a CSV from the same suffixes).
_COMPRESSION_NAMES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zip": "zip", ".zst": "zstd"}

# The tokenizer's message for a row whose field count differs from the
# header's; parsed so the error can be phrased in this module's terms.
_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


# ---------------------------------------------------------------------------
# Small shared helpers
# ---------------------------------------------------------------------------


def default_data_dir() -> Path | None:
    """Where the shared data sets live, or ``None`` if there are none.

    The environment variable ``DIEN_DATA_DIR`` wins when set. Otherwise the
    folder is ``shared/data`` next to the repository checkout (the layout
    used while developing the book). A folder that does not exist gives
    ``None`` rather than a path that would fail later with a vaguer error.

    Returns:
        The data folder, or ``None``.
    """
    env = os.environ.get("DIEN_DATA_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        # amazon.py -> data -> dien_tutorial -> repository; its parent holds shared/.
        path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return path if path.is_dir() else None


def _open_binary(path: Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, decompressing when it ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for every non-blank line of ``path``.

    Lines are read as bytes and decoded one at a time, so a bad encoding is
    reported with its line; damaged archives are reported by :func:`_reading`.
    """
    _require_file(path)
    with _reading(path), _open_binary(path) as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{path}:{lineno}: not UTF-8 ({err.reason})") from None


def _require_file(path: Path) -> None:
    """Fail early, naming ``path``, when it is a folder or does not exist.

    Python's own errors would say ``[Errno 21] Is a directory`` from deep
    inside pandas or gzip; this says what was expected instead.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        FileNotFoundError: nothing is at ``path``.
    """
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the errors of a damaged compressed file into a :class:`DataFormatError`.

    A truncated gzip raises :class:`EOFError`, a bad header or checksum
    :class:`gzip.BadGzipFile` (an :class:`OSError`), a damaged deflate
    stream :class:`zlib.error`; bzip2 raises a bare :class:`OSError`, xz
    :class:`lzma.LZMAError`, zip :class:`zipfile.BadZipFile`. None of them
    names the file, and all of them can come from the middle of a read,
    so the whole read is wrapped.

    Raises:
        DataFormatError: ``"<file>: corrupt or truncated gzip (...)"``.
        OSError: a file-system error (it already names the file), or a
            read error of an uncompressed file, prefixed with its name.
    """
    kind = _COMPRESSION_NAMES.get(path.suffix.lower())
    try:
        yield
    except (EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile) as err:
        raise _corrupt(path, kind, err) from None
    except OSError as err:
        if err.filename is not None:
            raise  # permissions and the like: the message names the file
        if kind is None:
            raise OSError(f"{path}: could not be read ({err})") from err
        raise _corrupt(path, kind, err) from None


def _corrupt(path: Path, kind: str | None, err: BaseException) -> DataFormatError:
    """The error for a compressed file that does not decompress."""
    detail = str(err) or type(err).__name__
    return DataFormatError(f"{path}: corrupt or truncated {kind or 'compressed file'} ({detail})")


def _find_file(folder: Path, name: str) -> Path:
    """``folder/name`` or ``folder/name.gz``, whichever exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
        if candidate.is_dir():
            raise IsADirectoryError(f"{candidate}: is a folder, not a file")
    raise FileNotFoundError(f"{folder}: neither {name} nor {name}.gz is there")


def _first_bad(mask: pd.Series | np.ndarray) -> int:
    """Position of the first ``True`` in ``mask``."""
    return int(np.flatnonzero(np.asarray(mask))[0])


def _read_text_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV as text columns and check the header.

    Everything is read as ``str`` so that this module, not pandas' guessing,
    decides what counts as an integer, and so that a bad cell can be
    reported with its line number. Blank lines are kept (as rows of empty
    cells, reported as errors) so that row ``i`` is line ``i + 2``: the
    header is line 1. That holds because these formats never quote newlines.

    The header is read as an ordinary row (``header=None``) rather than by
    pandas, for two reasons. Given a header, pandas silently turns the
    first field of every row into the index when each row has one field
    more than the header, shifting every column by one; read as a row, the
    header fixes the field count and any longer row is an error. And pandas
    renames a repeated column (``time``, ``time.1``), which would hide that
    the file has two columns claiming one name.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: the file is empty, is a damaged compressed file,
            has a row with more fields than the header, names a column
            twice, has no data rows, lacks a required column, or has an
            empty cell in one.
    """
    _require_file(path)
    with _reading(path):
        try:
            cells = pd.read_csv(
                path,
                header=None,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                skip_blank_lines=False,
            )
        except pd.errors.EmptyDataError:
            raise DataFormatError(f"{path}: the file is empty") from None
        except pd.errors.ParserError as err:
            found = _FIELD_COUNT.search(str(err))
            if found is None:
                raise DataFormatError(f"{path}: not a readable CSV file ({err})") from None
            expected, line, saw = found.groups()
            raise DataFormatError(
                f"{path}: line {line} has {saw} fields, the header has {expected}"
            ) from None
        except ValueError as err:  # bad encoding, or a zip holding no or several files
            raise DataFormatError(f"{path}: not a readable CSV file ({err})") from None
    header = pd.Index(cells.iloc[0].astype(str))
    repeated = header[header.duplicated()].unique()
    if len(repeated):
        name = repeated[0]
        raise DataFormatError(
            f"{path}: the header names column {name!r} {int((header == name).sum())} times; "
            "each column must be named once"
        )
    frame = cells.iloc[1:].set_axis(header, axis=1).reset_index(drop=True)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {missing}; expected {','.join(required)}, "
            f"found {list(frame.columns)}"
        )
    if len(frame) == 0:
        raise DataFormatError(f"{path}: only a header, no data rows")
    for column in required:
        empty = frame[column].str.strip() == ""
        if empty.any():
            line = _first_bad(empty) + 2
            raise DataFormatError(f"{path}: column '{column}' is empty on line {line}")
    return frame


def _integer_column(text: pd.Series, path: Path, column: str) -> np.ndarray:
    """Parse a text column that must hold 64-bit integers.

    A value is an optional sign and the ASCII digits 0-9, with surrounding
    whitespace ignored; digits of other scripts (``'３００'``, ``'٣٠٠'``)
    are not integers here, although Python's ``int`` would read them.

    Raises:
        DataFormatError: naming the file, the column and the first bad line,
            for a value that is not an integer or does not fit in int64.
    """
    stripped = text.str.strip()
    ok = stripped.str.fullmatch(_ANY_INT).to_numpy(dtype=bool)
    if not ok.all():
        row = _first_bad(~ok)
        raise DataFormatError(
            f"{path}: column '{column}' must hold integers; "
            f"line {row + 2} has {text.iloc[row]!r}"
        )
    # Up to 18 significant digits always fit in int64; the few longer values
    # are checked exactly as Python ints (int64 holds some 19-digit numbers).
    digits = stripped.str.lstrip("+-").str.lstrip("0").str.len().to_numpy()
    for row in np.flatnonzero(digits >= 19):
        if not _INT64_MIN <= int(stripped.iloc[row]) <= _INT64_MAX:
            raise DataFormatError(
                f"{path}: column '{column}' is out of range on line {row + 2}: "
                f"{text.iloc[row]!r} does not fit in a 64-bit integer"
            )
    return stripped.astype(np.int64).to_numpy()


def _id_column(text: pd.Series) -> pd.Series:
    """Integer ids when every value is a plain integer, else the strings.

    ``"007"`` and ``"7"`` would both become 7 as integers, so would ``"-0"``
    and ``"0"``, and so would the fullwidth ``"７"`` and ``"7"``. Two
    different spellings must stay two different ids, so the column becomes
    ``int64`` only when every value (surrounding whitespace ignored) is
    spelled the one canonical way: an optional minus, ASCII digits 0-9
    without leading zeros, ``"0"`` but never ``"-0"``, at most 18 digits.
    One value spelled any other way (a plus sign, a leading zero, another
    script's digits, or simply a letter) keeps the whole column as strings.
    """
    stripped = text.str.strip()
    if stripped.str.fullmatch(_CANONICAL_INT).all():
        return stripped.astype(np.int64)
    return stripped.astype(str)


def _warn_too_small(log: BehaviourLog, source: str) -> None:
    """Say plainly when a log can only be a format check."""
    n = len(log.frame)
    if n < MIN_USEFUL_INTERACTIONS:
        message = (
            f"{source}: only {n:,} interactions. That is far too few to learn or "
            "evaluate anything; use this file to check the format only."
        )
        log.report.notes.append(message)
        warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------------
# McAuley Amazon 2014 files
# ---------------------------------------------------------------------------


def _read_reviews(path: Path) -> pd.DataFrame:
    """Parse a reviews JSON-lines file into user, item, time, order columns.

    Raises:
        DataFormatError: ``"<file>:<line>: ..."`` for a line that is not a
            JSON object (or nests too deeply to parse, or holds an integer
            of more digits than Python converts) or lacks a field, or whose
            time does not fit in 64 bits; ``"<file>: ..."`` for an empty or
            damaged compressed file.
    """
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    orders: list[int] = []
    for lineno, line in _text_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})"
            ) from None
        except RecursionError:
            # json's parser recurses once per [ or {; thousands of them
            # exhaust the stack long before the line ends.
            raise DataFormatError(
                f"{path}:{lineno}: malformed JSON (nested too deeply)"
            ) from None
        except ValueError as err:
            # Valid JSON that Python will not convert: an integer of more
            # than sys.get_int_max_str_digits() (4,300) digits.
            raise DataFormatError(f"{path}:{lineno}: unreadable JSON ({err})") from None
        if not isinstance(record, dict):
            raise DataFormatError(
                f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}"
            )
        for name in ("reviewerID", "asin"):
            value = record.get(name)
            if not isinstance(value, str) or not value:
                what = "missing" if name not in record else f"not a non-empty string: {value!r}"
                raise DataFormatError(f"{path}:{lineno}: field '{name}' is {what}")
        stamp = record.get("unixReviewTime")
        # bool is a subclass of int; a true/false timestamp is a mistake.
        if not isinstance(stamp, int) or isinstance(stamp, bool):
            what = "missing" if "unixReviewTime" not in record else f"not an integer: {stamp!r}"
            raise DataFormatError(f"{path}:{lineno}: field 'unixReviewTime' is {what}")
        if not _INT64_MIN <= stamp <= _INT64_MAX:
            raise DataFormatError(
                f"{path}:{lineno}: field 'unixReviewTime' is out of range: "
                f"{stamp} does not fit in a 64-bit integer"
            )
        users.append(record["reviewerID"])
        items.append(record["asin"])
        times.append(stamp)
        orders.append(lineno)
    if not users:
        raise DataFormatError(f"{path}: the file is empty (no reviews)")
    return pd.DataFrame(
        {
            "user": pd.Series(users, dtype=str),
            "item": pd.Series(items, dtype=str),
            "time": np.asarray(times, dtype=np.int64),
            "order": np.asarray(orders, dtype=np.int64),
        }
    )


def _parse_literal(line: str, path: Path, lineno: int) -> Any:
    """Build the Python literal on one meta line without running any code.

    :func:`ast.literal_eval` alone would already refuse calls, but checking
    the tree first gives an error that names the offending construct, and
    makes the guarantee visible in the code: only trees made of literal
    nodes ever reach the evaluator.

    Raises:
        DataFormatError: the line is not Python syntax or holds anything
            other than literals (a name, a call, an operator, ...).
    """
    try:
        tree = ast.parse(line.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError) as err:
        detail = getattr(err, "msg", None) or str(err) or type(err).__name__
        raise DataFormatError(f"{path}:{lineno}: not a Python literal ({detail})") from None
    for node in ast.walk(tree):
        if not isinstance(node, _LITERAL_NODES):
            column = getattr(node, "col_offset", -1) + 1
            raise DataFormatError(
                f"{path}:{lineno}: rejected, only literals are allowed but found "
                f"{type(node).__name__} at column {column}; nothing on this line was run"
            )
    try:
        return ast.literal_eval(tree)
    except (ValueError, TypeError, RecursionError) as err:
        raise DataFormatError(f"{path}:{lineno}: not a Python literal ({err})") from None


def _category_of(record: dict, path: Path, lineno: int) -> str | None:
    """The most specific category, ``categories[-1][-1]``, or ``None``.

    ``None`` (no category; the caller drops and counts the item's reviews)
    when ``categories`` is absent or empty, its last path is empty, or the
    label is an empty or blank string.

    Raises:
        DataFormatError: ``categories`` is not a list of lists, or the label
            is not a string (``str()`` would turn ``None`` into a category
            called ``'None'``).
    """
    paths = record.get("categories")
    if paths is None:
        return None
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in paths):
        raise DataFormatError(
            f"{path}:{lineno}: field 'categories' must be a list of lists, found {paths!r}"
        )
    if not paths or not paths[-1]:
        return None
    label = paths[-1][-1]
    if not isinstance(label, str):
        raise DataFormatError(
            f"{path}:{lineno}: field 'categories' must end in a string label, "
            f"found {label!r} ({type(label).__name__})"
        )
    return label.strip() or None


def _read_meta(path: Path, report: LoadReport) -> dict[str, str | None]:
    """Map each asin of a meta file to its category (``None`` if it has none).

    Raises:
        DataFormatError: ``"<file>:<line>: ..."`` for a line that is not a
            literal dict, lacks ``asin`` or has a malformed ``categories``;
            ``"<file>: ..."`` for an empty or damaged compressed file.
    """
    categories: dict[str, str | None] = {}
    repeated = 0
    for lineno, line in _text_lines(path):
        record = _parse_literal(line, path, lineno)
        if not isinstance(record, dict):
            raise DataFormatError(
                f"{path}:{lineno}: expected a dict, found {type(record).__name__}"
            )
        asin = record.get("asin")
        if not isinstance(asin, str) or not asin:
            what = "missing" if "asin" not in record else f"not a non-empty string: {asin!r}"
            raise DataFormatError(f"{path}:{lineno}: field 'asin' is {what}")
        if asin in categories:
            repeated += 1  # the first entry wins; counted below
            continue
        categories[asin] = _category_of(record, path, lineno)
    if not categories:
        raise DataFormatError(f"{path}: the file is empty (no products)")
    if repeated:
        message = f"{path}: {repeated:,} repeated asin line(s); the first entry of each was used"
        report.notes.append(message)
        warnings.warn(message, stacklevel=3)
    return categories


def load_amazon_raw(reviews_path: str | Path, meta_path: str | Path) -> BehaviourLog:
    """Load a McAuley Amazon 2014 reviews file with categories from its meta file.

    Reviews whose product has no meta line, or a meta line without
    categories, cannot be given a category: they are dropped, counted in the
    report and announced with a warning.

    Args:
        reviews_path: ``reviews_<Category>_5.json`` or ``.json.gz``.
        meta_path: ``meta_<Category>.json`` or ``.json.gz``.

    Returns:
        The validated log: ids are strings (reviewer ids and ASINs), the
        category is ``categories[-1][-1]`` of the meta line, ``order`` is the
        review's line number.

    Raises:
        DataFormatError: a malformed line (the message starts with
            ``file:line:``), a missing field, an empty file, or no review
            left once uncategorised products are removed.
    """
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    reviews = _read_reviews(reviews_path)
    report = LoadReport(source=str(reviews_path), rows_read=len(reviews))
    categories = _read_meta(meta_path, report)

    lookup = pd.Series(categories, dtype=object)
    in_meta = reviews["item"].isin(lookup.index).to_numpy()
    category = reviews["item"].map(lookup)
    has_category = category.notna().to_numpy()
    # validate_log's closing warning lists every reason in report.dropped,
    # so these drops are announced there, in one message with the others.
    report.drop(f"reviews of items absent from {meta_path.name}", int((~in_meta).sum()))
    report.drop(
        f"reviews of items without categories in {meta_path.name}",
        int((in_meta & ~has_category).sum()),
    )
    frame = reviews[has_category].assign(category=category[has_category].astype(str))
    if len(frame) == 0:
        raise DataFormatError(
            f"{reviews_path}: no review has a categorised item in {meta_path}; "
            "are the two files of the same category?"
        )
    return validate_log(frame.reset_index(drop=True), str(reviews_path), report)


# ---------------------------------------------------------------------------
# The user_id,item_id,time,cate_id CSV
# ---------------------------------------------------------------------------


def load_rechub_csv(path: str | Path) -> BehaviourLog:
    """Load a ``user_id,item_id,time,cate_id`` CSV (torch-rechub's format).

    An id column whose values are all canonical integers (ASCII digits, an
    optional minus, no leading zero, no ``-0``, at most 18 digits) becomes
    ``int64``; any other id column is kept as strings, so ``"-0"`` and
    ``"0"``, or ``"１"`` and ``"1"``, stay two ids. Other columns are
    ignored. A log under :data:`MIN_USEFUL_INTERACTIONS` rows loads, with a
    note and a warning that it can only check the format.

    Args:
        path: the CSV file (``.gz`` and other pandas compressions work).

    Returns:
        The validated log; ``order`` is the 0-based data row.

    Raises:
        DataFormatError: an empty file, missing columns (the message names
            the file, the missing and the found columns), an empty cell, or
            a ``time`` that is not an integer written with ASCII digits (the
            message names the column and the line, counting the header as
            line 1).
    """
    path = Path(path)
    text = _read_text_csv(path, RECHUB_COLUMNS)
    frame = pd.DataFrame(
        {
            "user": _id_column(text["user_id"]),
            "item": _id_column(text["item_id"]),
            "category": _id_column(text["cate_id"]),
            "time": _integer_column(text["time"], path, "time"),
            "order": np.arange(len(text), dtype=np.int64),
        }
    )
    report = LoadReport(source=str(path), rows_read=len(frame))
    log = validate_log(frame, str(path), report)
    _warn_too_small(log, str(path))
    return log


# ---------------------------------------------------------------------------
# Toys & Games 5-core
# ---------------------------------------------------------------------------


def _read_toys_csv(path: Path) -> pd.DataFrame:
    """One of the two ``*_Toys_CTR.csv`` files as a log frame without ``order``."""
    text = _read_text_csv(path, TOYS_COLUMNS)
    stripped = text["reviewTime"].str.strip()
    dates = pd.to_datetime(stripped, format="%Y-%m-%d", errors="coerce")
    bad = dates.isna() | ~stripped.str.fullmatch(_DATE)
    if bad.any():
        row = _first_bad(bad)
        raise DataFormatError(
            f"{path}: column 'reviewTime' must be a YYYY-MM-DD date; "
            f"line {row + 2} has {text['reviewTime'].iloc[row]!r}"
        )
    # Dates carry no zone; they are read as midnight UTC.
    seconds = dates.to_numpy().astype("datetime64[s]").astype(np.int64)
    return pd.DataFrame(
        {
            "user": _integer_column(text["user_id"], path, "user_id"),
            "item": _integer_column(text["item_id"], path, "item_id"),
            "category": _integer_column(text["class"], path, "class"),
            "time": seconds,
        }
    )


def _read_sequences(path: Path, report: LoadReport) -> pd.DataFrame:
    """``Toys.txt`` exploded into one ``(user, item, position)`` row per token.

    ``position`` counts from 0 along the user's line. If a user has several
    lines they are read as one sequence in file order. Lines are split on
    ``"\\n"`` alone, with the ``"\\r"`` of a CRLF ending removed, so the line
    numbers in errors are the ones an editor shows; tokens are split on
    spaces and tabs. Blank lines are skipped, and so is a line holding only
    a user id (a user with no items).

    Raises:
        DataFormatError: ``"<file>:<line>: ..."`` for text that is not UTF-8
            or a token that is not an integer of ASCII digits (the user id
            included, even when it stands alone on its line);
            ``"<file>: ..."`` for an empty or damaged compressed file.
    """
    _require_file(path)
    with _reading(path), _open_binary(path) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1  # the line holding the bad byte
        raise DataFormatError(f"{path}:{line}: not UTF-8 ({err.reason})") from None
    # Index i holds line i + 1. str.splitlines would also break at \r,
    # U+2028 and other separators, shifting every later line number.
    lines = pd.Series(text.split("\n"), dtype=str).str.removesuffix("\r").str.strip(" \t")
    lines = lines[lines != ""]
    if lines.empty:
        raise DataFormatError(f"{path}: the file is empty")
    tokens = lines.str.split(r"[ \t]+", regex=True)  # each a non-empty list of str
    # Checked per line, before the explode below drops lines without items.
    users = tokens.str[0]
    bad_user = ~users.str.fullmatch(_SEQUENCE_ID).to_numpy(dtype=bool)
    if bad_user.any():
        row = _first_bad(bad_user)
        raise DataFormatError(
            f"{path}:{users.index[row] + 1}: user ids must be integers, found {users.iloc[row]!r}"
        )
    # explode keeps the line's index, so a bad token can be traced to its line.
    pairs = pd.DataFrame({"user": users, "item": tokens.str[1:]}).explode("item")
    pairs = pairs.dropna(subset=["item"])  # lines holding a user id alone
    bad_item = ~pairs["item"].str.fullmatch(_SEQUENCE_ID).to_numpy(dtype=bool)
    if bad_item.any():
        row = _first_bad(bad_item)
        raise DataFormatError(
            f"{path}:{pairs.index[row] + 1}: item ids must be integers, "
            f"found {pairs['item'].iloc[row]!r}"
        )
    pairs = pairs.astype({"user": np.int64, "item": np.int64}).reset_index(drop=True)
    pairs["position"] = pairs.groupby("user", sort=False).cumcount().astype(np.int64)
    repeated = pairs.duplicated(["user", "item"])
    if repeated.any():
        report.notes.append(
            f"{path}: {int(repeated.sum()):,} item(s) appear twice on a user's line; "
            "the first position was used"
        )
        pairs = pairs[~repeated.to_numpy()]
    return pairs


def load_toys_5core(folder: str | Path) -> BehaviourLog:
    """Load the Amazon Toys & Games 5-core CSVs as one log.

    The train and test files are joined (their split is random per row, not
    by time, so the sample builder re-splits). ``order`` is the item's
    position on its user's ``Toys.txt`` line; rows missing from ``Toys.txt``
    are kept, counted and warned about, and ordered after every known row.
    Where ``Toys.txt`` puts a later date before an earlier one, the dates
    win (the sort is by time first) and the contradictions are counted in
    ``report.notes``.

    Args:
        folder: holds ``train_set_Toys_CTR.csv``, ``test_set_Toys_CTR.csv``
            and ``Toys.txt``, each plain or with ``.gz`` appended.

    Returns:
        The validated log with integer ids; the full data set has 19,412
        users, 11,924 items, 24 categories and 167,597 interactions.

    Raises:
        FileNotFoundError: one of the three files is absent.
        NotADirectoryError: ``folder`` is a file.
        IsADirectoryError: one of the three names is a folder.
        DataFormatError: a file does not follow the format above.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"{folder}: not a folder; expected the folder holding {', '.join(TOYS_FILES)}"
        )
    train_path, test_path, seq_path = (_find_file(folder, name) for name in TOYS_FILES)
    frame = pd.concat([_read_toys_csv(train_path), _read_toys_csv(test_path)], ignore_index=True)
    report = LoadReport(source=str(folder), rows_read=len(frame))
    sequences = _read_sequences(seq_path, report)

    frame = frame.merge(sequences, on=["user", "item"], how="left", validate="many_to_one")
    position = frame.pop("position").to_numpy(dtype=float, na_value=np.nan)
    unknown = np.isnan(position)
    known_end = int(sequences["position"].max()) + 1 if len(sequences) else 0
    # Unknown rows go after every known position, in file order among themselves.
    after_known = known_end + np.cumsum(unknown) - 1
    frame["order"] = np.where(unknown, after_known, position).astype(np.int64)
    if unknown.any():
        message = (
            f"{folder}: {int(unknown.sum()):,} row(s) have no position in {seq_path.name}; "
            "kept, ordered after the known rows of the same day"
        )
        report.notes.append(message)
        warnings.warn(message, stacklevel=2)

    # Count places where the sequence file and the dates disagree: along a
    # user's line (by order), the date should never go backwards.
    by_order = frame.sort_values(["user", "order"], kind="stable")
    same_user = by_order["user"].to_numpy()[1:] == by_order["user"].to_numpy()[:-1]
    backwards = same_user & (np.diff(by_order["time"].to_numpy()) < 0)
    if backwards.any():
        users = by_order["user"].to_numpy()[1:][backwards]
        message = (
            f"{seq_path}: {int(backwards.sum()):,} step(s) in {len(np.unique(users)):,} "
            "user(s) go back in time; the dates were kept and decide the order"
        )
        report.notes.append(message)
        warnings.warn(message, stacklevel=2)

    return validate_log(frame, str(folder), report)


# ---------------------------------------------------------------------------
# Choosing a loader by name
# ---------------------------------------------------------------------------


def _single_match(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    """The one file in ``folder`` matching any of ``patterns``."""
    matches = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if not matches:
        raise FileNotFoundError(f"{folder}: no {what} file ({' or '.join(patterns)})")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DataFormatError(f"{folder}: expected one {what} file, found {len(matches)}: {names}")
    return matches[0]


def load_source(source: str, path: str | Path | None = None, **kw: Any) -> BehaviourLog:
    """Load a behaviour log by source name (the command line's ``--source``).

    Args:
        source: one of :data:`SOURCES`:

            - ``"toys"``: :func:`load_toys_5core`; ``path`` is the folder and
              defaults to ``default_data_dir() / "amazon_toys_5core"``.
            - ``"csv"``: :func:`load_rechub_csv`; ``path`` is the file.
            - ``"amazon-raw"``: :func:`load_amazon_raw`; ``path`` is a folder
              holding exactly one ``reviews_*_5.json(.gz)`` and one
              ``meta_*.json(.gz)``.
        path: file or folder, as above.
        **kw: passed on to the loader.

    Returns:
        The validated log.

    Raises:
        ValueError: an unknown source, or no ``path`` where one is needed.
        FileNotFoundError: the data is not where ``path`` says.
    """
    if source == "toys":
        if path is None:
            data_dir = default_data_dir()
            folder = data_dir / "amazon_toys_5core" if data_dir else None
            if folder is None or not folder.is_dir():
                raise FileNotFoundError(
                    "the Toys & Games 5-core data was not found"
                    + (f" in {data_dir}" if data_dir else "")
                    + ". Pass the folder holding train_set_Toys_CTR.csv(.gz), "
                    "test_set_Toys_CTR.csv(.gz) and Toys.txt(.gz) with --path, or set "
                    "DIEN_DATA_DIR to the folder that contains amazon_toys_5core/."
                )
            path = folder
        return load_toys_5core(path, **kw)
    if source == "csv":
        if path is None:
            raise ValueError("source 'csv' needs a path: the user_id,item_id,time,cate_id file")
        return load_rechub_csv(path, **kw)
    if source == "amazon-raw":
        if path is None:
            raise ValueError(
                "source 'amazon-raw' needs a path: the folder with reviews_<Category>_5.json(.gz) "
                "and meta_<Category>.json(.gz)"
            )
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder")
        reviews = _single_match(folder, ("reviews_*_5.json", "reviews_*_5.json.gz"), "reviews")
        meta = _single_match(folder, ("meta_*.json", "meta_*.json.gz"), "meta")
        return load_amazon_raw(reviews, meta, **kw)
    raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
