"""The student edition of the notebooks: ``dien_tutorial.assignments`` and ``assignments`` on the CLI.

The teacher's edition is ``notebooks/``: solutions between
``### BEGIN SOLUTION`` / ``### END SOLUTION`` and a check cell after each.
These tests build the student edition into a temporary folder, check what
it holds and what it no longer holds, run each of its notebooks once in a
fresh kernel (every check must report FAILED, "not filled in", and no cell
may raise), and feed the builder broken notebooks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dien_tutorial import assignments
from dien_tutorial.assignments import AssignmentError, build, execute_notebook, read_checks
from dien_tutorial.cli import main

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# What students write, per notebook, and the check cells that follow (grade_id: points).
EXERCISES = {
    "01_data_preparation.ipynb": (["history_windows", "sample_negatives"],
                                  {"ch01-history-windows-check": 2, "ch01-sampler-check": 1}),
    "02_gru_from_scratch.ipynb": (["gru_step"], {"ch02-gru-step-check": 2}),
    "03_attention_and_augru.ipynb": (["masked_softmax_by_hand", "augru_step"],
                                     {"ch03-masked-softmax-check": 1, "ch03-augru-step-check": 2}),
    "04_auxiliary_loss.ipynb": (["aux_loss_by_hand"], {"ch04-aux-loss-check": 2}),
}
CHECK_OF = {"history_windows": "check_history_windows", "sample_negatives": "check_negative_sampler",
            "gru_step": "check_gru_cell", "masked_softmax_by_hand": "check_masked_softmax",
            "augru_step": "check_augru_cell", "aux_loss_by_hand": "check_aux_loss"}
# A line each notebook prints only if the cells after the checks ran on working functions.
DOWNSTREAM = {
    "01_data_preparation.ipynb": "package windows equal ours: True",
    "02_gru_from_scratch.ipynb": "largest difference, rounded to 12 decimals: 0.000000000000",
    "03_attention_and_augru.ipynb": "largest difference, rounded to 12 decimals: 0.000000000000",
    "04_auxiliary_loss.ipynb": "largest difference, rounded to 12 decimals: 0.000000000000",
}


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _nbgrader(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _text(cell: dict) -> str:
    """Everything a code cell printed or displayed."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] == "error":
            parts.append(f"{output['ename']}: {output['evalue']}")
        else:
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join("".join(p) if isinstance(p, list) else p for p in parts)


def _regions(source: str) -> list[list[str]]:
    """The lines of each solution region of a cell."""
    regions, current = [], None
    for line in source.split("\n"):
        if line.strip() == "### BEGIN SOLUTION":
            current = []
        elif line.strip() == "### END SOLUTION":
            regions.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return regions


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    build(out)
    return out


@pytest.fixture(scope="module")
def executed(student) -> dict[str, dict]:
    """Every student notebook, run once top to bottom (about a minute for the four)."""
    return {name: execute_notebook(student / name, timeout=120) for name in EXERCISES}


# ---------------------------------------------------------------------- #
# The teacher's edition: markers, metadata, and checks that pass
# ---------------------------------------------------------------------- #
@pytest.mark.parametrize("name", EXERCISES)
def test_source_notebook_marks_each_solution_and_follows_it_with_its_check(name):
    cells = _read(NOTEBOOKS / name)["cells"]
    functions, check_ids = EXERCISES[name]
    solutions = [i for i, c in enumerate(cells) if _nbgrader(c).get("solution")]
    checks = [i for i, c in enumerate(cells) if _nbgrader(c).get("grade")]
    assert len(solutions) == len(functions) and len(checks) == len(check_ids)
    for i, j, function in zip(solutions, checks, functions):
        assert i < j and all(cells[k]["cell_type"] == "markdown" for k in range(i + 1, j))
        assert re.search(rf"^def {function}\(", _source(cells[i]), re.MULTILINE)
        assert len(_regions(_source(cells[i]))) == 1
        assert _nbgrader(cells[i]) == {"grade": False, "grade_id": _nbgrader(cells[i])["grade_id"],
                                       "locked": False, "schema_version": 3, "solution": True}
        check = _source(cells[j])
        assert f"report = {CHECK_OF[function]}({function})" in check
        assert f"{function} = passed_or_reference(report, {function}, reference_" in check
        # nbgrader's autograder scores a cell by whether it raises: the hidden line does that.
        assert "### BEGIN HIDDEN TESTS\nreport.raise_if_failed()" in check
    grade_ids = {_nbgrader(cells[j])["grade_id"]: _nbgrader(cells[j]) for j in checks}
    assert {k: v["points"] for k, v in grade_ids.items()} == check_ids
    assert all(v["locked"] and v["grade"] and not v["solution"] and v["schema_version"] == 3
               for v in grade_ids.values())


def test_grade_ids_are_unique_across_the_notebooks():
    ids = [_nbgrader(c)["grade_id"] for name in EXERCISES for c in _read(NOTEBOOKS / name)["cells"]
           if _nbgrader(c)]
    assert len(ids) == len(set(ids)) == 12


@pytest.mark.parametrize("name", EXERCISES)
def test_source_notebooks_pass_every_check(name):
    """The solutions filled in (the teacher's edition itself): every stored check report is PASSED.

    nbval re-runs these notebooks and compares every output, so the stored
    reports are the ones a fresh run prints.
    """
    graded = read_checks(_read(NOTEBOOKS / name), name)
    assert graded.errors == ()
    assert [(r.grade_id, r.status) for r in graded.checks] == [(g, "PASSED") for g in EXERCISES[name][1]]
    for cell in _read(NOTEBOOKS / name)["cells"]:
        if _nbgrader(cell).get("grade"):
            text = _text(cell)
            assert text.startswith("PASSED check_") and "FAILED" not in text and "Note:" not in text


# ---------------------------------------------------------------------- #
# The student edition: what it holds
# ---------------------------------------------------------------------- #
def test_build_writes_the_notebooks_with_markers_only(tmp_path):
    built = build(tmp_path / "out")
    assert [b.path.name for b in built] == list(EXERCISES)
    for item in built:
        functions, checks = EXERCISES[item.path.name]
        assert list(item.functions) == functions and list(item.checks) == list(checks)
        assert item.source == NOTEBOOKS / item.path.name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == list(EXERCISES)


@pytest.mark.parametrize("name", EXERCISES)
def test_solutions_are_replaced_by_stubs(student, name):
    source_nb, student_nb = _read(NOTEBOOKS / name), _read(student / name)
    text = (student / name).read_text()
    by_id = {c["id"]: c for c in student_nb["cells"]}
    all_source = [line.strip() for c in source_nb["cells"] for line in _source(c).split("\n")]
    for cell in source_nb["cells"]:
        if not _nbgrader(cell).get("solution"):
            continue
        stub = _source(by_id[cell["id"]])
        function = re.search(r"^def (\w+)\(", _source(cell), re.MULTILINE).group(1)
        assert f'    # YOUR CODE HERE\n    raise NotImplementedError("write {function} (see the text above)")' in stub
        assert _source(cell).split("### BEGIN SOLUTION")[0] == stub.split("# YOUR CODE HERE")[0]
        for region in _regions(_source(cell)):
            assert "\n".join(region) not in text
            # Lines found only in the solution (not elsewhere in the notebook) are gone.
            unique = [ln.strip() for ln in region if ln.strip() and all_source.count(ln.strip()) == 1]
            assert unique, "a solution with no line of its own proves nothing"
            for line in unique:
                assert json.dumps(line)[1:-1] not in text, line
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS", "raise_if_failed"):
        assert marker not in text


@pytest.mark.parametrize("name", EXERCISES)
def test_outputs_cleared_and_everything_else_kept(student, name):
    source_cells, student_nb = _read(NOTEBOOKS / name)["cells"], _read(student / name)
    cells = student_nb["cells"]
    assert cells[1]["id"] == assignments.NOTE_ID
    note = _source(cells[1])
    assert note.startswith("**Student edition.**")
    assert all(f"`{f}`" in note for f in EXERCISES[name][0])
    rest = cells[:1] + cells[2:]
    assert [c["id"] for c in rest] == [c["id"] for c in source_cells]
    for new, old in zip(rest, source_cells):
        assert new["cell_type"] == old["cell_type"]
        if new["cell_type"] == "code":
            assert new["outputs"] == [] and new["execution_count"] is None
            assert "execution" not in new["metadata"]
        assert new.get("metadata", {}).get("tags") == old.get("metadata", {}).get("tags")
        assert _nbgrader(new) == _nbgrader(old)
        meta = _nbgrader(old)
        if meta.get("grade"):  # check cells: the same code without the hidden lines, locked
            hidden = "### BEGIN HIDDEN TESTS\nreport.raise_if_failed()  # for nbgrader's autograder: " \
                     "a failed check scores 0 points\n### END HIDDEN TESTS"
            assert _source(new) == _source(old).replace("\n" + hidden, "")
            assert new["metadata"]["editable"] is False and new["metadata"]["deletable"] is False
        elif not meta.get("solution"):
            assert _source(new) == _source(old)
    assert student_nb["metadata"]["kernelspec"] == {"name": "python3", "display_name": "Python 3",
                                                    "language": "python"}


def test_build_is_byte_identical_twice_and_never_touches_the_sources(tmp_path):
    before = {p.name: p.read_bytes() for p in NOTEBOOKS.glob("*.ipynb")}
    build(tmp_path / "a")
    build(tmp_path / "b")
    build(tmp_path / "a")  # over its own earlier output
    for name in EXERCISES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert {p.name: p.read_bytes() for p in NOTEBOOKS.glob("*.ipynb")} == before


def test_build_a_chosen_notebook_by_number_stem_or_name(tmp_path):
    for pick in ("2", "02", "02_gru_from_scratch", "02_gru_from_scratch.ipynb"):
        built = build(tmp_path / pick, notebooks=[pick])
        assert [b.path.name for b in built] == ["02_gru_from_scratch.ipynb"]
    built = build(tmp_path / "two", notebooks=["4", "1", "04"])
    assert [b.path.name for b in built] == ["01_data_preparation.ipynb", "04_auxiliary_loss.ipynb"]


# ---------------------------------------------------------------------- #
# The student edition runs, and every check says "not filled in"
# ---------------------------------------------------------------------- #
@pytest.mark.parametrize("name", EXERCISES)
def test_student_notebook_runs_top_to_bottom_with_the_stubs(executed, name):
    notebook = executed[name]
    errors = [(i, _text(c)) for i, c in enumerate(notebook["cells"])
              if any(o["output_type"] == "error" for o in c.get("outputs", []))]
    assert errors == []
    functions, check_ids = EXERCISES[name]
    checks = [c for c in notebook["cells"] if _nbgrader(c).get("grade")]
    assert [_nbgrader(c)["grade_id"] for c in checks] == list(check_ids)
    for cell, function in zip(checks, functions):
        text = _text(cell)
        assert text.startswith(f"FAILED {CHECK_OF[function]}: the solution is not filled in yet: {function} "
                               "raised NotImplementedError.")
        assert "not filled in" in text
        assert f"Note: your {function} has not passed {CHECK_OF[function]} yet" in text
    # The cells after the checks ran with the package's versions, and got the book's results.
    assert DOWNSTREAM[name] in "".join(_text(c) for c in notebook["cells"] if c["cell_type"] == "code")
    graded = read_checks(notebook, name)
    assert [r.status for r in graded.checks] == ["FAILED"] * len(check_ids)
    assert sum(r.score for r in graded.checks) == 0 and graded.errors == ()


# ---------------------------------------------------------------------- #
# Bad input: clear errors that name the notebook and the cell
# ---------------------------------------------------------------------- #
def _notebook(*cells: tuple[str, str, dict | None]) -> dict:
    """A small notebook from (cell_type, source, nbgrader metadata or None)."""
    out = []
    for k, (kind, source, meta) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"c{k}", "metadata": {"nbgrader": meta} if meta else {},
                "source": source}
        if kind == "code":
            cell.update(outputs=[], execution_count=None)
        out.append(cell)
    return {"cells": out, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                      "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


SOLUTION = {"grade": False, "grade_id": "ex", "locked": False, "schema_version": 3, "solution": True}
GRADED = {"grade": True, "grade_id": "ex-check", "locked": True, "points": 1, "schema_version": 3,
          "solution": False}
GOOD = "def f(x):\n    \"\"\"Twice x.\"\"\"\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"


def _source_dir(tmp_path: Path, notebook: dict, name: str = "01_demo.ipynb") -> Path:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(notebook))
    return folder


@pytest.mark.parametrize(("cells", "message"), [
    ([("code", "def f(x):\n    ### BEGIN SOLUTION\n    return x", SOLUTION)],
     "01_demo.ipynb, cell 2 (code, id c1), line 2: '### BEGIN SOLUTION' without an '### END SOLUTION' after it"),
    ([("code", "def f(x):\n    return x\n    ### END SOLUTION", SOLUTION)],
     "01_demo.ipynb, cell 2 (code, id c1), line 3: '### END SOLUTION' without a '### BEGIN SOLUTION' before it"),
    ([("code", "def f(x):\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n"
               "    ### END SOLUTION", SOLUTION)],
     "cell 2 (code, id c1), line 3: '### BEGIN SOLUTION' inside the '### BEGIN SOLUTION' of line 2: regions "
     "cannot be nested"),
    ([("code", "def f(x):\n    ### BEGIN SOLUTION\n    ### BEGIN HIDDEN TESTS\n    ### END HIDDEN TESTS\n"
               "    ### END SOLUTION", SOLUTION)],
     "line 3: '### BEGIN HIDDEN TESTS' inside the '### BEGIN SOLUTION' of line 2"),
    ([("code", "def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END HIDDEN TESTS", SOLUTION)],
     "line 4: '### END HIDDEN TESTS' without a '### BEGIN HIDDEN TESTS' before it; the open region is the "
     "'### BEGIN SOLUTION' of line 2"),
    ([("markdown", "Write this:\n\n### BEGIN SOLUTION\nanswer\n### END SOLUTION", None)],
     "01_demo.ipynb, cell 2 (markdown, id c1), line 3: '### BEGIN SOLUTION': markers belong in code cells only"),
    ([("code", "def f(x):\n    ## BEGIN SOLUTION\n    return x\n    ## END SOLUTION", SOLUTION)],
     "line 2: '## BEGIN SOLUTION' looks like a marker but is not one"),
    ([("code", "def f(x):\n    return x  ### BEGIN SOLUTION", SOLUTION)],
     "line 2: 'return x  ### BEGIN SOLUTION' looks like a marker but is not one"),
    ([("code", "### BEGIN SOLUTION\nx = 1\n### END SOLUTION", SOLUTION)],
     "cell 2 (code, id c1), line 1: a solution region outside a function body"),
    ([("code", "def g():\n    pass\nif True:\n    ### BEGIN SOLUTION\n    x = 1\n    ### END SOLUTION", SOLUTION)],
     "line 4: a solution region outside a function body"),
    ([("code", GOOD, None)],
     'cell 2 (code, id c1): a solution region in a cell without nbgrader metadata "solution": true'),
    ([("code", "def f(x):\n    return 2 * x", SOLUTION), ("code", GOOD, {**SOLUTION, "grade_id": "ex2"})],
     "cell 2 (code, id c1): an nbgrader solution cell without '### BEGIN SOLUTION'"),
    ([("code", GOOD, SOLUTION), ("code", "### BEGIN HIDDEN TESTS\nassert f(1) == 2\n### END HIDDEN TESTS", None)],
     'cell 3 (code, id c2): hidden tests in a cell without nbgrader metadata "grade": true'),
], ids=["no-end", "no-begin", "nested", "hidden-in-solution", "mismatched-end", "markdown", "misspelt",
        "not-alone", "top-level", "top-level-if", "no-metadata", "metadata-no-markers", "hidden-not-graded"])
def test_bad_markers_name_the_notebook_cell_and_line(tmp_path, cells, message):
    notebook = _notebook(("markdown", "# 1. Demo", None), *cells)
    folder = _source_dir(tmp_path, notebook)
    with pytest.raises(AssignmentError) as caught:
        build(tmp_path / "out", folder)
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()  # nothing written when any notebook is bad


def test_stub_keeps_the_indentation_of_methods_and_nested_blocks(tmp_path):
    code = ("class Model:\n    def step(self, x):\n        \"\"\"One step.\"\"\"\n        if x:\n"
            "            ### BEGIN SOLUTION\n            return x + 1\n            ### END SOLUTION\n"
            "        return x\n\n\ndef other():\n    ### BEGIN SOLUTION\n    return 3\n    ### END SOLUTION")
    hidden = "assert other() == 3\n### BEGIN HIDDEN TESTS\nassert Model().step(1) == 2\n### END HIDDEN TESTS"
    folder = _source_dir(tmp_path, _notebook(("markdown", "# 1. Demo", None), ("code", code, SOLUTION),
                                             ("code", hidden, GRADED)))
    built = build(tmp_path / "out", folder)
    assert built[0].functions == ("step", "other") and built[0].checks == ("ex-check",)
    cells = _read(built[0].path)["cells"]
    assert _source(cells[2]) == (
        "class Model:\n    def step(self, x):\n        \"\"\"One step.\"\"\"\n        if x:\n"
        "            # YOUR CODE HERE\n            raise NotImplementedError(\"write step (see the text above)\")\n"
        "        return x\n\n\ndef other():\n    # YOUR CODE HERE\n"
        "    raise NotImplementedError(\"write other (see the text above)\")")
    assert _source(cells[3]) == "assert other() == 3"
    assert "`step` and `other`" in _source(cells[1])


def test_output_folder_problems_are_refused(tmp_path, capsys):
    folder = _source_dir(tmp_path, _notebook(("markdown", "# 1. Demo", None), ("code", GOOD, SOLUTION)))
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    with pytest.raises(AssignmentError, match="--out .*taken is a file, not a folder"):
        build(a_file, folder)
    before = (folder / "01_demo.ipynb").read_bytes()
    for out in (folder, folder / "student", folder / ".." / "src"):
        with pytest.raises(AssignmentError, match="refusing to write the student edition into"):
            build(out, folder)
    assert (folder / "01_demo.ipynb").read_bytes() == before and not (folder / "student").exists()
    # The repository's own notebooks/, by default and from the command line.
    with pytest.raises(AssignmentError, match="refusing"):
        build(NOTEBOOKS)
    assert main(["assignments", "build", "--out", str(NOTEBOOKS / "student")]) == 2
    assert "refusing to write the student edition" in capsys.readouterr().err
    assert main(["assignments", "build", "--out", str(a_file), "--source", str(folder)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_requested_notebooks_must_exist_and_hold_markers(tmp_path, capsys):
    folder = _source_dir(tmp_path, _notebook(("markdown", "# 1. Demo", None), ("code", GOOD, SOLUTION)))
    _source_dir(tmp_path, _notebook(("markdown", "# 2. Plain", None), ("code", "x = 1", None)), "02_plain.ipynb")
    built = build(tmp_path / "out", folder)  # all: the plain notebook is skipped
    assert [b.path.name for b in built] == ["01_demo.ipynb"]
    with pytest.raises(AssignmentError, match=r"02_plain.ipynb has no '### BEGIN SOLUTION' markers"):
        build(tmp_path / "out2", folder, notebooks=["2"])
    with pytest.raises(AssignmentError, match=r"no notebook '7' in .*\(there: 01_demo.ipynb, 02_plain.ipynb\)"):
        build(tmp_path / "out2", folder, notebooks=["7"])
    (folder / "03_broken.ipynb").write_text("{not json")
    with pytest.raises(AssignmentError, match=r"03_broken.ipynb: cannot read the notebook"):
        build(tmp_path / "out2", folder)
    with pytest.raises(AssignmentError, match="no notebooks folder"):
        build(tmp_path / "out2", tmp_path / "missing")
    assert main(["assignments", "build", "--out", str(tmp_path / "o"), "--source", str(folder),
                 "--notebooks", "02_plain"]) == 2
    assert "02_plain.ipynb has no '### BEGIN SOLUTION' markers" in capsys.readouterr().err


# ---------------------------------------------------------------------- #
# assignments check: run a folder of notebooks, report every check
# ---------------------------------------------------------------------- #
def test_check_command_reports_each_check_and_the_total(tmp_path, capsys):
    imports = "from dien_tutorial.checks import check_masked_softmax, reference_masked_softmax"
    passing = "print(check_masked_softmax(reference_masked_softmax))"
    stub = ("def mine(scores, mask):\n    raise NotImplementedError\n\n\nprint(check_masked_softmax(mine))")
    notebook = _notebook(("markdown", "# 1. Demo", None), ("code", imports, None),
                         ("code", passing, {**GRADED, "grade_id": "a", "points": 1}),
                         ("code", stub, {**GRADED, "grade_id": "b", "points": 2}),
                         ("code", "1 / 0", None),
                         ("code", "x = 1", {**GRADED, "grade_id": "c", "points": 1}))
    folder = tmp_path / "submission"
    folder.mkdir()
    (folder / "01_demo.ipynb").write_text(json.dumps(notebook))
    assert main(["assignments", "check", str(folder), "--timeout", "60"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "01_demo.ipynb"
    assert re.match(r"  a +1/1  PASSED +check_masked_softmax: 9 properties verified$", out[1])
    assert re.match(r"  b +0/2  FAILED +check_masked_softmax: the solution is not filled in yet", out[2])
    assert re.match(r"  c +0/1  NO REPORT +the cell printed no report", out[3])
    assert out[4] == "  error in cell 5: ZeroDivisionError: division by zero"
    assert out[-1] == "total: 1 of 4 points"
    with pytest.raises(AssignmentError, match="no notebooks"):
        assignments.grade(tmp_path / "submission" / "..")
