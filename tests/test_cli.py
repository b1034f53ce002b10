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


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("value, message", [
    ("0", "expected a positive integer (1 or more), got 0"),
    ("-3", "expected a positive integer (1 or more), got -3"),
    ("two", "expected a positive integer, got 'two'"),
])
def test_threads_must_be_a_positive_integer(command, value, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main([command, "--threads", value, "--out", str(out)])
    assert exc.value.code == 2
    assert f"argument --threads: {message}" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was created or trained


def test_positive_int_accepts_one_and_more():
    from dien_tutorial.cli import positive_int

    assert positive_int("1") == 1 and positive_int("12") == 12


# ---------------------------------------------------------------------- #
# benchmarks/run_all.py: usage errors before anything is measured
# ---------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def run_all():
    """benchmarks/run_all.py as a module (its imports are light; nothing runs at import)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"
    spec = importlib.util.spec_from_file_location("run_all_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _usage_error(run_all, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_all.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("only", [",", "", " , ,"])
def test_run_all_only_selecting_nothing_is_a_usage_error(run_all, only, capsys):
    err = _usage_error(run_all, ["--only", only], capsys)
    assert f"--only {only!r} selects no section; choose from training, din, onnx, history, threads, samples" in err


def test_run_all_out_is_checked_before_measuring(run_all, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert f"--out {afile} is a file, not a folder" in _usage_error(run_all, ["--out", str(afile)], capsys)
    inside = afile / "results"
    assert f"--out {inside} cannot be created: {afile} is a file" in _usage_error(
        run_all, ["--out", str(inside)], capsys)
    (tmp_path / "old" / "summary.md").mkdir(parents=True)
    assert "summary.md is a folder" in _usage_error(run_all, ["--out", str(tmp_path / "old")], capsys)
    (tmp_path / "old2").mkdir()
    (tmp_path / "old2" / "figures").write_text("")
    assert "figures is a file" in _usage_error(run_all, ["--out", str(tmp_path / "old2")], capsys)
    args = run_all.parse_args(["--only", "onnx", "--out", str(tmp_path / "new" / "deeper")])
    assert args.wanted == ["onnx"] and not (tmp_path / "new").exists()  # creatable, not created yet


def _minimal_report() -> dict:
    """A summary.json of a run that measured no section."""
    none = {"available": False, "reason": "not needed by the sections asked for"}
    return {"quick": True, "date_utc": "2026-01-02T03:04:05+00:00", "sections_run": [],
            "machine": {"cpu": "test cpu", "cores": 2, "ram_gib": 1.0, "python": "3.11", "torch": "2"},
            "settings": {}, "sections": {}, "errors": {}, "data": {"source": "sim"},
            "frameworks": {"ours": none, "rechub": none, "deepctr": none},
            "load_average_start": [0.5], "load_average_end": [0.75], "wall_seconds": 1.0}


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content, message", [
    ("{bad", "summary.json: not valid JSON"),
    ("[]", "summary.json: expected a JSON object, got list"),
    ("{}", "the field 'quick' is missing"),
    (json.dumps({**_minimal_report(), "sections": []}), "the field 'sections' has the wrong type (list)"),
    (json.dumps({k: v for k, v in _minimal_report().items() if k != "machine"}), "the field 'machine' is missing"),
    (json.dumps({**_minimal_report(), "machine": {}}), "cannot render the tables, a field is missing or "
                                                        "malformed (KeyError: 'python')"),
    (json.dumps({**_minimal_report(), "sections": {"onnx": {"summary": [{"batch": 1}]}}}),
     "cannot render the tables, a field is missing or malformed (KeyError: "),
])
def test_run_all_render_of_a_malformed_summary_writes_nothing(run_all, content, message, tmp_path, capsys):
    folder = tmp_path / "results"
    (folder / "figures").mkdir(parents=True)
    (folder / "summary.json").write_text(content)
    (folder / "summary.md").write_text("the tables of the last good run")
    (folder / "figures" / "onnx.png").write_bytes(b"an old plot")
    before = _tree(folder)
    assert run_all.main(["--render", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'summary.json'}: ") and message in err
    assert err.rstrip().endswith("nothing was written")
    assert _tree(folder) == before


def test_run_all_render_honours_out_and_rejects_measuring_options(run_all, tmp_path, capsys):
    source = tmp_path / "results"
    source.mkdir()
    (source / "summary.json").write_text(json.dumps(_minimal_report()))
    before = _tree(source)
    for extra in (["--quick"], ["--only", "onnx"]):
        err = _usage_error(run_all, ["--render", str(source), *extra], capsys)
        assert "--render measures nothing: --quick and --only do not apply to it" in err
    out = tmp_path / "rendered"
    assert run_all.main(["--render", str(source), "--out", str(out)]) == 0
    assert _tree(source) == before  # the source folder is only read
    written = _tree(out)
    assert set(written) == {"summary.json", "summary.md", "machine.md",
                            *(f"figures/{name}.png" for name in run_all.SECTIONS)}
    assert json.loads(written["summary.json"]) == _minimal_report()
    assert written["summary.md"].decode().count("Not measured in this run.") == len(run_all.SECTIONS)
    assert "on one machine: test cpu, 2 cores" in written["machine.md"].decode()
    assert all(png.startswith(b"\x89PNG") for name, png in written.items() if name.endswith(".png"))


class _FakeWorker:
    """Answers ``train`` requests from fixed lists: the speeds of its timed runs per model, in order."""

    def __init__(self, kind: str, speeds: dict, epoch: float, auc: float) -> None:
        self.kind, self.speeds, self.epoch, self.auc, self.requests = kind, speeds, epoch, auc, []

    def ask(self, **request) -> dict:
        self.requests.append(request)
        if request.get("steps") is None:  # one epoch, then the test AUC
            return {"samples_per_s": self.epoch, "steps": 3, "seconds": 1.0, "test_auc": self.auc}
        speed = self.speeds[request["model"]].pop(0)
        return {"samples_per_s": speed, "steps": request["steps"], "seconds": 1.0, "load_before": 0.5}


def test_run_all_din_section_ratios_and_table(run_all):
    ours = _FakeWorker("ours", {"din": [60000.0, 66000.0], "din_example": [60000.0, 60000.0]}, 61000.0, 0.6)
    theirs = _FakeWorker("rechub", {"din": [7500.0, 7500.0], "din_example": [750.0, 750.0]}, 7000.0, 0.55)
    plan = {**run_all.FULL, "epoch_steps": None, "infer_max_batches": None}
    sec = run_all.run_din({"ours": ours, "rechub": theirs}, plan)
    # Alternating order, the models asked for, one epoch of the like-for-like DIN each.
    assert [r["model"] for r in ours.requests] == ["din", "din", "din_example", "din_example", "din"]
    assert ours.requests[-1]["steps"] is None and ours.requests[-1]["infer_batch"] == 256
    assert [r["round"] for r in sec["runs"][:4]] == [0, 0, 1, 1]
    assert [r["kind"] for r in sec["runs"][:4]] == ["ours", "rechub", "rechub", "ours"]
    rows = {r["model"]: r for r in sec["summary"]}
    ours_mean = (60000.0 + 66000.0) / 2
    assert rows["din"]["ours_samples_per_s"] == pytest.approx(ours_mean)
    assert rows["din"]["ours_faster_by"] == pytest.approx(ours_mean / 7500.0)
    assert rows["din"]["ours_faster_by_per_round"] == pytest.approx([8.0, 8.8])
    assert rows["din_example"]["ours_faster_by"] == pytest.approx(80.0)
    assert sec["epochs"]["ours"]["test_auc"] == 0.6 and sec["epochs"]["rechub"]["samples_per_s"] == 7000.0
    text = "\n".join(run_all.table_din(sec, plan, {"description": "test data"}))
    assert "| 256 | 63,000 (60,000 / 66,000) | 7,500 (7,500 / 7,500) | 8.40× |" in text
    assert "| 256 | 60,000 (60,000 / 60,000) | 750 (750 / 750) | 80.00× |" in text
    assert "| dien_tutorial | 61,000 | 0.6000 |" in text and "| torch-rechub | 7,000 | 0.5500 |" in text
    assert "one full epoch" in text


# ---------------------------------------------------------------------- #
# train and compare: usage errors before training, a diverging run, strict JSON
# ---------------------------------------------------------------------- #
@pytest.mark.parametrize("value", ["0", "-2"])
def test_compare_seeds_must_be_positive(value, tmp_path, capsys):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--seeds", value, "--out", str(out)])
    assert exc.value.code == 2
    assert f"argument --seeds: expected a positive integer (1 or more), got {value}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("value, message", [
    ("dien,foo", "unknown model 'foo' in 'dien,foo'; choose from dien,din,gru_att,dien_no_aux"),
    (",", "',' names no model; choose from dien,din,gru_att,dien_no_aux"),
    ("din,dien,din", "model 'din' is named twice in 'din,dien,din'"),
])
def test_compare_models_are_all_checked_before_any_training(value, message, monkeypatch, tmp_path, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("a model was trained before every name was checked")

    monkeypatch.setattr("dien_tutorial.cli._prepare", no_training)
    monkeypatch.setattr("dien_tutorial.cli._train_one", no_training)
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--models", value, "--out", str(tmp_path / "cmp")])
    assert exc.value.code == 2
    assert f"argument --models: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("value, message", [
    ("inf", "expected a finite number > 0, got 'inf'"),
    ("nan", "expected a finite number > 0, got 'nan'"),
    ("0", "expected a finite number > 0, got '0'"),
    ("-1e-3", "expected a finite number > 0, got '-1e-3'"),
    ("fast", "expected a positive number, got 'fast'"),
])
def test_lr_must_be_a_finite_positive_number(command, value, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main([command, f"--lr={value}", "--out", str(out)])  # "=": "-1e-3" alone reads as an option
    assert exc.value.code == 2
    assert f"argument --lr: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_train_that_diverges_exits_2_naming_the_epoch_and_the_flag(tmp_path, capsys):
    rows = [f"{u},{(u * 3 + k) % 10},{1000 + k * 100},{(u * 3 + k) % 10 % 3}" for u in range(40) for k in range(8)]
    path = tmp_path / "clicks.csv"  # 40 users, 8 clicks each
    path.write_text("\n".join(["user_id,item_id,time,cate_id", *rows]) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--source", "csv", "--path", str(path), "--preset", "tiny", "--epochs", "1",
                 "--no-progress", "--lr", "1e4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dien, seed 0: training diverged in epoch 0")
    assert "Try a smaller learning rate than lr = 10000" in err and err.rstrip().endswith("try --lr 1000")
    assert "Input contains NaN" not in err
    assert sorted(p.name for p in out.iterdir()) == []  # no model.pt, no model.pt.last, no metrics.json


def test_compare_json_is_strict_json_with_null_for_missing_values(monkeypatch, tmp_path, capsys):
    nan = float("nan")
    results = {("din", 0): (0.61, nan), ("din", 1): (0.63, nan), ("dien", 0): (0.70, 0.66)}

    def fake_train_one(args, samples, model_name, seed, out_dir=None, log=print):
        auc, g = results[(model_name, seed)]
        return {"model": model_name, "seed": seed, "test_auc": auc, "test_gauc": g, "test_logloss": 0.5,
                "train_samples_per_s": 1000.0, "epochs_run": 1, "wall_seconds": 1.0,
                "history": [{"epoch": 0, "samples_per_s": nan}]}

    monkeypatch.setattr("dien_tutorial.cli._prepare", lambda args: None)
    monkeypatch.setattr("dien_tutorial.cli._train_one", fake_train_one)
    assert main(["compare", "--models", "din", "--seeds", "2", "--out", str(tmp_path / "a")]) == 0
    assert main(["compare", "--models", "dien", "--seeds", "1", "--out", str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "n/a" in text and "nan" not in text.lower()

    def refuse(constant):
        raise AssertionError(f"compare.json holds {constant}, which is not JSON")

    two = json.loads((tmp_path / "a" / "compare.json").read_text(), parse_constant=refuse)
    one = json.loads((tmp_path / "b" / "compare.json").read_text(), parse_constant=refuse)
    assert two["table"]["din"]["test_auc"] == {"mean": pytest.approx(0.62), "std": pytest.approx(0.0141421356),
                                               "seeds": 2}
    assert two["table"]["din"]["test_gauc"] == {"mean": None, "std": None, "seeds": 0}  # no seed has it
    assert two["runs"][0]["test_gauc"] is None and two["runs"][0]["history"][0]["samples_per_s"] is None
    assert one["table"]["dien"]["test_gauc"] == {"mean": 0.66, "std": None, "seeds": 1}  # one seed: no spread
