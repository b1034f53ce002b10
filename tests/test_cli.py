"""The command line: ``python -m dien_tutorial data``."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from dien_tutorial.cli import main
from dien_tutorial.data.amazon import default_data_dir


def test_data_simulated_prints_log_and_sample_statistics(capsys):
    assert main(["data", "--source", "simulated", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 8000
    assert stats["categories"] == 40
    assert stats["interactions"] == 71_529
    # Every user has >= 5 behaviours: one test and one valid pair per user.
    assert stats["test_samples"] == stats["valid_samples"] == 2 * 8000
    assert stats["behaviours_per_user"]["p0"] == 5.0
    assert set(stats["train_history_length_quantiles"]) >= {"p0", "p50", "p90", "p100"}
    assert stats["train_history_length_quantiles"]["p100"] == 50.0


def test_data_table_output_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "dien_tutorial", "data", "--max-len", "20"],
                          capture_output=True, text=True, check=True)
    assert "interactions" in done.stdout and "71,529" in done.stdout
    assert "test_samples" in done.stdout


def test_data_csv_with_bad_columns_exits_2_with_the_file_name(tmp_path, capsys):
    bad = tmp_path / "clicks.csv"
    bad.write_text("user,item_id,time,cate_id\n1,2,3,4\n")
    assert main(["data", "--source", "csv", "--path", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "clicks.csv" in err and "user_id" in err


def test_data_path_with_simulated_is_refused(capsys):
    assert main(["data", "--source", "simulated", "--path", "x"]) == 2
    assert "--path is not used" in capsys.readouterr().err


def test_unknown_source_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "--source", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.real_data
def test_data_toys_matches_the_published_5core_size(capsys):
    root = default_data_dir()
    if root is None or not (root / "amazon_toys_5core").is_dir():
        pytest.skip("needs ../shared/data/amazon_toys_5core (or DIEN_DATA_DIR): real Amazon data absent")
    assert main(["data", "--source", "toys", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["users"], stats["items"], stats["categories"], stats["interactions"]) == (
        19_412, 11_924, 24, 167_597)
    assert stats["test_samples"] == stats["valid_samples"] == 2 * 19_412
    assert stats["dropped"] == {}


def _clicks_csv(path: Path) -> Path:
    """Four users with four clicks each, out of ten items."""
    rows = [f"{u},{(u * 3 + k) % 10},{1000 + k * 100},{(u * 3 + k) % 10 % 3}"
            for u in range(4) for k in range(4)]
    path.write_text("\n".join(["user_id,item_id,time,cate_id", *rows]) + "\n")
    return path


def test_data_damaged_gzip_exits_2_naming_the_file(tmp_path, capsys):
    good = _clicks_csv(tmp_path / "clicks.csv").read_bytes()
    bad = tmp_path / "clicks.csv.gz"
    bad.write_bytes(gzip.compress(good)[:40])  # truncated
    assert main(["data", "--source", "csv", "--path", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: corrupt or truncated gzip (")
    assert "Traceback" not in err


def test_data_folder_as_csv_path_exits_2_naming_it(tmp_path, capsys):
    folder = tmp_path / "clicks.csv"
    folder.mkdir()
    assert main(["data", "--source", "csv", "--path", str(folder)]) == 2
    assert capsys.readouterr().err == f"error: {folder}: is a folder, not a file\n"


@pytest.mark.parametrize("error", [
    OSError("disk on fire"),
    EOFError("stream ended"),
    OverflowError("int too large"),
    RecursionError("too deep"),
    zlib.error("invalid stored block lengths"),
])
def test_data_errors_the_loaders_did_not_foresee_still_exit_2(monkeypatch, capsys, error):
    def broken_loader(*args, **kwargs):
        raise error

    monkeypatch.setattr("dien_tutorial.cli.load_log", broken_loader)
    assert main(["data", "--source", "csv", "--path", "x.csv"]) == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_data_huge_max_len_means_no_limit(tmp_path, capsys):
    path = str(_clicks_csv(tmp_path / "clicks.csv"))
    outputs = []
    for max_len in ("16", str(2**63 - 1), "9" * 30):
        assert main(["data", "--source", "csv", "--path", path, "--json", "--max-len", max_len]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["train_samples"] == 16
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_data_max_len_too_long_for_an_int_is_an_argparse_error(tmp_path, capsys):
    path = str(_clicks_csv(tmp_path / "clicks.csv"))
    with pytest.raises(SystemExit) as exc:
        main(["data", "--source", "csv", "--path", path, "--max-len", "9" * 5000])
    assert exc.value.code == 2
    assert "argument --max-len: invalid int value" in capsys.readouterr().err
