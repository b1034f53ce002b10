"""The student edition of the notebooks: ``dien_tutorial.assignments`` and ``assignments`` on the CLI.

The teacher's edition is ``notebooks/``: solutions between
``### BEGIN SOLUTION`` / ``### END SOLUTION`` and a check cell after each.
These tests build the student edition into a temporary folder, check what
it holds and what it no longer holds, grade it once (each notebook runs in
a fresh kernel with the released check cells put back: every check must
fail with "not filled in", and no other cell may raise), and feed the
builder and the grader broken or tampered notebooks, mostly tiny hand-made
ones that need no kernel.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from dien_tutorial import assignments
from dien_tutorial.assignments import AssignmentError, build, grade, read_checks
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
def graded(student) -> dict[str, assignments.GradedNotebook]:
    """The student edition as handed out, graded: each notebook run once (about a minute for the four)."""
    return {g.name: g for g in grade(student, timeout=120)}


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
def test_student_notebook_runs_top_to_bottom_with_the_stubs(graded, name):
    """Graded as handed out: 0 points, and only the hidden line of each check cell raises.

    The grader runs the student edition with the check cells put back as
    released; they differ from the handed-out ones by the hidden line
    only, so the edition students get runs with no error at all.
    """
    result = graded[name]
    notebook = result.executed
    functions, check_ids = EXERCISES[name]
    checks = [c for c in notebook["cells"] if _nbgrader(c).get("grade")]
    assert [_nbgrader(c)["grade_id"] for c in checks] == list(check_ids)
    for cell in checks:  # put back as released, hidden line included
        assert "### BEGIN HIDDEN TESTS\nreport.raise_if_failed()" in _source(cell)
    errors = [(i, o["ename"]) for i, c in enumerate(notebook["cells"]) for o in c.get("outputs", [])
              if o["output_type"] == "error"]
    assert [e for _, e in errors] == ["CheckFailed"] * len(check_ids)
    assert {i for i, _ in errors} == {i for i, c in enumerate(notebook["cells"]) if _nbgrader(c).get("grade")}
    for cell, function in zip(checks, functions):
        text = _text(cell)
        assert text.startswith(f"FAILED {CHECK_OF[function]}: the solution is not filled in yet: {function} "
                               "raised NotImplementedError.")
        assert f"Note: your {function} has not passed {CHECK_OF[function]} yet" in text
    # The cells after the checks ran with the package's versions, and got the book's results.
    assert DOWNSTREAM[name] in "".join(_text(c) for c in notebook["cells"] if c["cell_type"] == "code")
    assert [(r.grade_id, r.points, r.status) for r in result.checks] == [
        (g, p, "FAILED") for g, p in check_ids.items()]
    assert all(r.detail.startswith(f"{CHECK_OF[f]}: the solution is not filled in yet")
               for r, f in zip(result.checks, functions))
    assert sum(r.score for r in result.checks) == 0 and result.errors == ()


# ---------------------------------------------------------------------- #
# Bad input: clear errors that name the notebook and the cell
# ---------------------------------------------------------------------- #
def _notebook(*cells: tuple[str, str, dict | None], minor: int = 5) -> dict:
    """A small notebook from (cell_type, source, nbgrader metadata or None); no cell ids before nbformat 4.5."""
    out = []
    for k, (kind, source, meta) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"c{k}", "metadata": {"nbgrader": meta} if meta else {},
                "source": source}
        if minor < 5:
            del cell["id"]
        if kind == "code":
            cell.update(outputs=[], execution_count=None)
        out.append(cell)
    return {"cells": out, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                      "language": "python"}},
            "nbformat": 4, "nbformat_minor": minor}


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
    ([("code", "def f(x):\n    ### BEGIN SOLUTION\n    ### END SOLUTION", SOLUTION)],
     "cell 2 (code, id c1): the teacher's code does not compile (IndentationError"),
    ([("code", GOOD, SOLUTION), ("code", "if True:\n### BEGIN HIDDEN TESTS\n    assert f(1) == 2\n"
                                         "### END HIDDEN TESTS", GRADED)],
     "cell 3 (code, id c2): the student edition of this cell does not compile (IndentationError: expected an "
     "indented block after 'if' statement on line 1"),
    ([("code", GOOD, SOLUTION), ("code", "x = (1,", None)],
     "cell 3 (code, id c2): this cell does not compile (SyntaxError: '(' was never closed, line 1)"),
    ([("code", GOOD, {**SOLUTION, "solution": "false"})],
     'cell 2 (code, id c1): nbgrader "solution" is \'false\'; it must be true or false'),
    ([("code", GOOD, SOLUTION), ("code", "assert f(1) == 2", {**GRADED, "points": "lots"})],
     'cell 3 (code, id c2): nbgrader "points" is \'lots\'; a graded cell needs a number of 0 or more'),
    ([("code", GOOD, SOLUTION), ("code", "assert f(1) == 2", {**GRADED, "points": True})],
     'nbgrader "points" is True'),
    ([("code", GOOD, SOLUTION), ("code", "assert f(1) == 2", {**GRADED, "grade_id": "ex"})],
     "cell 3 (code, id c2): grade_id 'ex' is also the grade_id of cell 2; each must be unique in a notebook"),
    ([("code", GOOD, SOLUTION),
      ("code", "assert f(1) == 2", {k: v for k, v in GRADED.items() if k != "grade_id"})],
     'cell 3 (code, id c2): an nbgrader graded cell without a "grade_id"'),
    ([("code", GOOD, {k: v for k, v in SOLUTION.items() if k != "grade_id"})],
     'cell 2 (code, id c1): an nbgrader solution cell without a "grade_id"'),
    ([("code", GOOD, SOLUTION), ("markdown", "### BEGIN SOLUTION\nanswer\n### END SOLUTION",
                                 {**SOLUTION, "grade_id": "md"})],
     "cell 3 (markdown, id c2), line 1: '### BEGIN SOLUTION': markers belong in code cells only"),
], ids=["no-end", "no-begin", "nested", "hidden-in-solution", "mismatched-end", "markdown", "misspelt",
        "not-alone", "top-level", "top-level-if", "no-metadata", "metadata-no-markers", "hidden-not-graded",
        "empty-region", "student-cell-does-not-compile", "teacher-cell-does-not-compile", "solution-as-text",
        "points-as-text", "points-bool", "duplicate-grade-id", "graded-without-grade-id",
        "solution-without-grade-id", "marker-in-markdown-answer"])
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


@pytest.mark.parametrize(("change", "message"), [
    (lambda nb: nb["cells"].insert(1, None), "01_demo.ipynb, cell 2: null, not a JSON object"),
    (lambda nb: nb["cells"].insert(1, "text ### BEGIN SOLUTION"),
     "01_demo.ipynb, cell 2: a string, not a JSON object"),
    (lambda nb: nb["cells"][1].update(metadata=[]),
     'cell 2 (code, id c1): its "metadata" is a list, not a JSON object'),
    (lambda nb: nb["cells"][1].update(source=5), 'cell 2 (code, id c1): its "source" is a number: it must be'),
    (lambda nb: nb["cells"][1].update(source=[1, 2]), 'its "source" is a list with items that are not text'),
    (lambda nb: nb["cells"][1]["metadata"].update(nbgrader="solution"),
     "cell 2 (code, id c1): its nbgrader metadata is a string, not a JSON object"),
    (lambda nb: nb["cells"][1].update(cell_type="Code"),
     "cell 2: cell_type 'Code' is not one of code, markdown, raw"),
    (lambda nb: nb.update(cells={}), "01_demo.ipynb: not an nbformat 4 notebook"),
    (lambda nb: nb.update(nbformat=3, worksheets=[{"cells": nb.pop("cells")}]),
     "01_demo.ipynb: not an nbformat 4 notebook"),
    (lambda nb: nb.update(nbformat_minor="5"), "01_demo.ipynb: \"nbformat_minor\" is '5', not a whole number"),
], ids=["null-cell", "string-cell", "metadata-list", "source-int", "source-ints", "nbgrader-string",
        "cell-type", "cells-not-list", "nbformat-3", "minor-text"])
def test_malformed_notebooks_give_one_line_errors(tmp_path, capsys, change, message):
    """Malformed JSON structure: one line naming the notebook and cell, exit 2, nothing written, no traceback."""
    notebook = _notebook(("markdown", "# 1. Demo", None), ("code", GOOD, SOLUTION))
    change(notebook)
    folder = _source_dir(tmp_path, notebook)
    assert main(["assignments", "build", "--out", str(tmp_path / "out"), "--source", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("code", "stub"), [
    # The marker indented less, and the END more, than the code: the stub follows the code.
    ("def f(x):\n  ### BEGIN SOLUTION\n    return 2 * x\n        ### END SOLUTION",
     "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError(\"write f (see the text above)\")"),
    ("def f(x):\n### BEGIN SOLUTION\n    y = 2 * x\n    return y\n### END SOLUTION",
     "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError(\"write f (see the text above)\")"),
    # A signature over several lines, a docstring with a line at column 0, tabs, Windows line ends.
    ("def f(\n    x,\n    y=1,\n):\n    \"\"\"Doc\nat column 0.\n    \"\"\"\n    ### BEGIN SOLUTION\n    return x\n"
     "    ### END SOLUTION",
     "def f(\n    x,\n    y=1,\n):\n    \"\"\"Doc\nat column 0.\n    \"\"\"\n    # YOUR CODE HERE\n"
     "    raise NotImplementedError(\"write f (see the text above)\")"),
    ("def f(x):\n\t### BEGIN SOLUTION\n\treturn x\n\t### END SOLUTION",
     "def f(x):\n\t# YOUR CODE HERE\n\traise NotImplementedError(\"write f (see the text above)\")"),
    ("def f(x):\r\n    ### BEGIN SOLUTION\r\n    return x\r\n    ### END SOLUTION\r\n",
     "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError(\"write f (see the text above)\")\n"),
    # IPython syntax in the cell, and a decorated async function.
    ("%load_ext autoreload\n@staticmethod\nasync def f(x):\n    ### BEGIN SOLUTION\n    !echo hi\n"
     "    return x\n    ### END SOLUTION",
     "%load_ext autoreload\n@staticmethod\nasync def f(x):\n    # YOUR CODE HERE\n"
     "    raise NotImplementedError(\"write f (see the text above)\")"),
], ids=["marker-less-indented", "marker-at-column-0", "multiline-signature", "tabs", "crlf", "ipython"])
def test_stub_is_indented_like_the_code_and_compiles(tmp_path, code, stub):
    folder = _source_dir(tmp_path, _notebook(("markdown", "# 1. Demo", None), ("code", code, SOLUTION)))
    built = build(tmp_path / "out", folder)
    assert built[0].functions == ("f",)
    assert _source(_read(built[0].path)["cells"][2]) == stub


def test_text_answer_cells_become_a_placeholder(tmp_path, capsys):
    """A markdown cell with nbgrader "solution": true keeps no answer, as in nbgrader's student version."""
    answer = {"grade": True, "grade_id": "why", "locked": False, "points": 2, "schema_version": 3, "solution": True}
    notebook = _notebook(("markdown", "# 1. Demo", None), ("markdown", "Why does the gate matter?", None),
                         ("markdown", "Because SECRET_ANSWER.", answer))
    notebook["cells"][2]["attachments"] = {"a.png": {"image/png": "SECRET_IMAGE"}}
    folder = _source_dir(tmp_path, notebook)
    assert main(["assignments", "build", "--out", str(tmp_path / "out"), "--source", str(folder)]) == 0
    assert "01_demo.ipynb: answer 1 question (0 check cells)" in capsys.readouterr().out
    text = (tmp_path / "out" / "01_demo.ipynb").read_text()
    assert "SECRET" not in text
    cells = _read(tmp_path / "out" / "01_demo.ipynb")["cells"]
    assert _source(cells[3]) == "YOUR ANSWER HERE" and _nbgrader(cells[3]) == answer
    assert "YOUR ANSWER HERE" in _source(cells[1]) and cells[1]["id"] == assignments.NOTE_ID


def test_note_cell_ids_follow_the_notebook_version(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    old = _notebook(("markdown", "# 1. Demo", None), ("code", GOOD, SOLUTION), minor=4)
    taken = _notebook(("markdown", "# 2. Demo", None), ("code", GOOD, SOLUTION),
                      ("markdown", "text", None))
    taken["cells"][2]["id"] = assignments.NOTE_ID
    folder = _source_dir(tmp_path, old)
    _source_dir(tmp_path, taken, "02_demo.ipynb")
    build(tmp_path / "out", folder)
    cells = _read(tmp_path / "out" / "01_demo.ipynb")["cells"]
    assert _source(cells[1]).startswith("**Student edition.**") and all("id" not in c for c in cells)
    cells = _read(tmp_path / "out" / "02_demo.ipynb")["cells"]
    assert [c["id"] for c in cells] == ["c0", assignments.NOTE_ID + "-2", "c1", assignments.NOTE_ID]
    for name in ("01_demo.ipynb", "02_demo.ipynb"):
        nbformat.validate(nbformat.reads((tmp_path / "out" / name).read_text(), as_version=4))


def test_links_in_the_output_folder_are_never_written_through(tmp_path, capsys):
    folder = _source_dir(tmp_path, _notebook(("markdown", "# 1. Demo", None), ("code", GOOD, SOLUTION)))
    source = folder / "01_demo.ipynb"
    before = source.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "01_demo.ipynb").symlink_to(source)
    with pytest.raises(AssignmentError, match=r"refusing to write .*01_demo.ipynb: it is a symbolic link"):
        build(out, folder)
    (out / "01_demo.ipynb").unlink()
    os.link(source, out / "01_demo.ipynb")
    assert main(["assignments", "build", "--out", str(out), "--source", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"refusing to write {out / '01_demo.ipynb'}: it is the source notebook {source} under another name " \
           "(a hard link)" in err
    (out / "01_demo.ipynb").unlink()
    (out / "01_demo.ipynb").mkdir()
    with pytest.raises(AssignmentError, match="exists and is not a file"):
        build(out, folder)
    assert source.read_bytes() == before
    # A hard link to some other file is replaced by the new notebook, the other file stays as it was.
    (out / "01_demo.ipynb").rmdir()
    other = tmp_path / "other.ipynb"
    other.write_text("other")
    os.link(other, out / "01_demo.ipynb")
    build(out, folder)
    assert other.read_text() == "other" and "YOUR CODE HERE" in (out / "01_demo.ipynb").read_text()
    assert source.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["01_demo.ipynb"]


def test_a_failed_write_names_what_was_written(tmp_path, monkeypatch):
    folder = _source_dir(tmp_path, _notebook(("markdown", "# 1. Demo", None), ("code", GOOD, SOLUTION)))
    _source_dir(tmp_path, _notebook(("markdown", "# 2. Demo", None), ("code", GOOD, SOLUTION)), "02_demo.ipynb")
    replace = os.replace

    def failing(src, dst):
        if str(dst).endswith("02_demo.ipynb"):
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(assignments.os, "replace", failing)
    out = tmp_path / "out"
    with pytest.raises(AssignmentError) as caught:
        build(out, folder)
    assert str(caught.value) == (f"cannot write {out / '02_demo.ipynb'}: No space left on device; written before "
                                 f"it: {out / '01_demo.ipynb'}; the others were not")
    assert sorted(p.name for p in out.iterdir()) == ["01_demo.ipynb"]  # no temporary file left behind


def test_build_reports_notebooks_it_did_not_write(tmp_path, capsys):
    folder = _source_dir(tmp_path, _notebook(("markdown", "# 1. Demo", None), ("code", GOOD, SOLUTION)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "07_old.ipynb").write_text("{}")
    assert main(["assignments", "build", "--out", str(out), "--source", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == (f"note: {out / '07_old.ipynb'} was not written by this build and is left as it is "
                         "(delete it if it is out of date)")
    assert (out / "07_old.ipynb").read_text() == "{}"


# ---------------------------------------------------------------------- #
# assignments check: the released checks, and a verdict by raising
# ---------------------------------------------------------------------- #
DOUBLE = "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"
CHECK = ('ok = double(3) == 6\nprint("PASSED check_double: verified:" if ok else "FAILED check_double")\n'
         '### BEGIN HIDDEN TESTS\nassert ok, "double(3) is not 6"\n### END HIDDEN TESTS')


def _released(*checks: tuple[str, str, float]) -> dict:
    """A teacher's notebook: ``double`` to write, then check cells (grade_id, source, points)."""
    return _notebook(("markdown", "# Demo", None), ("code", DOUBLE, {**SOLUTION, "grade_id": "double"}),
                     *[("code", code, {**GRADED, "grade_id": gid, "points": pts}) for gid, code, pts in checks])


def test_prepare_submission_puts_back_the_released_check_cells():
    released = _released(("a", CHECK, 2), ("b", "assert double(0) == 0", 1), ("c", "assert double(1) == 2", 1))
    checks = assignments.released_checks(released, "01_demo.ipynb")
    submitted = _notebook(
        ("markdown", "# Demo", None),
        ("code", "def double(x):\n    print('PASSED check_double: verified:')", {**SOLUTION, "grade_id": "double"}),
        ("markdown", "print('PASSED')", {"grade_id": "a", "schema_version": 3}),  # check a: type and flags changed
        ("code", "pass", {**GRADED, "grade_id": "b"}),
        ("code", "pass", {**GRADED, "grade_id": "b"}),  # b twice, c deleted
        ("code", "print('mine')", {**GRADED, "grade_id": "extra"}))
    submitted["cells"][3]["metadata"]["tags"] = ["skip-execution"]
    submitted["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "PASSED check_double"}]
    prepared = assignments.prepare_submission(submitted, checks)
    cells = prepared.notebook["cells"]
    assert prepared.positions == {"a": [2], "b": [3, 4], "c": []}
    for index, grade_id in ((2, "a"), (3, "b"), (4, "b")):
        teacher = next(c for c in released["cells"] if _nbgrader(c).get("grade_id") == grade_id)
        assert cells[index]["cell_type"] == "code" and cells[index]["source"] == teacher["source"]
        assert cells[index]["metadata"] == teacher["metadata"]  # no skip-execution tag, grade: true again
    assert "### BEGIN HIDDEN TESTS\nassert ok" in cells[2]["source"]
    assert cells[1]["source"] == _source(submitted["cells"][1]) and cells[1]["outputs"] == []
    assert prepared.errors == ["cell 6: graded cell 'extra' is not a check of the released notebook; it was run "
                               "but not scored"]
    with pytest.raises(AssignmentError, match="not an nbformat 4 notebook"):
        assignments.prepare_submission({"nbformat": 3, "worksheets": []}, checks)


def test_grade_notebook_scores_by_whether_the_check_cell_raised(tmp_path, monkeypatch):
    """Printed text decides nothing: a cell that prints PASSED and raises scores 0, one that raises nothing
    scores its points; missing, repeated and unrun checks score 0. The kernel is replaced by a stand-in."""
    released = _released(("a", CHECK, 2), ("b", CHECK, 1), ("c", CHECK, 1), ("d", CHECK, 1), ("e", CHECK, 1),
                          ("f", CHECK, 1))
    released["cells"].append({"cell_type": "markdown", "id": "m", "source": "answer", "metadata": {"nbgrader": {
        "grade": True, "grade_id": "m", "locked": False, "points": 3, "schema_version": 3, "solution": True}}})
    checks = assignments.released_checks(released, "01_demo.ipynb")
    submitted = json.loads(json.dumps(released))
    del submitted["cells"][4]  # check c deleted
    submitted["cells"].insert(4, json.loads(json.dumps(submitted["cells"][3])))  # check b twice
    submitted["cells"].append({"cell_type": "code", "id": "z", "metadata": {}, "source": "1 / 0", "outputs": [],
                               "execution_count": None})
    path = tmp_path / "01_demo.ipynb"
    path.write_text(json.dumps(submitted))
    stream = {"output_type": "stream", "name": "stdout", "text": "PASSED check_double: verified:\n  - one\n  - two\n"}

    def error(name, value):
        return {"output_type": "error", "ename": name, "evalue": value, "traceback": []}

    def fake_run(notebook, folder, timeout):
        cells = notebook["cells"]
        index = {_nbgrader(c).get("grade_id"): i for i, c in enumerate(cells)}
        cells[index["a"]]["outputs"] = [stream, error("CheckFailed", "FAILED check_double: wrong\nmore")]
        cells[index["d"]]["outputs"] = [stream]
        cells[index["e"]]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "hello"},
                                        error("NameError", "name 'double' is not defined")]
        cells[-1]["outputs"] = [error("ZeroDivisionError", "division by zero")]
        replies = {i: "ok" for i in range(len(cells)) if cells[i]["cell_type"] == "code"}
        replies.update({index["a"]: "error", index["e"]: "error", len(cells) - 1: "error"})
        del replies[index["f"]]
        return notebook, replies, "the run stopped at cell 8: CellTimeoutError: A cell timed out"

    monkeypatch.setattr(assignments, "_run", fake_run)
    graded = assignments.grade_notebook(path, checks, timeout=5)
    assert [(r.grade_id, r.score, r.points, r.status, r.detail) for r in graded.checks] == [
        ("a", 0, 2, "FAILED", "check_double: wrong"),
        ("b", 0, 1, "DUPLICATE", "cells 4, 5 all carry this grade_id; a check counts once only"),
        ("c", 0, 1, "MISSING", "no cell with this grade_id in the submission (deleted?)"),
        ("d", 1, 1, "PASSED", "check_double: 2 properties verified"),
        ("e", 0, 1, "ERROR", "NameError: name 'double' is not defined"),
        ("f", 0, 1, "NOT RUN", "the run stopped before this cell"),
        ("m", 0, 3, "MANUAL", "graded by hand, not here"),
    ]
    assert graded.errors == ("cell 10: ZeroDivisionError: division by zero",
                             "the run stopped at cell 8: CellTimeoutError: A cell timed out")


def test_read_checks_needs_a_run_and_no_error():
    """Saved notebooks: a check cell that never ran, or shows an error, has not passed, whatever it printed."""
    notebook = _released(("a", CHECK, 2), ("b", CHECK, 1), ("c", CHECK, 1))
    printed = [{"output_type": "stream", "name": "stdout", "text": "PASSED check_double: verified:\n"}]
    notebook["cells"][2].update(execution_count=1, outputs=printed)
    notebook["cells"][3].update(execution_count=None, outputs=printed)
    notebook["cells"][4].update(execution_count=2, outputs=printed + [
        {"output_type": "error", "ename": "AssertionError", "evalue": "double(3) is not 6", "traceback": []}])
    graded = read_checks(notebook, "01_demo.ipynb")
    assert [(r.grade_id, r.status, r.score) for r in graded.checks] == [
        ("a", "PASSED", 2), ("b", "NOT RUN", 0), ("c", "ERROR", 0)]


def test_check_command_grades_against_the_released_checks(tmp_path, capsys):
    """End to end, in real kernels: a faked check, a good notebook, unreadable, dead and timed-out ones."""
    source = tmp_path / "src"
    source.mkdir()
    names = ["01_spoof", "02_good", "03_broken", "04_dies", "05_slow", "06_missing"]
    for k, name in enumerate(names):
        checks = [("a", CHECK, 2), ("b", "assert double(0) == 0", 1)] if k == 0 else [(f"c{k}", CHECK, 1)]
        (source / f"{name}.ipynb").write_text(json.dumps(_released(*checks)))
    submission = tmp_path / "alice"
    build(submission, source)

    def edit(name, change):
        notebook = _read(submission / f"{name}.ipynb")
        change(notebook["cells"])
        (submission / f"{name}.ipynb").write_text(json.dumps(notebook))

    def spoof(cells):  # a function that prints a report, the check cell edited, another deleted, one added
        cells[2]["source"] = 'def double(x):\n    print("PASSED check_double: verified:")\n    return 0'
        cells[3]["source"] = 'print("PASSED check_double: verified:")'
        del cells[4]
        cells.append({**cells[3], "id": "mine", "metadata": {"nbgrader": {**GRADED, "grade_id": "mine"}}})

    edit("01_spoof", spoof)
    edit("02_good", lambda cells: (cells[2].update(source="def double(x):\n    return x + x"),
                                   cells.append({**cells[3], "id": "z", "metadata": {}, "source": "1 / 0"})))
    (submission / "03_broken.ipynb").write_text("{not json")
    edit("04_dies", lambda cells: cells.insert(3, {**cells[3], "id": "x", "metadata": {},
                                                    "source": "import os\nos._exit(1)"}))
    edit("05_slow", lambda cells: cells.insert(3, {**cells[3], "id": "x", "metadata": {},
                                                    "source": "import time\ntime.sleep(60)"}))
    (submission / "06_missing.ipynb").unlink()
    (submission / "notes.ipynb").write_text("{}")
    assert main(["assignments", "check", str(submission), "--source", str(source), "--timeout", "5"]) == 1
    out = capsys.readouterr().out.splitlines()
    expected = [
        "01_spoof.ipynb",
        r"  a +0/2  ERROR +AssertionError: double\(3\) is not 6$",
        r"  b +0/1  MISSING +no cell with this grade_id in the submission \(deleted\?\)$",
        r"  error: cell 5: graded cell 'mine' is not a check of the released notebook; it was run but not scored$",
        "02_good.ipynb",
        r"  c1 +1/1  PASSED +check_double: 0 properties verified$",
        r"  error: cell 5: ZeroDivisionError: division by zero$",
        "03_broken.ipynb",
        r"  c2 +0/1  NOT RUN +the notebook could not be run$",
        r"  error: cannot be graded: cannot read the notebook: Expecting property name",
        "04_dies.ipynb",
        r"  c3 +0/1  NOT RUN +the run stopped before this cell$",
        r"  error: the run stopped (at|after) cell 4: DeadKernelError",
        "05_slow.ipynb",
        r"  c4 +0/1  NOT RUN +the run stopped before this cell$",
        r"  error: the run stopped at cell 4: CellTimeoutError",
        "06_missing.ipynb",
        r"  c5 +0/1  MISSING +the notebook is not in the submission$",
        r"  error: the notebook is not in the submission$",
        "notes.ipynb",
        "  not graded: the released edition has no check cells in a notebook of this name",
        "total: 1 of 8 points",
    ]
    assert len(out) == len(expected), out
    for line, pattern in zip(out, expected):
        assert re.match(pattern, line), (line, pattern)


def test_check_needs_a_folder_of_notebooks_and_a_released_edition(tmp_path):
    folder = tmp_path / "alice"
    folder.mkdir()
    with pytest.raises(AssignmentError, match="no notebooks"):
        grade(folder)
    (folder / "01_demo.ipynb").write_text("{}")
    with pytest.raises(AssignmentError, match="no notebooks folder at .*missing: pass --source"):
        grade(folder, source=tmp_path / "missing")
    plain = _source_dir(tmp_path, _notebook(("markdown", "# 1. Demo", None), ("code", "x = 1", None)))
    with pytest.raises(AssignmentError, match="no notebook in .* has check cells"):
        grade(folder, source=plain)
    with pytest.raises(AssignmentError, match="01_demo.ipynb has no check cells"):
        grade(folder, source=plain, notebooks=["1"])
