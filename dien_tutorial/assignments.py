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
stub indented like the region's first line of code, ::

        # YOUR CODE HERE
        raise NotImplementedError("write gru_step (see the text above)")

lines between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS`` are
removed, text cells marked as nbgrader solutions become ``YOUR ANSWER
HERE``, every output and execution count is cleared, and a short note
after the title lists what students write. Text, check cells and the
nbgrader cell metadata stay as they are. Every code cell of the result
must compile, and the output is the same, byte for byte, every time.

Every check cell calls :func:`dien_tutorial.checks.passed_or_reference`,
so a student edition runs top to bottom before anything is filled in: each
check reports FAILED ("not filled in yet") and the rest of the notebook
uses the package's version of the part.

:func:`grade` grades a folder of notebooks (a student's submission)
against the released edition: every check cell is put back as the
teacher wrote it, hidden tests included (matched by its nbgrader
``grade_id``), the notebook runs in a fresh kernel, and a check earns its
points when its cell raises nothing. What a cell prints decides nothing.

Command line: ``python -m dien_tutorial assignments build --out DIR`` and
``python -m dien_tutorial assignments check DIR``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import math
import os
import re
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "AssignmentError",
    "BuiltNotebook",
    "CheckResult",
    "GradedNotebook",
    "PreparedSubmission",
    "ReleasedCheck",
    "build",
    "default_source",
    "execute_notebook",
    "grade",
    "grade_notebook",
    "prepare_submission",
    "read_checks",
    "released_checks",
    "stale_notebooks",
    "student_edition",
]

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
STUB_COMMENT = "# YOUR CODE HERE"
ANSWER_PLACEHOLDER = "YOUR ANSWER HERE"  # what a text answer cell holds in the student edition, as in nbgrader
NOTE_ID = "student-edition-note"  # id of the note cell the student edition adds after the title

# Any line that looks like a marker, however many '#' or spaces it has: a
# misspelt BEGIN SOLUTION would otherwise hand the solution out.
_MARKER_LIKE = re.compile(r"#+\s*(BEGIN|END)\s+(SOLUTION|HIDDEN\s+TESTS)\b", re.IGNORECASE)
_PASSED_LINE = re.compile(r"^PASSED (check_\w+)")
_CELL_TYPES = ("code", "markdown", "raw")
_NBGRADER_FLAGS = ("solution", "grade", "locked")


class AssignmentError(ValueError):
    """Bad input for building or grading assignments; the message names the notebook and cell."""


# ---------------------------------------------------------------------- #
# Reading and validating a notebook
# ---------------------------------------------------------------------- #
def _source_text(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _where(name: str, index: int, cell: dict[str, Any]) -> str:
    """``notebook, cell 7 (code, id abc)``: cells counted from 1, as they appear on screen."""
    cell_id = f", id {cell['id']}" if cell.get("id") else ""
    return f"{name}, cell {index + 1} ({cell.get('cell_type', '?')}{cell_id})"


def _nbgrader(cell: dict[str, Any]) -> dict[str, Any]:
    """The cell's nbgrader metadata, or {} (also for metadata that is not a JSON object)."""
    metadata = cell.get("metadata", {})
    meta = metadata.get("nbgrader", {}) if isinstance(metadata, dict) else {}
    return meta if isinstance(meta, dict) else {}


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _check_structure(notebook: Any, name: str) -> None:
    """Raise :class:`AssignmentError` unless ``notebook`` is an nbformat 4 notebook whose cells are well formed.

    Checked: the top level, each cell's type, metadata and source, and its
    nbgrader metadata (booleans that are booleans, a ``grade_id`` on every
    solution or graded cell and each ``grade_id`` once, ``points`` a number
    of at least 0 on graded cells).
    """
    if (not isinstance(notebook, dict) or notebook.get("nbformat") != 4
            or not isinstance(notebook.get("cells"), list)):
        raise AssignmentError(f"{name}: not an nbformat 4 notebook (a JSON object with \"nbformat\": 4 and a "
                              "list of \"cells\"); open it in Jupyter and save it to convert it")
    minor = notebook.get("nbformat_minor", 0)
    if type(minor) is not int or minor < 0:
        raise AssignmentError(f"{name}: \"nbformat_minor\" is {minor!r}, not a whole number")
    if not isinstance(notebook.get("metadata", {}), dict):
        raise AssignmentError(f"{name}: the notebook's \"metadata\" is {_kind(notebook['metadata'])}, "
                              "not a JSON object")
    grade_ids: dict[str, int] = {}
    for index, cell in enumerate(notebook["cells"]):
        if not isinstance(cell, dict):
            raise AssignmentError(f"{name}, cell {index + 1}: {_kind(cell)}, not a JSON object")
        kind = cell.get("cell_type")
        if kind not in _CELL_TYPES:
            raise AssignmentError(f"{name}, cell {index + 1}: cell_type {kind!r} is not one of "
                                  f"{', '.join(_CELL_TYPES)}")
        where = _where(name, index, cell)
        if not isinstance(cell.get("metadata", {}), dict):
            raise AssignmentError(f"{where}: its \"metadata\" is {_kind(cell['metadata'])}, not a JSON object")
        source = cell.get("source", "")
        if not (isinstance(source, str)
                or (isinstance(source, list) and all(isinstance(line, str) for line in source))):
            raise AssignmentError(f"{where}: its \"source\" is {_kind(source)}"
                                  f"{' with items that are not text' if isinstance(source, list) else ''}"
                                  ": it must be a string or a list of strings")
        meta = cell.get("metadata", {}).get("nbgrader")
        if meta is None:
            continue
        if not isinstance(meta, dict):
            raise AssignmentError(f"{where}: its nbgrader metadata is {_kind(meta)}, not a JSON object")
        for flag in _NBGRADER_FLAGS:
            if flag in meta and not isinstance(meta[flag], bool):
                raise AssignmentError(f"{where}: nbgrader \"{flag}\" is {meta[flag]!r}; it must be true or "
                                      "false (JSON booleans, not text)")
        if "grade_id" in meta or meta.get("solution") or meta.get("grade"):
            grade_id = meta.get("grade_id")
            if not isinstance(grade_id, str) or not grade_id.strip():
                what = "graded " if meta.get("grade") else "solution " if meta.get("solution") else ""
                raise AssignmentError(f"{where}: an nbgrader {what}cell without a \"grade_id\" (it is "
                                      f"{grade_id!r}); nbgrader and 'assignments check' find each cell by it")
            if grade_id in grade_ids:
                raise AssignmentError(f"{where}: grade_id {grade_id!r} is also the grade_id of cell "
                                      f"{grade_ids[grade_id] + 1}; each must be unique in a notebook")
            grade_ids[grade_id] = index
        if meta.get("grade"):
            points = meta.get("points")
            if type(points) not in (int, float) or not math.isfinite(points) or points < 0:
                raise AssignmentError(f"{where}: nbgrader \"points\" is {points!r}; a graded cell needs a "
                                      "number of 0 or more")


def _read(path: Path) -> dict[str, Any]:
    """The parsed notebook at ``path``: a JSON object, whose structure :func:`_check_structure` checks."""
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise AssignmentError(f"{path}: cannot read the notebook: {err}") from None
    if not isinstance(notebook, dict):
        raise AssignmentError(f"{path}: not a Jupyter notebook (the file holds {_kind(notebook)}, "
                              "not a JSON object)")
    return notebook


def _is_assignment(notebook: dict[str, Any]) -> bool:
    """Whether a (checked) notebook holds anything for students: a marker, or something that looks like one
    (to be checked, not skipped), or an nbgrader solution or graded cell."""
    for cell in notebook["cells"]:
        meta = _nbgrader(cell)
        if meta.get("solution") or meta.get("grade") or _MARKER_LIKE.search(_source_text(cell)):
            return True
    return False


# ---------------------------------------------------------------------- #
# Python code of a cell: IPython syntax, compiling, enclosing functions
# ---------------------------------------------------------------------- #
def _python_text(code: str) -> str | None:
    """The cell's code as plain Python, as IPython runs it (magics and ``!`` lines become calls).

    Returns None for a cell magic (``%%bash`` ...), whose body need not be
    Python. Without IPython, magic and shell lines become ``pass``.
    """
    if code.lstrip().startswith("%%"):
        return None
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(code)
    except Exception:  # IPython comes with Jupyter, but a plain environment may lack it
        return "\n".join(re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in code.split("\n"))


def _parse(code: str) -> ast.Module | None:
    """The syntax tree of a code cell, or None for a cell magic; SyntaxError if it does not compile."""
    text = _python_text(code)
    if text is None:
        return None
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT  # IPython runs top-level await
    try:
        return compile(text, "<cell>", "exec", flags=flags, dont_inherit=True)
    except ValueError as err:  # null bytes
        raise SyntaxError(str(err)) from None


def _syntax_message(err: SyntaxError) -> str:
    line = f", line {err.lineno}" if err.lineno else ""
    return f"{type(err).__name__}: {err.msg}{line}"


def _functions(tree: ast.Module) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of every function, methods and nested ones included."""
    return [(node.lineno, node.end_lineno or node.lineno, node.name) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _enclosing_function(functions: list[tuple[int, int, str]], line: int) -> str | None:
    """The innermost function whose body holds ``line`` (counted from 1), or None."""
    holding = [(first, name) for first, last, name in functions if first < line <= last]
    return max(holding)[1] if holding else None


# ---------------------------------------------------------------------- #
# One notebook -> its student edition
# ---------------------------------------------------------------------- #
def _marker(line: str, where: str, number: int) -> str | None:
    """The marker ``line`` holds (one of the four), or None; anything marker-like but malformed is an error."""
    if not _MARKER_LIKE.search(line):
        return None
    text = line.strip()
    if text in (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN, END_HIDDEN):
        return text
    raise AssignmentError(
        f"{where}, line {number}: {text[:80]!r} looks like a marker but is not one: write it exactly as "
        f"'{BEGIN_SOLUTION}', '{END_SOLUTION}', '{BEGIN_HIDDEN}' or '{END_HIDDEN}', alone on its line")


def _regions(lines: list[str], where: str) -> list[tuple[str, int, int]]:
    """(BEGIN marker, its line index, the END's line index) of every region, after checking the markers."""
    regions: list[tuple[str, int, int]] = []
    open_marker: str | None = None
    open_at = 0
    for index, line in enumerate(lines):
        marker = _marker(line, where, index + 1)
        if marker is None:
            continue
        if marker in (BEGIN_SOLUTION, BEGIN_HIDDEN):
            if open_marker is not None:
                raise AssignmentError(f"{where}, line {index + 1}: '{marker}' inside the '{open_marker}' of line "
                                      f"{open_at + 1}: regions cannot be nested")
            open_marker, open_at = marker, index
            continue
        begin = BEGIN_SOLUTION if marker == END_SOLUTION else BEGIN_HIDDEN
        if open_marker != begin:
            found = f"; the open region is the '{open_marker}' of line {open_at + 1}" if open_marker else ""
            raise AssignmentError(f"{where}, line {index + 1}: '{marker}' without a '{begin}' before it{found}")
        regions.append((begin, open_at, index))
        open_marker = None
    if open_marker is not None:
        end = END_SOLUTION if open_marker == BEGIN_SOLUTION else END_HIDDEN
        raise AssignmentError(f"{where}, line {open_at + 1}: '{open_marker}' without an '{end}' after it")
    return regions


def _student_code(source: str, where: str) -> tuple[str, list[str], int, int]:
    """Replace solution regions by stubs and drop hidden tests.

    The stub of a region is indented like the region's first line of code
    (like its BEGIN marker if it has none), and names the innermost
    function around it, found in the syntax tree of the teacher's code.

    Returns the new source, the functions whose bodies became stubs, the
    number of solution regions and of hidden-test regions.
    """
    text = re.sub(r"\r\n?", "\n", source)  # the line ends Python accepts, as one
    lines = text.split("\n")
    regions = _regions(lines, where)
    if not regions:
        return source, [], 0, 0
    n_solutions = sum(1 for marker, _, _ in regions if marker == BEGIN_SOLUTION)
    functions_of_cell: list[tuple[int, int, str]] = []
    if n_solutions:
        try:
            tree = _parse(text)
        except SyntaxError as err:
            raise AssignmentError(f"{where}: the teacher's code does not compile ({_syntax_message(err)}), so "
                                  "its solution regions cannot be placed") from None
        if tree is None:
            raise AssignmentError(f"{where}: a solution region in a cell magic (%%) cell; put the solution in "
                                  "a plain Python cell")
        functions_of_cell = _functions(tree)
    replaced: dict[int, tuple[int, list[str]]] = {}  # first line index -> (last line index, new lines)
    functions: list[str] = []
    for marker, begin, end in regions:
        if marker == BEGIN_HIDDEN:
            replaced[begin] = (end, [])
            continue
        body = [k for k in range(begin + 1, end) if lines[k].strip() and not lines[k].lstrip().startswith("#")]
        anchor = body[0] if body else begin
        indent = lines[anchor][: len(lines[anchor]) - len(lines[anchor].lstrip())]
        function = _enclosing_function(functions_of_cell, anchor + 1)
        if function is None:
            raise AssignmentError(
                f"{where}, line {begin + 1}: a solution region outside a function body: the student edition "
                "would stop at this cell with NotImplementedError. Put the solution inside a function")
        functions.append(function)
        replaced[begin] = (end, [indent + STUB_COMMENT,
                                 indent + f'raise NotImplementedError("write {function} (see the text above)")'])
    out: list[str] = []
    index = 0
    while index < len(lines):
        if index in replaced:
            end, new = replaced[index]
            out += new
            index = end + 1
        else:
            out.append(lines[index])
            index += 1
    return "\n".join(out), functions, n_solutions, len(regions) - n_solutions


def _note_cell(functions: list[str], n_answers: int) -> dict[str, Any]:
    """The note the student edition adds after the title: what to write, and how the checks help."""
    parts = ["**Student edition.**"]
    if functions:
        names = [f"`{f}`" for f in dict.fromkeys(functions)]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        parts.append(f"In this notebook you write {listed}. In each of them, replace `# YOUR CODE HERE` and the "
                     "`raise NotImplementedError(...)` line below it with your code, run the cell, then run the "
                     "check cell that follows. A check that fails says which property broke, on which input. "
                     "Until your function passes, the notebook goes on with the package's version, so that "
                     "every cell runs.")
    if n_answers:
        cells = "the text cell that reads" if n_answers == 1 else f"each of the {n_answers} text cells that read"
        parts.append(f"Write your answer in {cells} {ANSWER_PLACEHOLDER} (double-click it to edit).")
    return {"cell_type": "markdown", "metadata": {}, "source": " ".join(parts)}


def student_edition(notebook: dict[str, Any], name: str) -> tuple[dict[str, Any], list[str]]:
    """The student edition of one notebook (a parsed ``.ipynb``), and the functions students write.

    ``notebook`` is left unchanged. ``name`` only labels error messages.

    Raises:
        AssignmentError: a notebook that is not nbformat 4 or has malformed
            cells or nbgrader metadata (see :func:`_check_structure`), a
            marker outside a code cell, unbalanced or nested markers, a
            solution region outside a function, solution or hidden-test
            regions in a cell without the matching nbgrader metadata, an
            nbgrader solution code cell without a region, or a code cell of
            the student edition that does not compile.
    """
    _check_structure(notebook, name)
    cells: list[dict[str, Any]] = []
    functions: list[str] = []
    n_answers = 0
    for index, cell in enumerate(notebook["cells"]):
        where = _where(name, index, cell)
        source = _source_text(cell)
        new = json.loads(json.dumps(cell))  # a deep copy of plain JSON
        meta = _nbgrader(cell)
        if cell["cell_type"] != "code":
            for number, line in enumerate(source.split("\n"), start=1):
                if _MARKER_LIKE.search(line):
                    raise AssignmentError(f"{where}, line {number}: {line.strip()[:80]!r}: markers belong in "
                                          "code cells only")
            new["source"] = source
            if meta.get("solution"):  # a text answer is the student's to write, as in nbgrader
                new["source"] = ANSWER_PLACEHOLDER
                new.pop("attachments", None)  # images pasted into the answer
                n_answers += 1
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
        try:
            _parse(code)
        except SyntaxError as err:
            what = "the student edition of this cell" if code != source else "this cell"
            raise AssignmentError(f"{where}: {what} does not compile ({_syntax_message(err)}); every code "
                                  "cell of the student edition must") from None
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
    if functions or n_answers:
        note = _note_cell(functions, n_answers)
        if notebook.get("nbformat_minor", 0) >= 5:  # cell ids exist from nbformat 4.5 on
            taken = {cell.get("id") for cell in cells}
            note_id, k = NOTE_ID, 1
            while note_id in taken:  # never a second cell with the same id
                k += 1
                note_id = f"{NOTE_ID}-{k}"
            note = {"cell_type": "markdown", "id": note_id, **note}
        at = 1 if cells and cells[0].get("cell_type") == "markdown" else 0
        cells.insert(at, note)
    edition = {key: json.loads(json.dumps(value)) for key, value in notebook.items() if key != "cells"}
    edition["cells"] = cells
    return edition, functions


def _notebook_text(notebook: dict[str, Any]) -> str:
    """The file text, in the layout Jupyter itself writes: sources as lists of lines, keys sorted."""
    cells = [{**cell, "source": _source_text(cell).splitlines(keepends=True)} for cell in notebook["cells"]]
    return json.dumps({**notebook, "cells": cells}, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


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
    answers: int = 0  # text cells students answer (nbgrader solution cells that are not code)


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


def _write_atomically(target: Path, text: str) -> None:
    """Write ``text`` to a new file next to ``target``, then rename it over ``target``.

    The rename replaces the directory entry: a symbolic or hard link that
    stood at ``target`` is replaced, never written through, and a reader
    sees the old file or the new one, never half of one.
    """
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    descriptor = os.open(temp, flags, 0o666)  # O_EXCL: never opens an existing file or link
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(text.encode("utf-8"))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _refuse_target(target: Path, sources: list[Path]) -> None:
    """Raise if writing ``target`` could touch a source notebook, or if it is not a plain file."""
    if target.is_symlink():
        raise AssignmentError(f"refusing to write {target}: it is a symbolic link (to {os.readlink(target)}). "
                              "Remove it, or choose another --out")
    if not target.exists():
        return
    if not target.is_file():
        raise AssignmentError(f"refusing to write {target}: it exists and is not a file (a folder?)")
    for source in sources:
        with contextlib.suppress(OSError):
            if os.path.samefile(target, source):
                raise AssignmentError(f"refusing to write {target}: it is the source notebook {source} under "
                                      "another name (a hard link). Remove it, or choose another --out")


def build(out: str | Path, source: str | Path | None = None,
          notebooks: Sequence[str] | None = None) -> list[BuiltNotebook]:
    """Write the student edition of the notebooks that hold solution markers or nbgrader cells.

    All or nothing: every notebook is read, checked and rendered in memory
    before the first file is written. Each file is written to a temporary
    file in ``out`` and renamed into place.

    Args:
        out: folder to write into (created if needed; notebooks of the same
            name in it are replaced, other files are left alone, see
            :func:`stale_notebooks`). It may not be the source folder, nor
            lie inside it.
        source: folder of the teacher's edition, ``notebooks/`` by default.
        notebooks: only these notebooks, by number (``2``, ``02``), stem
            (``02_gru_from_scratch``) or file name. A notebook named here
            must hold something for students; without it, notebooks without
            markers or nbgrader cells are skipped.

    Returns:
        One :class:`BuiltNotebook` per notebook written, in file order.

    Raises:
        AssignmentError: a malformed notebook, bad markers or metadata
            (naming the notebook and the cell), a source folder that is
            missing, an output path that is a file or inside the source
            folder, a target that is a symbolic link or a hard link to a
            source notebook, a requested notebook without markers or not
            found, or a failed write (naming the files written before it).
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
        _check_structure(notebook, path.name)
        if not _is_assignment(notebook):
            if notebooks is not None:
                raise AssignmentError(f"{path.name} has no '{BEGIN_SOLUTION}' markers: it has nothing for "
                                      "students to write")
            continue
        edition, functions = student_edition(notebook, path.name)
        checks = tuple(_nbgrader(c)["grade_id"] for c in edition["cells"] if c["cell_type"] == "code"
                       and _nbgrader(c).get("grade") and not _nbgrader(c).get("solution"))
        answers = sum(1 for c in notebook["cells"] if c["cell_type"] != "code" and _nbgrader(c).get("solution"))
        plans.append((path, _notebook_text(edition), tuple(functions), checks, answers))
    if not plans:
        raise AssignmentError(f"no notebook in {source} holds '{BEGIN_SOLUTION}' markers")
    all_sources = [p for p in source.glob("*.ipynb")]
    for path, *_ in plans:
        _refuse_target(out / path.name, all_sources)
    try:
        out.mkdir(parents=True, exist_ok=True)  # only once every notebook is known to be fine
    except OSError as err:
        raise AssignmentError(f"cannot create the folder --out {out}: {err.strerror or err}") from None
    built: list[BuiltNotebook] = []
    for path, text, functions, checks, answers in plans:
        target = out / path.name
        try:
            _write_atomically(target, text)
        except OSError as err:
            done = (f"written before it: {', '.join(str(b.path) for b in built)}; the others were not"
                    if built else "nothing was written")
            raise AssignmentError(f"cannot write {target}: {err.strerror or err}; {done}") from None
        built.append(BuiltNotebook(path, target, functions, checks, answers))
    return built


def stale_notebooks(out: str | Path, built: Sequence[BuiltNotebook]) -> list[Path]:
    """Notebooks in ``out`` that ``built`` did not write (left from an earlier build, say), in file order.

    :func:`build` removes nothing; the command line lists these so that a
    course folder does not keep an out-of-date notebook unnoticed.
    """
    written = {b.path.name for b in built}
    return sorted(p for p in Path(out).glob("*.ipynb") if p.name not in written)


# ---------------------------------------------------------------------- #
# Grading: the released check cells, run in the student's notebook
# ---------------------------------------------------------------------- #
@dataclass(frozen=True)
class ReleasedCheck:
    """A graded cell of the teacher's edition: its grade_id, points and the cell as the teacher wrote it.

    ``manual`` marks cells nbgrader grades by hand (graded answer cells,
    ``"solution": true``): they are listed, not scored.
    """

    grade_id: str
    points: float
    cell: dict[str, Any]
    manual: bool = False


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check cell (a cell with nbgrader ``"grade": true``)."""

    grade_id: str
    points: float
    # PASSED (the cell raised nothing), FAILED (it raised CheckFailed), ERROR (another exception),
    # NOT RUN, MISSING (no cell with this grade_id), DUPLICATE (several), MANUAL (graded by hand)
    status: str
    detail: str

    @property
    def score(self) -> float:
        return self.points if self.status == "PASSED" else 0.0

    @property
    def counted(self) -> bool:
        """Whether the points count towards the total (all but the cells graded by hand)."""
        return self.status != "MANUAL"


@dataclass(frozen=True)
class GradedNotebook:
    """A notebook's check verdicts, and its problems: cells that raised, a run that stopped, tampering."""

    name: str
    checks: tuple[CheckResult, ...]
    errors: tuple[str, ...] = field(default=())
    skipped: str = ""  # why the notebook was not graded, if it was not
    executed: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # as run, if it ran


def released_checks(notebook: dict[str, Any], name: str) -> list[ReleasedCheck]:
    """The graded cells of a teacher's notebook, in order; the notebook is checked as :func:`build` checks it."""
    student_edition(notebook, name)  # a released notebook is one the student edition can be built from
    checks = []
    for cell in notebook["cells"]:
        meta = _nbgrader(cell)
        if meta.get("grade"):
            manual = bool(meta.get("solution")) or cell["cell_type"] != "code"
            checks.append(ReleasedCheck(meta["grade_id"], float(meta["points"]), json.loads(json.dumps(cell)),
                                        manual))
    return checks


@dataclass
class PreparedSubmission:
    """A submission ready to run: its cells, where each released check is, and the problems found."""

    notebook: dict[str, Any]
    positions: dict[str, list[int]]  # grade_id -> indices of the cells that hold the released check
    errors: list[str]  # "cell N: ..." for graded cells that are not released checks


def prepare_submission(submitted: Any, checks: Sequence[ReleasedCheck]) -> PreparedSubmission:
    """The submitted notebook with every check cell put back as released.

    Each cell whose nbgrader ``grade_id`` is that of a released check is
    replaced by the teacher's cell (source with its hidden tests, metadata,
    type); outputs are cleared everywhere. A graded cell whose grade_id is
    not a released check is listed in ``errors`` (it is run, not scored).
    Missing and repeated checks are found from ``positions``.

    Raises:
        AssignmentError: the submission is not an nbformat 4 notebook with
            well-formed cells (it cannot be run as the released one).
    """
    if (not isinstance(submitted, dict) or submitted.get("nbformat") != 4
            or not isinstance(submitted.get("cells"), list)):
        raise AssignmentError("not an nbformat 4 notebook")
    automatic = {check.grade_id: check for check in checks if not check.manual}
    released_ids = {check.grade_id for check in checks}
    cells: list[dict[str, Any]] = []
    positions: dict[str, list[int]] = {grade_id: [] for grade_id in automatic}
    errors: list[str] = []
    for index, cell in enumerate(submitted["cells"]):
        if not isinstance(cell, dict) or cell.get("cell_type") not in _CELL_TYPES:
            raise AssignmentError(f"cell {index + 1} is not a notebook cell")
        source = cell.get("source", "")
        if not (isinstance(source, str) or (isinstance(source, list) and all(isinstance(s, str) for s in source))):
            raise AssignmentError(f"cell {index + 1}: its source is not text")
        meta = _nbgrader(cell)
        grade_id = meta.get("grade_id")
        if isinstance(grade_id, str) and grade_id in automatic:
            positions[grade_id].append(index)
            cell = automatic[grade_id].cell  # the teacher's cell, hidden tests included
        elif meta.get("grade") and grade_id not in released_ids:
            errors.append(f"cell {index + 1}: graded cell {grade_id!r} is not a check of the released notebook; "
                          "it was run but not scored")
        metadata = cell.get("metadata", {})
        new: dict[str, Any] = {"cell_type": cell["cell_type"],
                               "metadata": json.loads(json.dumps(metadata)) if isinstance(metadata, dict) else {},
                               "source": _source_text(cell)}
        if cell["cell_type"] == "code":
            new.update(outputs=[], execution_count=None)
        cells.append(new)
    metadata = submitted.get("metadata", {})
    notebook = {"cells": cells, "metadata": metadata if isinstance(metadata, dict) else {},
                "nbformat": 4, "nbformat_minor": 4}  # no cell ids needed to run it
    return PreparedSubmission(notebook, positions, errors)


def _run(notebook: dict[str, Any], folder: Path, timeout: int,
         kernel_name: str = "python3") -> tuple[Any, dict[int, str], str | None]:
    """Run a notebook in a fresh kernel, with ``folder`` as working directory.

    Returns the notebook with its outputs, the status of the kernel's reply
    to each cell that ran (cell index -> "ok" or "error"), and None or why
    the run stopped early (a cell over ``timeout`` seconds, a dead kernel).
    A cell that raises does not stop the run.
    """
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as err:  # the book's environment has both
        raise AssignmentError(f"running notebooks needs nbclient and nbformat: {err}") from None
    node = nbformat.from_dict(notebook)
    replies: dict[int, str] = {}
    started: list[int] = []

    def on_start(cell: Any, cell_index: int) -> None:
        started.append(cell_index)

    def on_reply(cell: Any, cell_index: int, execute_reply: dict[str, Any]) -> None:
        replies[cell_index] = str(execute_reply.get("content", {}).get("status"))

    # nbclient logs a dead kernel or a timeout as it raises it; the report says it once, in its own words.
    quiet = logging.getLogger(f"{__name__}.nbclient")
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
    client = NotebookClient(node, timeout=timeout, kernel_name=kernel_name, allow_errors=True,
                            on_cell_execute=on_start, on_cell_executed=on_reply, log=quiet,
                            resources={"metadata": {"path": str(folder.resolve())}})
    stopped = None
    try:
        # The kernel process's own log (not the cells' output) would interleave with the report.
        client.execute(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except Exception as err:  # a timeout, a dead kernel, a kernel that does not start: this notebook only
        first = (str(err).strip().splitlines() or [""])[0]
        if not started:
            where = "before its first cell"
        elif started[-1] in replies:
            where = f"after cell {started[-1] + 1}"
        else:
            where = f"at cell {started[-1] + 1}"
        stopped = f"the run stopped {where}: {type(err).__name__}: {first}".rstrip(": ")
    return node, replies, stopped


def _first_error(cell: dict[str, Any]) -> dict[str, Any] | None:
    return next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)


def _passed_detail(cell: dict[str, Any]) -> str:
    """What a passing check printed, for the listing only ("check_x: 6 properties verified")."""
    texts = [o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"]
    lines = [line for text in texts for line in ("".join(text) if isinstance(text, list) else text).splitlines()]
    at = max((k for k, line in enumerate(lines) if _PASSED_LINE.match(line)), default=None)
    if at is None:
        return "the check cell raised nothing"
    held = 0
    for line in lines[at + 1:]:
        if not line.startswith("  - "):
            break
        held += 1
    return f"{_PASSED_LINE.match(lines[at]).group(1)}: {held} properties verified"


def _verdict(cell: dict[str, Any], reply: str | None) -> tuple[str, str]:
    """PASSED only if the kernel replied "ok" to the check cell and no error was shown."""
    if reply is None:
        return "NOT RUN", "the cell did not run"
    error = _first_error(cell)
    if error is None and reply == "ok":
        return "PASSED", _passed_detail(cell)
    if error is None:
        return "ERROR", f"the kernel replied {reply!r}"
    message = (str(error.get("evalue", "")).strip().splitlines() or [""])[0]
    if error.get("ename") == "CheckFailed":
        return "FAILED", message.removeprefix("FAILED ")
    return "ERROR", f"{error.get('ename')}: {message}"


def _reply(cell: dict[str, Any], index: int, replies: dict[int, str] | None) -> str | None:
    """The kernel's reply status for a cell, or None if it did not run; a saved notebook has no replies,
    and there a cell ran if it has an execution count."""
    if replies is not None:
        return replies.get(index)
    return None if cell.get("execution_count") is None else "ok"


def _cell_errors(cells: list[Any], replies: dict[int, str] | None, skip: set[int]) -> list[str]:
    """``cell N: Error: message`` for every code cell outside ``skip`` that ran and raised."""
    errors = []
    for index, cell in enumerate(cells):
        if index in skip or not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        reply = _reply(cell, index, replies)
        if reply is not None and (reply != "ok" or _first_error(cell)):
            errors.append(f"cell {index + 1}: {_verdict(cell, reply)[1]}")
    return errors


def read_checks(notebook: dict[str, Any], name: str, replies: dict[int, str] | None = None) -> GradedNotebook:
    """The verdict of every check cell of a run notebook, and the errors of its other cells.

    A check passes when its cell ran and raised nothing, so this is only a
    grade for a notebook whose check cells are the released ones, hidden
    tests included (:func:`grade_notebook` puts them back; the teacher's
    edition has them). ``replies`` maps cell index to the kernel's reply
    status; without it, a cell ran if it has an execution count, as in a
    saved notebook.
    """
    cells = notebook.get("cells", [])
    checks, positions = [], set()
    for index, cell in enumerate(cells):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        meta = _nbgrader(cell)
        if not meta.get("grade") or meta.get("solution"):
            continue
        positions.add(index)
        status, detail = _verdict(cell, _reply(cell, index, replies))
        points = meta.get("points", 0)
        checks.append(CheckResult(str(meta.get("grade_id", f"cell {index + 1}")),
                                  float(points) if type(points) in (int, float) else 0.0, status, detail))
    return GradedNotebook(name, tuple(checks), tuple(_cell_errors(cells, replies, positions)))


def _all_lost(name: str, checks: Sequence[ReleasedCheck], status: str, detail: str, error: str) -> GradedNotebook:
    results = tuple(CheckResult(c.grade_id, c.points, "MANUAL" if c.manual else status,
                                "graded by hand, not here" if c.manual else detail) for c in checks)
    return GradedNotebook(name, results, (error,))


def grade_notebook(path: str | Path, checks: Sequence[ReleasedCheck], timeout: int = 120) -> GradedNotebook:
    """Grade one submitted notebook against the released checks of the notebook of the same name.

    The released check cells are put back (:func:`prepare_submission`),
    the notebook runs in a fresh ``python3`` kernel in its own folder, and
    each check earns its points if its cell raised nothing. A check cell
    that is missing, repeated or did not run scores 0. A notebook that
    cannot be read or run loses the points of every check that did not run;
    it never stops the grading of the others.
    """
    path = Path(path)
    try:
        prepared = prepare_submission(_read(path), checks)
    except AssignmentError as err:
        reason = str(err).removeprefix(f"{path}: ")
        return _all_lost(path.name, checks, "NOT RUN", "the notebook could not be run",
                         f"cannot be graded: {reason}")
    executed, replies, stopped = _run(prepared.notebook, path.parent, timeout)
    errors = list(prepared.errors)
    check_cells = {i for found in prepared.positions.values() for i in found}
    results = []
    for check in checks:
        found = prepared.positions.get(check.grade_id, [])
        if check.manual:
            results.append(CheckResult(check.grade_id, check.points, "MANUAL", "graded by hand, not here"))
        elif not found:
            results.append(CheckResult(check.grade_id, check.points, "MISSING",
                                       "no cell with this grade_id in the submission (deleted?)"))
        elif len(found) > 1:
            cells = ", ".join(str(i + 1) for i in found)
            results.append(CheckResult(check.grade_id, check.points, "DUPLICATE",
                                       f"cells {cells} all carry this grade_id; a check counts once only"))
        else:
            status, detail = _verdict(executed["cells"][found[0]], replies.get(found[0]))
            if status == "NOT RUN" and stopped:
                detail = "the run stopped before this cell"
            results.append(CheckResult(check.grade_id, check.points, status, detail))
    errors += _cell_errors(executed["cells"], replies, check_cells)
    if stopped:
        errors.append(stopped)
    return GradedNotebook(path.name, tuple(results), tuple(errors), executed=executed)


def _released(source: Path, notebooks: Sequence[str] | None) -> dict[str, list[ReleasedCheck]]:
    """The graded notebooks of the released edition: file name -> its checks."""
    if not source.is_dir():
        raise AssignmentError(f"no notebooks folder at {source}: pass --source, the folder of the teacher's "
                              "notebooks the student edition was built from")
    released = {}
    for path in _select(source, notebooks):
        notebook = _read(path)
        _check_structure(notebook, path.name)
        checks = released_checks(notebook, path.name) if _is_assignment(notebook) else []
        if checks:
            released[path.name] = checks
        elif notebooks is not None:
            raise AssignmentError(f"{path.name} has no check cells (nbgrader \"grade\": true): nothing to grade")
    if not released:
        raise AssignmentError(f"no notebook in {source} has check cells (nbgrader \"grade\": true)")
    return released


def grade(folder: str | Path, timeout: int = 120, source: str | Path | None = None,
          notebooks: Sequence[str] | None = None) -> list[GradedNotebook]:
    """Grade a folder of notebooks (a student's submission) against the released edition.

    Every notebook of ``source`` (the teacher's edition, ``notebooks/`` by
    default; only ``notebooks`` if given) that has check cells is graded
    with :func:`grade_notebook` from the file of the same name in
    ``folder``; a missing file loses all its points. Other notebooks in
    ``folder`` are listed as not graded. Results are in file order.

    This runs the code in the notebooks: grade submissions in an account or
    container that holds nothing else of value.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AssignmentError(f"{folder} is not a folder of notebooks")
    submitted = {p.name: p for p in folder.glob("*.ipynb") if p.is_file()}
    if not submitted:
        raise AssignmentError(f"no notebooks (*.ipynb) in {folder}")
    released = _released(Path(source) if source is not None else default_source(), notebooks)
    graded = []
    for name in sorted(set(released) | set(submitted)):
        if name not in released:
            graded.append(GradedNotebook(name, (), skipped="not graded: the released edition has no check "
                                                           "cells in a notebook of this name"))
        elif name not in submitted:
            graded.append(_all_lost(name, released[name], "MISSING", "the notebook is not in the submission",
                                    "the notebook is not in the submission"))
        else:
            graded.append(grade_notebook(submitted[name], released[name], timeout=timeout))
    return graded


def execute_notebook(path: str | Path, timeout: int = 120, kernel_name: str = "python3") -> dict[str, Any]:
    """Run a notebook top to bottom in a fresh kernel and return it with its outputs.

    The file is not written. A cell that raises does not stop the run (its
    error is kept in its outputs); a cell that runs longer than ``timeout``
    seconds, or a kernel that dies, does: :class:`AssignmentError`.
    """
    path = Path(path)
    notebook = _read(path)
    _check_structure(notebook, path.name)
    notebook = {**notebook, "cells": [{**c, "source": _source_text(c)} for c in notebook["cells"]]}
    executed, _, stopped = _run(notebook, path.parent, timeout, kernel_name)
    if stopped:
        raise AssignmentError(f"{path}: {stopped}")
    return executed


# ---------------------------------------------------------------------- #
# Command line: python -m dien_tutorial assignments ...
# ---------------------------------------------------------------------- #
def _cmd_build(args: argparse.Namespace) -> int:
    built = build(args.out, args.source, args.notebooks)
    for item in built:
        parts = [f"students write {', '.join(item.functions)}"] if item.functions else []
        if item.answers:
            parts.append(f"answer {item.answers} question{'s' if item.answers != 1 else ''}")
        print(f"wrote {item.path}: {' and '.join(parts)} "
              f"({len(item.checks)} check cell{'s' if len(item.checks) != 1 else ''})")
    for path in stale_notebooks(args.out, built):
        print(f"note: {path} was not written by this build and is left as it is (delete it if it is out of date)")
    return 0


def _short(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _cmd_check(args: argparse.Namespace) -> int:
    graded = grade(args.folder, timeout=args.timeout, source=args.source, notebooks=args.notebooks)
    total = scored = by_hand = 0.0
    clean = True
    for notebook in graded:
        print(notebook.name)
        if notebook.skipped:
            print(f"  {notebook.skipped}")
            continue
        for result in notebook.checks:
            score = f"{result.score:g}/{result.points:g}" if result.counted else f"-/{result.points:g}"
            if result.counted:
                total += result.points
                scored += result.score
                clean &= result.status == "PASSED"
            else:
                by_hand += result.points
            print(f"  {result.grade_id:<28} {score:>5}  {result.status:<9} {_short(result.detail)}")
        for error in notebook.errors:
            clean = False
            print(f"  error: {_short(error, 100)}")
    manual = f" ({by_hand:g} more are graded by hand)" if by_hand else ""
    print(f"total: {scored:g} of {total:g} points{manual}")
    return 0 if clean and total > 0 else 1


def add_subcommand(sub: Any) -> None:
    """Add ``assignments build`` and ``assignments check`` to the CLI's subparsers."""
    parser = sub.add_parser("assignments", help="student editions of the notebooks, and grading them",
                            description="Write the student edition of the notebooks (solutions replaced by "
                                        "stubs), or grade a folder of notebooks with the released checks.")
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
    run = commands.add_parser("check", help="grade a folder of notebooks with the released check cells "
                                            "(runs their code: use a sandbox for submissions)")
    run.add_argument("folder", help="folder of notebooks, e.g. a student's submission")
    run.add_argument("--source", default=None,
                     help="folder of the teacher's notebooks the student edition was built from (default: "
                          "this repository's notebooks/); its check cells are the ones run")
    run.add_argument("--notebooks", nargs="+", default=None, metavar="N",
                     help="grade only these notebooks: number (2), stem or file name (default: every "
                          "notebook of --source with check cells)")
    run.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    run.set_defaults(func=_cmd_check)
