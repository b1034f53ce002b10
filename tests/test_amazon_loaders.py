"""Tests of the Amazon and CSV loaders, on small files written per test.

The real-data tests at the end read ../shared/data (or ``DIEN_DATA_DIR``)
and are skipped, with the reason, when it is absent.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from dien_tutorial.data.amazon import (
    default_data_dir,
    load_amazon_raw,
    load_rechub_csv,
    load_source,
    load_toys_5core,
)
from dien_tutorial.data.log import DataFormatError

DUPLICATE = "duplicate rows (same user, item, time)"


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, gzip-compressed when the name ends in .gz."""
    data = text.encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def review(user: str, asin: str, t: int, **extra) -> str:
    """One JSON line of a McAuley reviews file."""
    return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": t, **extra})


def meta(asin: str, categories=None) -> str:
    """One meta line, written with repr like the real files (single quotes)."""
    record = {"asin": asin, "title": "A toy"}
    if categories is not None:
        record["categories"] = categories
    return repr(record)


@contextmanager
def no_warnings() -> Iterator[None]:
    """Turn any warning into an error: the block must load silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------
# McAuley raw files
# ---------------------------------------------------------------------------


@pytest.fixture
def raw_files(tmp_path: Path) -> tuple[Path, Path]:
    """A reviews/meta pair with ties, unsorted times and a category path."""
    reviews = [
        review("U1", "B01", 300, summary="later"),  # line 1
        review("U1", "B02", 100),  # line 2
        review("U2", "B02", 200),  # line 3, same time as line 4
        review("U2", "B01", 200),  # line 4
    ]
    metas = [
        meta("B01", [["Toys & Games", "Puzzles", "Jigsaw Puzzles"]]),
        # Several paths: the last path's last element is kept.
        meta("B02", [["Toys & Games", "Dolls"], ["Toys & Games", "Games", "Board Games"]]),
    ]
    r = write(tmp_path / "reviews_Toys_5.json", "\n".join(reviews) + "\n")
    m = write(tmp_path / "meta_Toys.json", "\n".join(metas) + "\n")
    return r, m


def test_raw_reads_fields_categories_and_sorts(raw_files):
    with no_warnings():
        log = load_amazon_raw(*raw_files)
    f = log.frame
    assert f["user"].tolist() == ["U1", "U1", "U2", "U2"]
    # U1 sorted by time (100 before 300); U2 tie at 200 broken by line number.
    assert f["item"].tolist() == ["B02", "B01", "B02", "B01"]
    assert f["time"].tolist() == [100, 300, 200, 200]
    assert f["order"].tolist() == [2, 1, 3, 4]
    assert f["category"].tolist() == ["Board Games", "Jigsaw Puzzles", "Board Games", "Jigsaw Puzzles"]
    assert log.report.rows_read == 4
    assert log.report.dropped == {}


@pytest.mark.parametrize("suffix", [".json.gz", ".json"])
def test_raw_gzip_and_plain_give_the_same_log(tmp_path, raw_files, suffix):
    r, m = raw_files
    r2 = write(tmp_path / f"reviews_Copy_5{suffix}", r.read_text())
    m2 = write(tmp_path / f"meta_Copy{suffix}", m.read_text())
    pd.testing.assert_frame_equal(load_amazon_raw(r2, m2).frame, load_amazon_raw(r, m).frame)


def test_raw_malformed_json_names_file_and_line(tmp_path, raw_files):
    _, m = raw_files
    r = write(tmp_path / "reviews_Bad_5.json", review("U1", "B01", 1) + "\n{'not': json}\n")
    with pytest.raises(DataFormatError, match=r"reviews_Bad_5\.json:2: malformed JSON"):
        load_amazon_raw(r, m)


def test_raw_missing_field_names_field_file_and_line(tmp_path, raw_files):
    _, m = raw_files
    lines = [review("U1", "B01", 1), json.dumps({"reviewerID": "U1", "unixReviewTime": 5}), ""]
    r = write(tmp_path / "reviews_Bad_5.json.gz", "\n".join(lines))
    with pytest.raises(DataFormatError, match=r"reviews_Bad_5\.json\.gz:2: field 'asin' is missing"):
        load_amazon_raw(r, m)


def test_raw_non_integer_time_is_rejected(tmp_path, raw_files):
    _, m = raw_files
    r = write(tmp_path / "reviews_Bad_5.json", review("U1", "B01", "yesterday") + "\n")
    with pytest.raises(DataFormatError, match=r"reviews_Bad_5\.json:1: field 'unixReviewTime' is not an integer"):
        load_amazon_raw(r, m)


def test_meta_function_call_is_rejected_and_never_run(tmp_path, raw_files):
    r, _ = raw_files
    marker = tmp_path / "was_executed"
    evil = f"{{'asin': __import__('pathlib').Path({str(marker)!r}).touch(), 'categories': [['x']]}}"
    m = write(tmp_path / "meta_Evil.json", meta("B01", [["a"]]) + "\n" + evil + "\n")
    with pytest.raises(DataFormatError, match=r"meta_Evil\.json:2: rejected, only literals .* found Call"):
        load_amazon_raw(r, m)
    assert not marker.exists()


@pytest.mark.parametrize(
    "line, found",
    [
        ("{'asin': 'B01', 'categories': [[x]]}", "Name"),
        ("{'asin': 'B01', 'price': 1 + 2}", "BinOp"),
        ("{'asin': 'B01', 'c': [i for i in 'ab']}", "ListComp"),
        ("{'asin': 'B01', 'f': lambda: 0}", "Lambda"),
    ],
)
def test_meta_other_code_is_rejected(tmp_path, raw_files, line, found):
    r, _ = raw_files
    m = write(tmp_path / "meta_Code.json", line + "\n")
    with pytest.raises(DataFormatError, match=rf"meta_Code\.json:1: rejected, .* found {found}"):
        load_amazon_raw(r, m)


def test_meta_that_is_json_not_python_is_rejected(tmp_path, raw_files):
    # JSON's true/null are names to Python: such a file is not the 2014 format.
    r, _ = raw_files
    m = write(tmp_path / "meta_Json.json", '{"asin": "B01", "sold": true}\n')
    with pytest.raises(DataFormatError, match=r"meta_Json\.json:1: rejected, .* found Name"):
        load_amazon_raw(r, m)


def test_meta_syntax_error_names_line(tmp_path, raw_files):
    r, _ = raw_files
    m = write(tmp_path / "meta_Broken.json", meta("B01", [["a"]]) + "\n{'asin': 'B02',\n")
    with pytest.raises(DataFormatError, match=r"meta_Broken\.json:2: not a Python literal"):
        load_amazon_raw(r, m)


def test_meta_missing_asin_names_field_file_and_line(tmp_path, raw_files):
    r, _ = raw_files
    m = write(tmp_path / "meta_NoAsin.json", meta("B01", [["a"]]) + "\n{'title': 'x'}\n")
    with pytest.raises(DataFormatError, match=r"meta_NoAsin\.json:2: field 'asin' is missing"):
        load_amazon_raw(r, m)


def test_reviews_without_meta_or_categories_are_dropped_and_counted(tmp_path):
    reviews = [
        review("U1", "B01", 1),
        review("U1", "B02", 2),  # B02 has a meta line but no categories
        review("U2", "B03", 3),  # B03 has no meta line
        review("U2", "B03", 4),
        review("U2", "B04", 5),  # B04's categories are [[]]
    ]
    r = write(tmp_path / "reviews_T_5.json", "\n".join(reviews))
    m = write(tmp_path / "meta_T.json", "\n".join([meta("B01", [["a"]]), meta("B02"), meta("B04", [[]])]))
    with pytest.warns(UserWarning) as caught:
        log = load_amazon_raw(r, m)
    assert [str(w.message) for w in caught] == [
        f"{r}: dropped 2 reviews of items absent from meta_T.json, "
        "2 reviews of items without categories in meta_T.json"
    ]
    assert log.frame["item"].tolist() == ["B01"]
    assert log.report.rows_read == 5
    assert log.report.dropped == {
        "reviews of items absent from meta_T.json": 2,
        "reviews of items without categories in meta_T.json": 2,
    }


def test_raw_duplicate_reviews_are_counted(tmp_path, raw_files):
    _, m = raw_files
    r = write(tmp_path / "reviews_D_5.json", "\n".join([review("U1", "B01", 7)] * 3))
    with pytest.warns(UserWarning, match="dropped 2 duplicate rows"):
        log = load_amazon_raw(r, m)
    assert len(log.frame) == 1
    assert log.frame["order"].tolist() == [1]
    assert log.report.dropped == {DUPLICATE: 2}


@pytest.mark.parametrize("which", ["reviews", "meta"])
@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_raw_empty_file_names_the_file(tmp_path, raw_files, which, suffix):
    r, m = raw_files
    empty = write(tmp_path / f"{which}_Empty{suffix}", "")
    args = (empty, m) if which == "reviews" else (r, empty)
    with pytest.raises(DataFormatError, match=rf"{which}_Empty{suffix.replace('.', '[.]')}: the file is empty"):
        load_amazon_raw(*args)


# ---------------------------------------------------------------------------
# user_id,item_id,time,cate_id CSV
# ---------------------------------------------------------------------------


def big_csv(path: Path, rows: list[str], pad_to: int = 1000) -> Path:
    """A CSV with ``rows`` first, padded to ``pad_to`` rows so no size warning fires."""
    pad = [f"pad{i},pitem{i},{1_000_000 + i},pc" for i in range(pad_to - len(rows))]
    return write(path, "\n".join(["user_id,item_id,time,cate_id", *rows, *pad]) + "\n")


def test_csv_integer_ids_sorted_by_time_then_row(tmp_path):
    lines = [
        "user_id,item_id,time,cate_id",
        "7,30,500,3",
        "7,10,100,1",
        "7,20,500,2",  # same time as the first row: the earlier row comes first
        "5,40,50,4",
    ]
    path = write(tmp_path / "log.csv", "\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"log\.csv: only 4 interactions\. That is far too few"):
        log = load_rechub_csv(path)
    f = log.frame
    assert f["user"].dtype == "int64" and f["item"].dtype == "int64"
    assert f[["user", "item", "time", "order"]].values.tolist() == [
        [5, 40, 50, 3],
        [7, 10, 100, 1],
        [7, 30, 500, 0],
        [7, 20, 500, 2],
    ]
    assert "only 4 interactions" in log.report.notes[0]


def test_csv_string_ids_stay_strings(tmp_path):
    # "007" and "7" are different ids and must not merge into the integer 7.
    path = big_csv(tmp_path / "s.csv", ["alice,007,10,toys", "alice,7,20,toys", "bob,X9,5,games"])
    with no_warnings():
        log = load_rechub_csv(path)
    first = log.frame[log.frame["user"].isin(["alice", "bob"])]
    assert first["item"].tolist() == ["007", "7", "X9"]
    assert first["category"].tolist() == ["toys", "toys", "games"]
    assert log.stats()["interactions"] == 1000


def test_csv_duplicates_are_counted(tmp_path):
    path = big_csv(tmp_path / "d.csv", ["1,2,10,3", "1,2,10,3", "1,4,11,3"], pad_to=1001)
    with pytest.warns(UserWarning) as caught:
        log = load_rechub_csv(path)
    assert [str(w.message) for w in caught] == [f"{path}: dropped 1 duplicate rows (same user, item, time)"]
    assert log.report.rows_read == 1001
    assert log.report.dropped == {DUPLICATE: 1}
    assert len(log.frame) == 1000


@pytest.mark.parametrize(
    "header, missing",
    [
        ("user,item_id,time,cate_id", "['user_id']"),
        ("user_id,item_id,timestamp,category", "['time', 'cate_id']"),
    ],
)
def test_csv_missing_or_misnamed_columns(tmp_path, header, missing):
    path = write(tmp_path / "cols.csv", f"{header}\n1,2,3,4\n")
    with pytest.raises(DataFormatError) as err:
        load_rechub_csv(path)
    message = str(err.value)
    assert "cols.csv" in message
    assert f"missing column(s) {missing}" in message
    assert f"found {header.split(',')}" in message


def test_csv_non_integer_time_names_column_and_line(tmp_path):
    path = write(tmp_path / "t.csv", "user_id,item_id,time,cate_id\n1,2,100,3\n1,3,2014-05-04,3\n1,4,1.5,3\n")
    with pytest.raises(DataFormatError, match=r"t\.csv: column 'time' must hold integers; line 3 has '2014-05-04'"):
        load_rechub_csv(path)


def test_csv_minus_zero_is_not_zero(tmp_path):
    # As integers "-0" and "0" would be one item, and the second click a repeat.
    path = write(tmp_path / "z.csv", f"{RECHUB_HEADER}\n1,-0,100,1\n1,0,200,1\n1,12,300,2\n")
    with pytest.warns(UserWarning, match=r"z\.csv: only 3 interactions") as caught:
        log = load_rechub_csv(path)
    assert len(caught) == 1  # the size warning only: nothing dropped
    f = log.frame
    assert f["item"].tolist() == ["-0", "0", "12"]
    assert f["user"].tolist() == [1, 1, 1] and f["user"].dtype == "int64"
    assert log.report.dropped == {}
    # A negative id is canonical: that column stays integer.
    path = write(tmp_path / "n.csv", f"{RECHUB_HEADER}\n1,-5,100,1\n1,0,200,1\n")
    with pytest.warns(UserWarning, match="far too few"):
        f = load_rechub_csv(path).frame
    assert f["item"].dtype == "int64" and f["item"].tolist() == [-5, 0]


@pytest.mark.parametrize("digits", ["\uff13\uff10\uff10", "\u0663\u0660\u0660", "3\uff10\uff10"])
def test_csv_time_in_non_ascii_digits_names_column_and_line(tmp_path, digits):
    # Python's int() and re's \d accept these (fullwidth, Arabic-Indic) digits.
    path = write(tmp_path / "t.csv", f"{RECHUB_HEADER}\n1,2,100,3\n1,3,200,3\n1,4,{digits},3\n")
    with pytest.raises(DataFormatError,
                       match=rf"t\.csv: column 'time' must hold integers; line 4 has '{digits}'$"):
        load_rechub_csv(path)


def test_csv_ids_in_non_ascii_digits_are_strings_of_their_own(tmp_path):
    # "1\uff10" (1 and a fullwidth 0) is not "10": two users, both clicks kept.
    rows = ["1\uff10,5,100,1", "10,5,200,1", "10,5\u0667,300,1"]
    path = write(tmp_path / "w.csv", "\n".join([RECHUB_HEADER, *rows]) + "\n")
    with pytest.warns(UserWarning, match="far too few") as caught:
        log = load_rechub_csv(path)
    assert len(caught) == 1  # the size warning only: nothing dropped
    f = log.frame
    assert f["user"].tolist() == ["10", "10", "1\uff10"]
    assert f["item"].tolist() == ["5", "5\u0667", "5"]
    assert f["category"].dtype == "int64" and f["time"].tolist() == [200, 300, 100]
    assert log.stats() == {"users": 2, "items": 2, "categories": 1, "interactions": 3}
    assert log.report.dropped == {}


def test_csv_empty_cell_names_line(tmp_path):
    path = write(tmp_path / "e.csv", "user_id,item_id,time,cate_id\n1,2,100,3\n1,,101,3\n")
    with pytest.raises(DataFormatError, match=r"e\.csv: column 'item_id' is empty on line 3"):
        load_rechub_csv(path)
    # A blank line is reported at its own line number, not skipped.
    path = write(tmp_path / "b.csv", "user_id,item_id,time,cate_id\n1,2,100,3\n\n1,3,101,3\n")
    with pytest.raises(DataFormatError, match=r"b\.csv: column 'user_id' is empty on line 3"):
        load_rechub_csv(path)


def test_csv_empty_file_and_header_only(tmp_path):
    with pytest.raises(DataFormatError, match=r"empty\.csv: the file is empty"):
        load_rechub_csv(write(tmp_path / "empty.csv", ""))
    with pytest.raises(DataFormatError, match=r"header\.csv: only a header, no data rows"):
        load_rechub_csv(write(tmp_path / "header.csv", "user_id,item_id,time,cate_id\n"))


# ---------------------------------------------------------------------------
# Toys & Games 5-core format, on a miniature copy
# ---------------------------------------------------------------------------


TOYS_HEADER = "user_id,item_id,class,reviewTime,overall"


def toys_folder(tmp_path: Path, train: list[str], test: list[str], seq: list[str], gz: bool = True) -> Path:
    """Write the three Toys files (gzip-compressed or plain) into a folder."""
    folder = tmp_path / "toys"
    folder.mkdir()
    ext = ".gz" if gz else ""
    write(folder / f"train_set_Toys_CTR.csv{ext}", "\n".join([TOYS_HEADER, *train]) + "\n")
    write(folder / f"test_set_Toys_CTR.csv{ext}", "\n".join([TOYS_HEADER, *test]) + "\n")
    write(folder / f"Toys.txt{ext}", "\n".join(seq) + "\n")
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_toys_joins_files_and_orders_same_day_by_sequence(tmp_path, gz):
    folder = toys_folder(
        tmp_path,
        # Same day for items 12 and 11: Toys.txt says 12 came first.
        train=["1,11,5,2014-01-02,1", "1,10,4,2014-01-01,0"],
        test=["1,12,6,2014-01-02,1", "2,10,4,1999-12-31,1"],
        seq=["1 10 12 11", "2 10"],
        gz=gz,
    )
    with no_warnings():
        log = load_toys_5core(folder)
    f = log.frame
    assert f["user"].tolist() == [1, 1, 1, 2]
    assert f["item"].tolist() == [10, 12, 11, 10]
    assert f["category"].tolist() == [4, 6, 5, 4]
    assert f["time"].tolist() == [1388534400, 1388620800, 1388620800, 946598400]
    assert f["order"].tolist() == [0, 1, 2, 0]
    assert log.report.rows_read == 4 and log.report.notes == []


def test_toys_rows_missing_from_sequence_are_kept_last_and_counted(tmp_path):
    folder = toys_folder(
        tmp_path,
        train=["1,11,5,2014-01-02,1", "1,10,4,2014-01-02,1"],
        test=["1,12,6,2014-01-02,1"],
        seq=["1 12 10"],  # item 11 is not on the line
    )
    with pytest.warns(UserWarning, match=r"1 row\(s\) have no position in Toys\.txt\.gz"):
        log = load_toys_5core(folder)
    assert log.frame["item"].tolist() == [12, 10, 11]
    assert log.frame["order"].tolist() == [0, 1, 2]
    assert log.report.notes == [f"{folder}: 1 row(s) have no position in Toys.txt.gz; "
                                "kept, ordered after the known rows of the same day"]


def test_toys_sequence_contradicting_dates_is_noted_not_reordered(tmp_path):
    folder = toys_folder(
        tmp_path,
        train=["1,10,4,2014-03-01,1", "1,11,4,2014-01-01,1"],
        test=["1,12,4,2014-02-01,1"],
        seq=["1 10 11 12"],  # says 10 first, but 10 has the latest date
    )
    with pytest.warns(UserWarning, match="go back in time"):
        log = load_toys_5core(folder)
    assert log.frame["item"].tolist() == [11, 12, 10]  # by date
    assert log.report.notes == [
        f"{folder / 'Toys.txt.gz'}: 1 step(s) in 1 user(s) go back in time; "
        "the dates were kept and decide the order"
    ]


def test_toys_bad_date_and_bad_header(tmp_path):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1", "1,11,4,01/02/2014,1"], test=[], seq=["1 10 11"])
    with pytest.raises(DataFormatError, match=r"train_set_Toys_CTR\.csv\.gz: column 'reviewTime' .* line 3 has '01/02/2014'"):
        load_toys_5core(folder)
    write(folder / "train_set_Toys_CTR.csv.gz", "user,item_id,class,reviewTime\n1,10,4,2014-01-01\n")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['user_id'\]"):
        load_toys_5core(folder)


def test_toys_bad_sequence_token_names_line(tmp_path):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1"], test=["2,10,4,2014-01-01,1"], seq=["1 10", "2 x7"])
    with pytest.raises(DataFormatError, match=r"Toys\.txt\.gz:2: item ids must be integers, found 'x7'"):
        load_toys_5core(folder)


def test_toys_sequence_line_of_one_bad_token_names_line(tmp_path):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1"], test=["2,10,4,2014-01-01,1"],
                         seq=["1 10", "garbage", "2 10"])
    with pytest.raises(DataFormatError, match=r"Toys\.txt\.gz:2: user ids must be integers, found 'garbage'$"):
        load_toys_5core(folder)
    # A user id alone is a user without items: skipped, like a blank line.
    (tmp_path / "ok").mkdir()
    folder = toys_folder(tmp_path / "ok", train=["1,10,4,2014-01-01,1"], test=["2,10,4,2014-01-01,1"],
                         seq=["1 10", "7", "", "2 10"])
    with no_warnings():
        log = load_toys_5core(folder)
    assert log.frame["user"].tolist() == [1, 2] and log.report.notes == []


def test_toys_sequence_lines_end_only_at_newline(tmp_path):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1"], test=["2,10,4,2014-01-01,1"], seq=["1 10"])
    seq = folder / "Toys.txt.gz"
    # U+2028 is a line break to str.splitlines, which put the bad token on "line 4".
    write(seq, "1 10\n2 10\u2028\n3 x7\n")
    # The message shows the token's repr, in which U+2028 is escaped.
    with pytest.raises(DataFormatError, match=r"Toys\.txt\.gz:2: item ids must be integers, found '10\\u2028'$"):
        load_toys_5core(folder)
    # A stray \r does not cut user 1's line in two (making 12 a user).
    write(seq, "1 10 11\r12\n2 10\n")
    with pytest.raises(DataFormatError, match=r"Toys\.txt\.gz:1: item ids must be integers, found '11\\r12'$"):
        load_toys_5core(folder)


@pytest.mark.parametrize("gz", [True, False])
def test_toys_sequence_with_crlf_line_ends(tmp_path, gz):
    # The published Toys.txt ends its lines in \r\n.
    folder = toys_folder(tmp_path, train=["1,11,5,2014-01-02,1", "1,10,4,2014-01-01,0"],
                         test=["1,12,6,2014-01-02,1", "2,10,4,1999-12-31,1"], seq=["1 10 12 11", "2 10"], gz=gz)
    name = "Toys.txt.gz" if gz else "Toys.txt"
    write(folder / name, "1 10 12 11\r\n\r\n2\t10 \r\n")
    with no_warnings():
        log = load_toys_5core(folder)
    assert log.frame["item"].tolist() == [10, 12, 11, 10]
    assert log.frame["order"].tolist() == [0, 1, 2, 0]
    write(folder / name, "1 10 12 11\r\n2 x7\r\n")
    with pytest.raises(DataFormatError, match=rf"{re.escape(name)}:2: item ids must be integers, found 'x7'$"):
        load_toys_5core(folder)


def test_toys_non_ascii_digits_are_not_integers(tmp_path):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1"], test=["2,10,4,2014-01-01,1"],
                         seq=["1 10", "2 \uff110"])
    with pytest.raises(DataFormatError, match="Toys\\.txt\\.gz:2: item ids must be integers, found '\uff110'$"):
        load_toys_5core(folder)
    write(folder / "Toys.txt.gz", "1 10\n2 10\n")
    write(folder / "test_set_Toys_CTR.csv.gz", f"{TOYS_HEADER}\n\uff12,10,4,2014-01-01,1\n")
    with pytest.raises(DataFormatError, match=(
        "test_set_Toys_CTR\\.csv\\.gz: column 'user_id' must hold integers; line 2 has '\uff12'$"
    )):
        load_toys_5core(folder)
    # pandas' %Y would read a year in fullwidth digits as 2014.
    write(folder / "test_set_Toys_CTR.csv.gz", f"{TOYS_HEADER}\n2,10,4,\uff12\uff10\uff11\uff14-01-01,1\n")
    with pytest.raises(DataFormatError, match=(
        "test_set_Toys_CTR\\.csv\\.gz: column 'reviewTime' must be a YYYY-MM-DD date; "
        "line 2 has '\uff12\uff10\uff11\uff14-01-01'$"
    )):
        load_toys_5core(folder)


def test_toys_missing_file(tmp_path):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1"], test=[], seq=["1 10"])
    (folder / "Toys.txt.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither Toys\.txt nor Toys\.txt\.gz"):
        load_toys_5core(folder)


# ---------------------------------------------------------------------------
# Malformed and damaged files: every error names the file and the place
# ---------------------------------------------------------------------------


RECHUB_HEADER = "user_id,item_id,time,cate_id"


def test_csv_rows_with_one_field_more_than_the_header_are_refused(tmp_path):
    # Given a header, pandas would make the first field of such rows the
    # index and load every column shifted by one: user 7 everywhere.
    rows = ["7,1,10,1000,5", "7,1,11,2000,6", "7,2,12,3000,5"]
    path = write(tmp_path / "shift.csv", "\n".join([RECHUB_HEADER, *rows]) + "\n")
    with pytest.raises(DataFormatError, match=r"shift\.csv: line 2 has 5 fields, the header has 4$"):
        load_rechub_csv(path)
    # One long row further down is reported at its own line.
    path = big_csv(tmp_path / "one.csv", ["1,10,1000,5", "1,11,2000,6", "2,12,3000,5,0"])
    with pytest.raises(DataFormatError, match=r"one\.csv: line 4 has 5 fields, the header has 4$"):
        load_rechub_csv(path)


def test_toys_csv_rows_with_one_field_more_than_the_header_are_refused(tmp_path):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1"],
                         test=["1,11,4,2014-01-02,1,0", "1,12,4,2014-01-03,1,0"], seq=["1 10 11 12"])
    with pytest.raises(DataFormatError,
                       match=r"test_set_Toys_CTR\.csv\.gz: line 2 has 6 fields, the header has 5$"):
        load_toys_5core(folder)


@pytest.mark.parametrize("header, repeated", [
    (f"{RECHUB_HEADER},time", "'time' 2 times"),
    ("user_id,user_id,item_id,time,cate_id", "'user_id' 2 times"),
])
def test_csv_column_named_twice_is_refused(tmp_path, header, repeated):
    n_extra = header.count(",") - RECHUB_HEADER.count(",")
    path = write(tmp_path / "dup.csv", f"{header}\n1,10,1000,5{',7' * n_extra}\n")
    with pytest.raises(DataFormatError, match=rf"dup\.csv: the header names column {repeated}"):
        load_rechub_csv(path)


def test_csv_column_whose_name_merely_looks_renamed_is_fine(tmp_path):
    # 'time.1' is what pandas would call a second 'time'; here it is a real name.
    path = write(tmp_path / "ok.csv", f"{RECHUB_HEADER},time.1\n1,10,1000,5,7777\n1,11,2000,5,1\n")
    with pytest.warns(UserWarning, match="far too few"):
        log = load_rechub_csv(path)
    assert log.frame["time"].tolist() == [1000, 2000]


def test_toys_csv_column_named_twice_is_refused(tmp_path):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1"], test=["1,11,4,2014-01-02,1"], seq=["1 10 11"])
    write(folder / "test_set_Toys_CTR.csv.gz", f"{TOYS_HEADER},class\n1,11,4,2014-01-02,1,99\n")
    with pytest.raises(DataFormatError,
                       match=r"test_set_Toys_CTR\.csv\.gz: the header names column 'class' 2 times"):
        load_toys_5core(folder)


def test_csv_time_of_19_digits_loads_and_beyond_int64_is_out_of_range(tmp_path):
    # int64 holds some 19-digit numbers; they are integers, not an error.
    big = 10**18
    path = big_csv(tmp_path / "t.csv", [f"1,10,{big},5", f"1,11,{2**63 - 1},5", "1,12,-0009,5"])
    with no_warnings():
        log = load_rechub_csv(path)
    assert log.frame.loc[log.frame["user"] == "1", "time"].tolist() == [-9, big, 2**63 - 1]
    for value in (2**63, -(2**63) - 1, 10**30):
        path = write(tmp_path / "o.csv", f"{RECHUB_HEADER}\n1,10,5,5\n1,11,{value},5\n")
        with pytest.raises(DataFormatError,
                           match=rf"o\.csv: column 'time' is out of range on line 3: '{value}'"):
            load_rechub_csv(path)


def damage(path: Path, how: str) -> None:
    """Break the gzip file at ``path`` in one of four ways."""
    data = path.read_bytes()
    broken = {
        "truncated": data[: len(data) // 2],
        "not gzip": gzip.decompress(data),  # plain text under a .gz name
        "bad checksum": data[:-8] + b"\0\0\0\0" + data[-4:],
        "bad deflate": data[:10] + b"\xff" * 20,  # block type 3 does not exist
    }[how]
    path.write_bytes(broken)


DAMAGES = ["truncated", "not gzip", "bad checksum", "bad deflate"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_gzip_csv_names_the_file(tmp_path, how):
    path = big_csv(tmp_path / "log.csv.gz", ["1,10,1000,5"])
    damage(path, how)
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}: corrupt or truncated gzip \(.+\)$"):
        load_rechub_csv(path)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["train_set_Toys_CTR.csv.gz", "Toys.txt.gz"])
def test_damaged_gzip_toys_file_names_the_file(tmp_path, how, name):
    folder = toys_folder(tmp_path, train=[f"1,{10 + i},4,2014-01-01,1" for i in range(300)],
                         test=["2,10,4,2014-01-01,1"],
                         seq=["1 " + " ".join(str(10 + i) for i in range(300)), "2 10"])
    damage(folder / name, how)
    with pytest.raises(DataFormatError,
                       match=rf"^{re.escape(str(folder / name))}: corrupt or truncated gzip \(.+\)$"):
        load_toys_5core(folder)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("which", ["reviews", "meta"])
def test_damaged_gzip_raw_file_names_the_file(tmp_path, raw_files, how, which):
    r, m = raw_files
    r = write(tmp_path / "reviews_Z_5.json.gz", r.read_text() * 50)
    m = write(tmp_path / "meta_Z.json.gz", m.read_text() * 50)
    bad = r if which == "reviews" else m
    damage(bad, how)
    with pytest.raises(DataFormatError,
                       match=rf"^{re.escape(str(bad))}: corrupt or truncated gzip \(.+\)$"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the repeated meta lines of a readable meta
            load_amazon_raw(r, m)


def test_folder_given_as_a_file_names_the_path(tmp_path, raw_files):
    folder = tmp_path / "clicks.csv"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"clicks\.csv: is a folder, not a file"):
        load_rechub_csv(folder)
    r, m = raw_files
    with pytest.raises(IsADirectoryError, match=r"clicks\.csv: is a folder, not a file"):
        load_amazon_raw(folder, m)
    with pytest.raises(IsADirectoryError, match=r"clicks\.csv: is a folder, not a file"):
        load_amazon_raw(r, folder)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv: no such file"):
        load_rechub_csv(tmp_path / "nowhere.csv")


def test_toys_folder_holding_a_folder_under_a_file_name(tmp_path):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1"], test=[], seq=["1 10"])
    (folder / "Toys.txt.gz").unlink()
    (folder / "Toys.txt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"Toys\.txt: is a folder, not a file"):
        load_toys_5core(folder)
    with pytest.raises(NotADirectoryError, match=r"train_set_Toys_CTR\.csv\.gz: not a folder"):
        load_toys_5core(folder / "train_set_Toys_CTR.csv.gz")


def test_raw_time_beyond_int64_is_out_of_range(tmp_path, raw_files):
    _, m = raw_files
    lines = [review("U1", "B01", 1), review("U1", "B02", 2), review("U2", "B01", 2**63)]
    r = write(tmp_path / "reviews_Big_5.json", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError,
                       match=r"reviews_Big_5\.json:3: field 'unixReviewTime' is out of range"):
        load_amazon_raw(r, m)
    lines[2] = review("U2", "B01", -(2**63))  # the smallest int64 is fine
    r = write(tmp_path / "reviews_Small_5.json", "\n".join(lines) + "\n")
    assert load_amazon_raw(r, m).frame["time"].min() == -(2**63)


def test_raw_deeply_nested_line_is_malformed_json(tmp_path, raw_files):
    _, m = raw_files
    deep = '{"reviewerID": "U9", "asin": "B01", "unixReviewTime": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = write(tmp_path / "reviews_Deep_5.json", "\n".join([review("U1", "B01", 1), "", deep]) + "\n")
    with pytest.raises(DataFormatError, match=r"reviews_Deep_5\.json:3: malformed JSON \(nested too deeply\)$"):
        load_amazon_raw(r, m)


@pytest.mark.parametrize("field", ["unixReviewTime", "helpful"])
def test_raw_integer_too_long_to_convert_names_file_and_line(tmp_path, raw_files, field):
    # json.loads refuses integers of more digits than Python converts (4,300
    # by default) with a bare ValueError, even in a field the loader ignores.
    limit = sys.get_int_max_str_digits()
    if limit == 0:
        pytest.skip("this Python converts integers of any length")
    _, m = raw_files
    huge = "1" + "0" * limit
    record = {"reviewerID": "U2", "asin": "B01", "unixReviewTime": 5, "helpful": 0}
    line = json.dumps(record).replace(f'"{field}": {record[field]}', f'"{field}": {huge}')
    r = write(tmp_path / "reviews_Long_5.json", "\n".join([review("U1", "B01", 1), line]) + "\n")
    with pytest.raises(DataFormatError, match=(
        rf"^{re.escape(str(r))}:2: unreadable JSON \(Exceeds the limit \({limit} digits\) "
        rf"for integer string conversion: value has {limit + 1} digits"
    )):
        load_amazon_raw(r, m)


@pytest.mark.parametrize("label, shown", [("None", "None"), ("5", "5"), ("['Dolls']", r"\['Dolls'\]")])
def test_meta_label_that_is_not_a_string_is_refused(tmp_path, raw_files, label, shown):
    r, _ = raw_files
    m = write(tmp_path / "meta_L.json", "\n".join([
        meta("B01", [["Toys & Games", "Puzzles"]]),
        f"{{'asin': 'B02', 'categories': [['Toys & Games', {label}]]}}",
    ]) + "\n")
    with pytest.raises(DataFormatError,
                       match=rf"meta_L\.json:2: field 'categories' must end in a string label, found {shown}"):
        load_amazon_raw(r, m)


def test_meta_blank_label_means_no_category_and_is_counted(tmp_path, raw_files):
    r, _ = raw_files
    m = write(tmp_path / "meta_B.json", "\n".join([
        meta("B01", [["Toys & Games", "Puzzles"]]), meta("B02", [["Toys & Games", "  "]])]) + "\n")
    with pytest.warns(UserWarning, match="dropped 2 reviews of items without categories in meta_B.json"):
        log = load_amazon_raw(r, m)
    assert log.frame["item"].tolist() == ["B01", "B01"]
    assert log.report.dropped == {"reviews of items without categories in meta_B.json": 2}


@pytest.mark.parametrize("gz", [True, False])
def test_toys_sequence_not_utf8_names_file_and_line(tmp_path, gz):
    folder = toys_folder(tmp_path, train=["1,10,4,2014-01-01,1"], test=["2,10,4,2014-01-01,1"],
                         seq=["1 10"], gz=gz)
    name = "Toys.txt.gz" if gz else "Toys.txt"
    data = b"1 10\n2 10 caf\xe9\n"
    (folder / name).write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataFormatError, match=rf"{re.escape(name)}:2: not UTF-8 \(invalid continuation byte\)"):
        load_toys_5core(folder)


# ---------------------------------------------------------------------------
# load_source and default_data_dir
# ---------------------------------------------------------------------------


def test_load_source_unknown_lists_choices():
    with pytest.raises(ValueError, match=r"unknown source 'parquet'; choose one of toys, csv, amazon-raw"):
        load_source("parquet")


def test_load_source_amazon_raw_folder(tmp_path, raw_files):
    log = load_source("amazon-raw", tmp_path)
    assert log.stats() == {"users": 2, "items": 2, "categories": 2, "interactions": 4}
    write(tmp_path / "meta_Other.json.gz", meta("B01", [["a"]]))
    with pytest.raises(DataFormatError, match=r"expected one meta file, found 2: meta_Other\.json\.gz, meta_Toys\.json"):
        load_source("amazon-raw", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no reviews file"):
        load_source("amazon-raw", empty)


def test_load_source_csv(tmp_path):
    path = big_csv(tmp_path / "ok.csv", [])
    assert load_source("csv", str(path)).stats()["interactions"] == 1000
    with pytest.raises(ValueError, match="needs a path"):
        load_source("csv")


def test_load_source_toys_without_data_says_how_to_point_at_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIEN_DATA_DIR", str(tmp_path / "nowhere"))
    assert default_data_dir() is None
    with pytest.raises(FileNotFoundError, match=r"--path.*DIEN_DATA_DIR"):
        load_source("toys")


def test_default_data_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DIEN_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path


# ---------------------------------------------------------------------------
# The real files
# ---------------------------------------------------------------------------


def shared_data() -> Path:
    """The shared data folder, or skip the test saying where it was looked for."""
    found = default_data_dir()
    if found is None:
        env = os.environ.get("DIEN_DATA_DIR")
        where = (
            f"DIEN_DATA_DIR={env} is not a folder"
            if env
            else f"{Path(__file__).resolve().parents[1].parent / 'shared' / 'data'} is absent "
            "and DIEN_DATA_DIR is not set"
        )
        pytest.skip(f"shared data not found: {where}")
    return found


@pytest.mark.real_data
def test_real_toys_5core_stats():
    folder = shared_data() / "amazon_toys_5core"
    if not folder.is_dir():
        pytest.skip(f"{folder} does not exist")
    start = time.perf_counter()
    with no_warnings():
        log = load_source("toys")  # the default folder, as the CLI finds it
    seconds = time.perf_counter() - start
    print(f"load_toys_5core took {seconds:.2f} s")
    assert log.stats() == {"users": 19_412, "items": 11_924, "categories": 24, "interactions": 167_597}
    assert log.report.rows_read == 167_597
    assert log.report.dropped == {} and log.report.notes == []
    f = log.frame
    assert pd.Timestamp(f["time"].min(), unit="s") == pd.Timestamp("2000-07-28")
    assert pd.Timestamp(f["time"].max(), unit="s") == pd.Timestamp("2014-07-23")
    assert f.groupby("user").size().agg(["min", "max", "median"]).tolist() == [5, 550, 6]


@pytest.mark.real_data
def test_real_electronics_sample_warns_it_is_too_small():
    path = shared_data() / "amazon_electronics_sample" / "amazon_electronics_sample.csv"
    if not path.exists():
        pytest.skip(f"{path} does not exist")
    with pytest.warns(UserWarning, match=r"only 100 interactions\. That is far too few to learn or evaluate"):
        log = load_source("csv", path)
    assert log.stats() == {"users": 17, "items": 99, "categories": 67, "interactions": 100}
    assert log.report.dropped == {}
    assert "check the format only" in log.report.notes[0]
