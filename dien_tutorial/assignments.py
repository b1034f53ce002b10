"""Student editions of the notebooks, and grading them with the checks.

The notebooks in ``notebooks/`` are the teacher's edition: the book shows
them with every solution written out. In the code cells, the parts that
students write themselves stand between two marker lines, as nbgrader
writes them::

    def gru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
        \"\"\"One GRU step ...\"\"\"
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

:func:`build` writes the student edition: each solution region becomes a
stub with the same indentation, ::

        # YOUR CODE HERE
        raise NotImplementedError("write gru_step (see the text above)")

lines between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS`` are
removed, every output and execution count is cleared, and a short note
after the title lists the functions to write. Text, check cells and the
nbgrader cell metadata stay as they are. The output is the same, byte for
byte, every time.

Every check cell calls :func:`dien_tutorial.checks.passed_or_reference`,
so a student edition runs top to bottom before anything is filled in: each
check reports FAILED ("not filled in yet") and the rest of the notebook
uses the package's version of the part. :func:`grade` runs notebooks (a
student's submission, say) and reads the verdict of every check cell.

Command line: ``python -m dien_tutorial assignments build --out DIR`` and
``python -m dien_tutorial assignments check DIR``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "AssignmentError",
    "BuiltNotebook",
    "CheckResult",
    "GradedNotebook",
    "build",
    "default_source",
    "execute_notebook",
    "grade",
    "read_checks",
    "student_edition",
]

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
STUB_COMMENT = "# YOUR CODE HERE"
NOTE_ID = "student-edition-note"  # id of the note cell the student edition adds after the title

# Any line that looks like a marker, however many '#' or spaces it has: a
# misspelt BEGIN SOLUTION would otherwise hand the solution out.
_MARKER_LIKE = re.compile(r"#+\s*(BEGIN|END)\s+(SOLUTION|HIDDEN\s+TESTS)\b", re.IGNORECASE)
_DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(")
_REPORT = re.compile(r"^(PASSED|FAILED) (check_\w+)")


class AssignmentError(ValueError):
    """Bad input for building or grading assignments; the message names the notebook and cell."""


# ---------------------------------------------------------------------- #
# One notebook -> its student edition
# ---------------------------------------------------------------------- #
def _source_text(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _where(name: str, index: int, cell: dict[str, Any]) -> str:
    """``notebook, cell 7 (code, id abc)``: cells counted from 1, as they appear on screen."""
    cell_id = f", id {cell['id']}" if cell.get("id") else ""
    return f"{name}, cell {index + 1} ({cell.get('cell_type', '?')}{cell_id})"


def _marker(line: str, where: str, number: int) -> str | None:
    """The marker ``line`` holds (one of the four), or None; anything marker-like but malformed is an error."""
    if not _MARKER_LIKE.search(line):
        return None
    text = line.strip()
    if text in (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN, END_HIDDEN):
        return text
    raise AssignmentError(
        f"{where}, line {number}: {text!r} looks like a marker but is not one: write it exactly as "
        f"'{BEGIN_SOLUTION}', '{END_SOLUTION}', '{BEGIN_HIDDEN}' or '{END_HIDDEN}', alone on its line")


def _enclosing_function(lines: list[str], index: int, indent: str) -> str | None:
    """The name of the ``def`` whose body holds line ``index`` (indented by ``indent``), or None."""
    bound = len(indent)  # an enclosing statement is indented less than everything seen so far
    for line in reversed(lines[:index]):
        text = line.strip()
        level = len(line) - len(line.lstrip())
        if not text or text.startswith("#") or level >= bound:
            continue
        match = _DEF.match(line)
        if match:
            return match.group(2)
        bound = level  # an if, for, class ... : the def, if any, is further out
        if bound == 0:
            return None
    return None


def _student_code(source: str, where: str) -> tuple[str, list[str], int, int]:
    """Replace solution regions by stubs and drop hidden tests.

    Returns the new source, the functions whose bodies became stubs, the
    number of solution regions and of hidden-test regions.
    """
    lines = source.split("\n")
    out: list[str] = []
    functions: list[str] = []
    n_solutions = n_hidden = 0
    open_marker: str | None = None
    open_line = 0
    for number, line in enumerate(lines, start=1):
        marker = _marker(line, where, number)
        if marker is None:
            if open_marker is None:
                out.append(line)
            continue
        if marker in (BEGIN_SOLUTION, BEGIN_HIDDEN):
            if open_marker is not None:
                raise AssignmentError(f"{where}, line {number}: '{marker}' inside the '{open_marker}' of line "
                                      f"{open_line}: regions cannot be nested")
            open_marker, open_line = marker, number
            if marker == BEGIN_HIDDEN:
                n_hidden += 1
                continue
            n_solutions += 1
            indent = line[: len(line) - len(line.lstrip())]
            function = _enclosing_function(lines, number - 1, indent)
            if function is None:
                raise AssignmentError(
                    f"{where}, line {number}: a solution region outside a function body: the student edition "
                    "would stop at this cell with NotImplementedError. Put the solution inside a function")
            functions.append(function)
            out += [indent + STUB_COMMENT,
                    indent + f'raise NotImplementedError("write {function} (see the text above)")']
            continue
        begin = BEGIN_SOLUTION if marker == END_SOLUTION else BEGIN_HIDDEN
        if open_marker != begin:
            found = f"; the open region is the '{open_marker}' of line {open_line}" if open_marker else ""
            raise AssignmentError(f"{where}, line {number}: '{marker}' without a '{begin}' before it{found}")
        open_marker = None
    if open_marker is not None:
        end = END_SOLUTION if open_marker == BEGIN_SOLUTION else END_HIDDEN
        raise AssignmentError(f"{where}, line {open_line}: '{open_marker}' without an '{end}' after it")
    return "\n".join(out), functions, n_solutions, n_hidden


def _nbgrader(cell: dict[str, Any]) -> dict[str, Any]:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def _note_cell(functions: list[str]) -> dict[str, Any]:
    names = [f"`{f}`" for f in dict.fromkeys(functions)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    text = (f"**Student edition.** In this notebook you write {listed}. In each of them, replace "
            "`# YOUR CODE HERE` and the `raise NotImplementedError(...)` line below it with your code, run "
            "the cell, then run the check cell that follows. A check that fails says which property broke, "
            "on which input. Until your function passes, the notebook goes on with the package's version, so "
            "that every cell runs.")
    return {"cell_type": "markdown", "id": NOTE_ID, "metadata": {}, "source": text}


def student_edition(notebook: dict[str, Any], name: str) -> tuple[dict[str, Any], list[str]]:
    """The student edition of one notebook (a parsed ``.ipynb``), and the functions students write.

    ``notebook`` is left unchanged. ``name`` only labels error messages.

    Raises:
        AssignmentError: a marker outside a code cell, unbalanced or nested
            markers, a solution region outside a function, solution or
            hidden-test regions in a cell without the matching nbgrader
            metadata, or an nbgrader solution cell without a region.
    """
    if notebook.get("nbformat") != 4 or not isinstance(notebook.get("cells"), list):
        raise AssignmentError(f"{name}: not a version 4 Jupyter notebook")
    cells: list[dict[str, Any]] = []
    functions: list[str] = []
    for index, cell in enumerate(notebook["cells"]):
        where = _where(name, index, cell)
        source = _source_text(cell)
        new = json.loads(json.dumps(cell))  # a deep copy of plain JSON
        meta = _nbgrader(cell)
        if cell.get("cell_type") != "code":
            for number, line in enumerate(source.split("\n"), start=1):
                if _MARKER_LIKE.search(line):
                    raise AssignmentError(f"{where}, line {number}: {line.strip()!r}: markers belong in code "
                                          "cells only")
            new["source"] = source
            cells.append(new)
            continue
        code, names, n_solutions, n_hidden = _student_code(source, where)
        if n_solutions and not meta.get("solution"):
            raise AssignmentError(f"{where}: a solution region in a cell without nbgrader metadata "
                                  '"solution": true; nbgrader needs it, so the two editions would differ')
        if meta.get("solution") and not n_solutions:
            raise AssignmentError(f"{where}: an nbgrader solution cell without '{BEGIN_SOLUTION}' ... "
                                  f"'{END_SOLUTION}': mark the part students write")
        if n_hidden and not meta.get("grade"):
            raise AssignmentError(f"{where}: hidden tests in a cell without nbgrader metadata "
                                  '"grade": true; nbgrader accepts them only in graded cells')
        functions += names
        new["source"] = code
        new["outputs"] = []
        new["execution_count"] = None
        new_meta = new.setdefault("metadata", {})
        new_meta.pop("execution", None)  # run timestamps of the teacher's edition
        if meta.get("locked"):
            new_meta["editable"] = False  # what nbgrader's student version does with locked cells
            new_meta["deletable"] = False
        cells.append(new)
    if functions:
        at = 1 if cells and cells[0].get("cell_type") == "markdown" else 0
        cells.insert(at, _note_cell(functions))
    edition = {key: json.loads(json.dumps(value)) for key, value in notebook.items() if key != "cells"}
    edition["cells"] = cells
    return edition, functions


def _notebook_text(notebook: dict[str, Any]) -> str:
    """The file text, in the layout Jupyter itself writes: sources as lists of lines, keys sorted."""
    cells = [{**cell, "source": _source_text(cell).splitlines(keepends=True)} for cell in notebook["cells"]]
    return json.dumps({**notebook, "cells": cells}, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def _read(path: Path) -> dict[str, Any]:
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AssignmentError(f"{path}: cannot read the notebook: {err}") from None
    if not isinstance(notebook, dict):
        raise AssignmentError(f"{path}: not a Jupyter notebook")
    return notebook


def _has_markers(notebook: dict[str, Any]) -> bool:
    """Whether any cell holds a marker, or something that looks like one (to be checked, not skipped)."""
    return any(_MARKER_LIKE.search(_source_text(cell))
               for cell in notebook.get("cells", []) if isinstance(cell, dict))


# ---------------------------------------------------------------------- #
# Building the student edition
# ---------------------------------------------------------------------- #
@dataclass(frozen=True)
class BuiltNotebook:
    """One notebook of the student edition: where it came from, where it went, what students write."""

    source: Path
    path: Path
    functions: tuple[str, ...]
    checks: tuple[str, ...]  # grade_id of each graded (check) cell


def default_source() -> Path:
    """The ``notebooks/`` folder of this repository (the teacher's edition)."""
    return Path(__file__).resolve().parents[1] / "notebooks"


def _select(source: Path, wanted: Sequence[str] | None) -> list[Path]:
    """The notebooks of ``source`` named by ``wanted`` (numbers, stems or file names), or all."""
    available = sorted(p for p in source.glob("*.ipynb") if p.is_file())
    if wanted is None:
        return available
    chosen: list[Path] = []
    for item in wanted:
        text = str(item).strip()
        if text.isdigit():
            hits = [p for p in available if p.name.split("_", 1)[0].isdigit()
                    and int(p.name.split("_", 1)[0]) == int(text)]
        else:
            hits = [p for p in available if text in (p.name, p.stem)]
        if not hits:
            names = ", ".join(p.name for p in available) or "none"
            raise AssignmentError(f"no notebook {text!r} in {source} (there: {names})")
        chosen += [p for p in hits if p not in chosen]
    return sorted(chosen)


def build(out: str | Path, source: str | Path | None = None,
          notebooks: Sequence[str] | None = None) -> list[BuiltNotebook]:
    """Write the student edition of the notebooks that hold solution markers.

    Args:
        out: folder to write into (created if needed; files of the same
            name in it are replaced). It may not be the source folder, nor
            lie inside it.
        source: folder of the teacher's edition, ``notebooks/`` by default.
        notebooks: only these notebooks, by number (``2``, ``02``), stem
            (``02_gru_from_scratch``) or file name. A notebook named here
            must hold solution markers; without it, notebooks without
            markers are skipped.

    Returns:
        One :class:`BuiltNotebook` per notebook written, in file order.

    Raises:
        AssignmentError: bad markers or metadata (naming the notebook and
            the cell), a source folder that is missing, an output path that
            is a file or inside the source folder, or a requested notebook
            without markers or not found.
    """
    source = Path(source) if source is not None else default_source()
    if not source.is_dir():
        raise AssignmentError(f"no notebooks folder at {source}: pass --source")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AssignmentError(f"--out {out} is a file, not a folder")
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise AssignmentError(f"refusing to write the student edition into {out}: it is (inside) the source "
                              f"folder {source}, whose notebooks are the teacher's edition. Choose another --out")
    paths = _select(source, notebooks)
    plans = []
    for path in paths:
        notebook = _read(path)
        if not _has_markers(notebook):
            if notebooks is not None:
                raise AssignmentError(f"{path.name} has no '{BEGIN_SOLUTION}' markers: it has nothing for "
                                      "students to write")
            continue
        edition, functions = student_edition(notebook, path.name)
        checks = tuple(_nbgrader(c)["grade_id"] for c in edition["cells"]
                       if _nbgrader(c).get("grade") and "grade_id" in _nbgrader(c))
        plans.append((path, edition, tuple(functions), checks))
    if not plans:
        raise AssignmentError(f"no notebook in {source} holds '{BEGIN_SOLUTION}' markers")
    out.mkdir(parents=True, exist_ok=True)  # only once every notebook is known to be fine
    built = []
    for path, edition, functions, checks in plans:
        target = out / path.name
        target.write_text(_notebook_text(edition), encoding="utf-8")
        built.append(BuiltNotebook(path, target, functions, checks))
    return built


# ---------------------------------------------------------------------- #
# Running notebooks and reading their checks
# ---------------------------------------------------------------------- #
@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check cell (a cell with nbgrader ``"grade": true``)."""

    grade_id: str
    points: float
    status: str  # PASSED, FAILED, ERROR (the cell raised without a report) or NO REPORT (not run)
    detail: str  # the report's first line, or the error

    @property
    def score(self) -> float:
        return self.points if self.status == "PASSED" else 0.0


@dataclass(frozen=True)
class GradedNotebook:
    """A notebook's check verdicts and the errors of its other cells."""

    name: str
    checks: tuple[CheckResult, ...]
    errors: tuple[str, ...] = field(default=())  # "cell N: Error: message", cells that are not checks


def execute_notebook(path: str | Path, timeout: int = 120, kernel_name: str = "python3") -> dict[str, Any]:
    """Run a notebook top to bottom in a fresh kernel and return it with its outputs.

    The file is not written. A cell that raises does not stop the run (its
    error is kept in its outputs); a cell that runs longer than ``timeout``
    seconds does.
    """
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as err:  # the book's environment has both
        raise AssignmentError(f"running notebooks needs nbclient and nbformat: {err}") from None
    path = Path(path)
    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as err:  # nbformat raises several kinds for a bad file
        raise AssignmentError(f"{path}: cannot read the notebook: {err}") from None
    client = NotebookClient(notebook, timeout=timeout, kernel_name=kernel_name, allow_errors=True,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    client.execute()
    return notebook


def _output_text(output: dict[str, Any]) -> str:
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    else:
        text = output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


def read_checks(notebook: dict[str, Any], name: str) -> GradedNotebook:
    """The verdict of every check cell of an executed notebook, and the errors of its other cells."""
    checks, errors = [], []
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        meta = _nbgrader(cell)
        outputs = cell.get("outputs", [])
        failure = next((o for o in outputs if o.get("output_type") == "error"), None)
        error_text = f"{failure.get('ename')}: {failure.get('evalue')}" if failure else ""
        if not meta.get("grade"):
            if failure:
                errors.append(f"cell {index + 1}: {error_text}")
            continue
        lines = [line for o in outputs for line in _output_text(o).splitlines()]
        at = next((k for k, line in enumerate(lines) if _REPORT.match(line)), None)
        if at is not None:
            status, detail = lines[at].split(" ", 1)
            if status == "PASSED":  # "check_x: verified:" and one "  - property" line each
                held = sum(1 for line in lines[at + 1:] if line.startswith("  - "))
                detail = f"{detail.split(':', 1)[0]}: {held} properties verified"
        elif failure:
            status, detail = "ERROR", error_text
        else:
            status, detail = "NO REPORT", "the cell printed no report (was it run?)"
        grade_id = str(meta.get("grade_id", f"cell {index + 1}"))
        checks.append(CheckResult(grade_id, float(meta.get("points", 0)), status, detail))
    return GradedNotebook(name, tuple(checks), tuple(errors))


def grade(folder: str | Path, timeout: int = 120) -> list[GradedNotebook]:
    """Run every notebook of ``folder`` (file order) and read its checks.

    This runs the code in the notebooks: grade submissions in an account or
    container that holds nothing else of value.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AssignmentError(f"{folder} is not a folder of notebooks")
    paths = sorted(p for p in folder.glob("*.ipynb") if p.is_file())
    if not paths:
        raise AssignmentError(f"no notebooks (*.ipynb) in {folder}")
    graded = []
    for path in paths:
        try:
            notebook = execute_notebook(path, timeout=timeout)
        except AssignmentError:
            raise
        except Exception as err:  # a timeout or a dead kernel ends this notebook's run, not the grading
            graded.append(GradedNotebook(path.name, (), (f"the run stopped: {type(err).__name__}: {err}",)))
            continue
        graded.append(read_checks(notebook, path.name))
    return graded


# ---------------------------------------------------------------------- #
# Command line: python -m dien_tutorial assignments ...
# ---------------------------------------------------------------------- #
def _cmd_build(args: argparse.Namespace) -> int:
    built = build(args.out, args.source, args.notebooks)
    for item in built:
        print(f"wrote {item.path}: students write {', '.join(item.functions)} "
              f"({len(item.checks)} check cell{'s' if len(item.checks) != 1 else ''})")
    return 0


def _short(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _cmd_check(args: argparse.Namespace) -> int:
    graded = grade(args.folder, timeout=args.timeout)
    total = scored = 0.0
    clean = True
    for notebook in graded:
        print(notebook.name)
        for result in notebook.checks:
            total += result.points
            scored += result.score
            clean &= result.status == "PASSED"
            print(f"  {result.grade_id:<28} {result.score:g}/{result.points:g}  {result.status:<9} "
                  f"{_short(result.detail)}")
        if not notebook.checks:
            print("  no check cells")
        for error in notebook.errors:
            clean = False
            print(f"  error in {_short(error, 100)}")
    print(f"total: {scored:g} of {total:g} points")
    return 0 if clean else 1


def add_subcommand(sub: Any) -> None:
    """Add ``assignments build`` and ``assignments check`` to the CLI's subparsers."""
    parser = sub.add_parser("assignments", help="student editions of the notebooks, and grading them",
                            description="Write the student edition of the notebooks (solutions replaced by "
                                        "stubs), or run notebooks and report their checks.")
    commands = parser.add_subparsers(dest="assignments_command", required=True)
    make = commands.add_parser("build", help="write the student edition of the notebooks")
    make.add_argument("--out", default="student",
                      help="folder for the student notebooks (default: ./student)")
    make.add_argument("--source", default=None,
                      help="folder of the teacher's notebooks (default: this repository's notebooks/)")
    make.add_argument("--notebooks", nargs="+", default=None, metavar="N",
                      help="only these notebooks: number (2), stem or file name (default: every notebook "
                           "with solution markers)")
    make.set_defaults(func=_cmd_build)
    run = commands.add_parser("check", help="run the notebooks of a folder and report every check "
                                            "(runs their code: use a sandbox for submissions)")
    run.add_argument("folder", help="folder of notebooks, e.g. a student's submission")
    run.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    run.set_defaults(func=_cmd_check)
