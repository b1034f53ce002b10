"""Automatic checks for the pieces of DIEN you write yourself.

The notebooks ask you to write parts of DIEN by hand: a GRU step, a masked
softmax, an AUGRU step, the auxiliary loss, a negative sampler and the
history windows. Each part has a check here. Pass it your function::

    from dien_tutorial.checks import check_gru_cell

    check_gru_cell(gru_step)

The check runs your function on small seeded inputs, compares what it
returns with a reference and with the properties the part must have, and
gives back a :class:`CheckReport`. Shown at the end of a cell, or printed,
the report reads either ::

    PASSED check_gru_cell: verified:
      - returns h_new as a tensor [B, H], also for B = 1 ...
      - ...

or, at the first property that does not hold, ::

    FAILED check_gru_cell: property: h_new equals torch.nn.GRUCell ...
      input: B = 1, I = 1, H = 1: x [1, 1] = ...
      expected: ...
      got: ...
      hint: your h_new equals the step with r and z swapped ...

The input is the smallest one on which the property fails, printed in
full where it is small; ``report.inputs`` holds its tensors, so you can
run your function on them again. A hint appears when the result matches a
mistake we know. A function that still raises ``NotImplementedError`` gets
a FAILED report that says so, and any other exception a FAILED report
naming the exception and the input: a check never raises because of your
code, unless you ask it to with ``raise_on_fail=True`` (then a failure
raises :class:`CheckFailed`, an ``AssertionError``, as tests want).

The checks and the function each one expects:

========================  ===================================================  =======
check                     your function                                        chapter
========================  ===================================================  =======
check_history_windows     ``fn(frame, max_len) -> (start, end)``               1
check_negative_sampler    ``fn(positives, n_items, rng) -> negatives``         1
check_gru_cell            ``fn(x, h, weight_ih, weight_hh, bias_ih, bias_hh)`` 2
check_masked_softmax      ``fn(scores, mask) -> weights``                      3
check_augru_cell          ``fn(x, h, a, cell) -> h_new``                       3
check_aux_loss            ``fn(states, clicked, negatives, lengths, W)``       4
========================  ===================================================  =======

Each check's docstring gives the exact contract. Inputs are float64, so
that a real disagreement cannot hide behind rounding; a function that
computes in float32 still passes, since results are compared to within
``1e-6`` (``1e-5`` in the float32 runs). Every check uses its own random
generators and leaves the global random states of ``torch``, ``numpy``
and ``random`` as it found them, so adding a check cell to a notebook
changes no other number in it. Each check takes well under a second.

When a check fails, a notebook can still go on: ::

    report = check_gru_cell(gru_step)
    print(report)
    gru_step = passed_or_reference(report, gru_step, reference_gru_step)

:func:`passed_or_reference` gives back your function if the check passed.
Otherwise it prints a note and gives back the package's version of the
part (``reference_history_windows``, ``reference_sample_negatives``,
``reference_gru_step``, ``reference_masked_softmax``,
``reference_augru_step``, ``reference_aux_loss``), so that the cells
below still run. The student edition of the notebooks
(``python -m dien_tutorial assignments build``) relies on this: it runs
top to bottom before anything is filled in. Checking that stand-in again
gives a FAILED report that says so, never a PASSED one.
"""

from __future__ import annotations

import contextlib
import copy
import random
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dien_tutorial.data.samples import FIRST_ID, PAD, UNK, _run_starts
from dien_tutorial.layers import GRUCell, masked_softmax

__all__ = [
    "CheckFailed",
    "CheckReport",
    "check_augru_cell",
    "check_aux_loss",
    "check_gru_cell",
    "check_history_windows",
    "check_masked_softmax",
    "check_negative_sampler",
    "passed_or_reference",
    "reference_augru_step",
    "reference_aux_loss",
    "reference_gru_step",
    "reference_history_windows",
    "reference_masked_softmax",
    "reference_sample_negatives",
]

ATOL = 1e-6  # absolute tolerance of every float64 comparison
ATOL_FLOAT32 = 1e-5  # ... and of the runs on float32 inputs
DAY = 86_400  # seconds; the test logs stamp whole days, like the real data


# ---------------------------------------------------------------------- #
# The report
# ---------------------------------------------------------------------- #
class CheckFailed(AssertionError):
    """Raised by :meth:`CheckReport.raise_if_failed` (and ``raise_on_fail=True``)."""


@dataclass
class CheckReport:
    """The outcome of one check.

    Attributes:
        name: the check, e.g. ``"check_gru_cell"``.
        passed: True when every property held.
        verified: the properties that held, in the order they were checked.
        failure: None, or the message: which property failed, on what
            input, what was expected and what the function gave.
        failed_property: None, or the property that failed.
        inputs: None, or the inputs of the failing case (tensors, arrays or
            a frame), to run the function on them again.
    """

    name: str
    passed: bool
    verified: list[str] = field(default_factory=list)
    failure: str | None = None
    failed_property: str | None = None
    inputs: dict[str, Any] | None = field(default=None, repr=False)

    def __str__(self) -> str:
        if self.passed:
            return "\n".join([f"PASSED {self.name}: verified:", *(f"  - {p}" for p in self.verified)])
        return f"FAILED {self.name}: {self.failure}"

    __repr__ = __str__

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How IPython and Jupyter show a report that ends a cell."""
        printer.text(str(self))

    def __bool__(self) -> bool:
        return self.passed

    def raise_if_failed(self) -> None:
        """Raise :class:`CheckFailed` with the report's text if the check failed."""
        if not self.passed:
            raise CheckFailed(str(self))


# ---------------------------------------------------------------------- #
# Running a check: properties in order, the first failure ends it
# ---------------------------------------------------------------------- #
class _Failure(Exception):
    """A property does not hold (raised inside a check, turned into a report).

    ``prop`` names the property that failed when it is not the one being
    checked: a check that watches every call for changed inputs reports
    that property at the first call that changes one.
    """

    def __init__(self, input: str, expected: str, got: str, hint: str | None = None,
                 inputs: dict[str, Any] | None = None, prop: str | None = None) -> None:
        super().__init__(got)
        self.input, self.expected, self.got, self.hint, self.inputs = input, expected, got, hint, inputs
        self.prop = prop


class _NotFilledIn(Exception):
    """The student's function raised NotImplementedError."""


class _Student:
    """The function under test; every call goes through :meth:`call`."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", "your function")

    def call(self, input: str, *args: Any, inputs: dict[str, Any] | None = None) -> Any:
        """Call the function; an exception becomes a failure that names the input."""
        try:
            return self.fn(*args)
        except NotImplementedError:
            raise _NotFilledIn() from None
        except Exception as err:  # the student's code failed: report it, never crash the notebook
            raise _Failure(input, "a result, without an exception",
                           f"{type(err).__name__}: {err}", inputs=inputs) from None


@contextlib.contextmanager
def _preserved_random_state() -> Iterator[None]:
    """Restore the global random states of torch, numpy and random afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _indent(text: str, prefix: str = "      ") -> str:
    return textwrap.indent(text, prefix)


def _field(label: str, text: str) -> str:
    """One ``label: text`` line of a failure message; long text on its own lines."""
    if "\n" in text:
        return f"  {label}:\n{_indent(text)}"
    return f"  {label}: {text}"


def _failure_text(prop: str, failure: _Failure, n_verified: int) -> str:
    lines = [f"property: {prop}", _field("input", failure.input),
             _field("expected", failure.expected), _field("got", failure.got)]
    if failure.hint:
        lines.append(_field("hint", failure.hint))
    tail = f"  ({n_verified} propert{'y' if n_verified == 1 else 'ies'} held before this one"
    tail += "; report.inputs holds this input)" if failure.inputs else ")"
    lines.append(tail)
    return "\n".join(lines)


Property = tuple[str, Callable[[_Student], None]]


def _run(name: str, fn: Callable[..., Any], properties: list[Property], raise_on_fail: bool) -> CheckReport:
    """Check ``properties`` in order; stop at the first that fails."""
    if not callable(fn):
        raise TypeError(f"{name} takes your function, got a {type(fn).__name__}")
    replaced = getattr(fn, _STAND_IN, None)
    if replaced is not None:  # passed_or_reference put the package's version in place of the student's
        report = CheckReport(name, False, [], _stand_in_text(fn, replaced), "the function checked is yours")
        if raise_on_fail:
            report.raise_if_failed()
        return report
    student = _Student(fn)
    verified: list[str] = []
    report = None
    with _preserved_random_state():
        for prop, test in properties:
            try:
                test(student)
            except _NotFilledIn:
                text = (f"the solution is not filled in yet: {student.name} raised NotImplementedError. "
                        "Write the function in place of the `raise NotImplementedError` line, run its cell, "
                        "then run this check again.")
                report = CheckReport(name, False, verified, text, "the solution is filled in")
            except _Failure as failure:
                failed = failure.prop or prop
                report = CheckReport(name, False, verified, _failure_text(failed, failure, len(verified)),
                                     failed, failure.inputs)
            except Exception as err:  # the check could not read what the function returned
                failure = _Failure("see the property", "a result of the documented type and shape",
                                   f"a result the check could not use ({type(err).__name__}: {err})")
                report = CheckReport(name, False, verified, _failure_text(prop, failure, len(verified)), prop)
            if report is not None:
                break
            verified.append(prop)
    if report is None:
        report = CheckReport(name, True, verified)
    if raise_on_fail:
        report.raise_if_failed()
    return report


# ---------------------------------------------------------------------- #
# Formatting and comparing results
# ---------------------------------------------------------------------- #
def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _fmt(x: Any, decimals: int = 4) -> str:
    """A tensor or array as text, rounded."""
    arr = _numpy(x)
    if arr.dtype.kind == "f" and arr.ndim == 0:
        return f"{arr.item():.{decimals}f}"
    if arr.dtype.kind == "f":
        return np.array2string(arr, precision=decimals, floatmode="fixed", suppress_small=True,
                               separator=", ", max_line_width=96, threshold=200)
    return np.array2string(arr, separator=", ", max_line_width=96, threshold=200)


def _shape(x: Tensor) -> str:
    return str(list(x.shape))


def _tensor_text(name: str, x: Tensor) -> str:
    """``name [shape] = values`` (values on the next lines when 2-D or more)."""
    values = _fmt(x)
    sep = "\n" if "\n" in values else " "
    return f"{name} {_shape(x)} ={sep}{values}"


def _as_tensor(out: Any, input: str, what: str, inputs: dict[str, Any] | None = None) -> Tensor:
    """The function's result as a tensor, or a failure saying what came back."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (np.ndarray, np.generic, float, int)) and not isinstance(out, bool):
        return torch.as_tensor(out)
    raise _Failure(input, f"{what} as a torch.Tensor", f"a {type(out).__name__}", inputs=inputs)


def _expect_shape(out: Tensor, shape: tuple[int, ...], input: str, inputs: dict[str, Any]) -> None:
    if tuple(out.shape) != shape:
        hint = None
        if out.numel() == int(np.prod(shape)):
            hint = ("same number of values, different shape: did a .squeeze() drop the batch "
                    "dimension of size 1, or a .view() reorder it?")
        raise _Failure(input, f"a tensor of shape {list(shape)}", f"shape {list(out.shape)}", hint, inputs)


def _max_diff(got: Tensor, expected: Tensor) -> float:
    return float((got.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs().max())


def _close(got: Tensor, expected: Tensor, atol: float = ATOL) -> bool:
    """Equal to within ``atol``, NaN never equal."""
    if tuple(got.shape) != tuple(expected.shape):
        return False
    diff = (got.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    return bool(torch.isfinite(diff).all() and (diff <= atol).all())


def _got_text(got: Tensor, expected: Tensor) -> str:
    text = _fmt(got)
    if tuple(got.shape) == tuple(expected.shape):
        diff = _max_diff(got, expected)
        note = f"(largest |got - expected| = {diff:.3g})"
        text += f"\n{note}" if "\n" in text else f"  {note}"
    return text


def _which_mistake(got: Tensor, variants: dict[str, Tensor], atol: float = ATOL) -> str | None:
    """The first known mistake whose result equals ``got``, as a hint."""
    for description, value in variants.items():
        if _close(got, value, atol):
            return description
    return None


def _clones(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _unchanged(before: dict[str, Tensor], after: dict[str, Any]) -> str | None:
    """The name of the first tensor that changed (values, dtype, shape, or replaced), if any."""
    for name, value in before.items():
        other = after.get(name)
        if (not isinstance(other, Tensor) or other.dtype != value.dtype or other.shape != value.shape
                or not torch.equal(value, other.detach())):
            return name
    return None


def _change_text(name: str, before: Tensor, after: Any) -> str:
    """How ``after`` differs from ``before``, for a failure message."""
    if not isinstance(after, Tensor):
        return f"{name} was replaced by a {type(after).__name__}"
    if after.dtype != before.dtype:
        return f"{name} was changed in place: its dtype went from {before.dtype} to {after.dtype}"
    if after.shape != before.shape:
        return f"{name} was changed in place: its shape went from {list(before.shape)} to {list(after.shape)}"
    return f"{name} was modified in place"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _uniform(gen: torch.Generator, *shape: int, low: float = -1.0, high: float = 1.0) -> Tensor:
    return torch.rand(*shape, generator=gen, dtype=torch.float64) * (high - low) + low


# ---------------------------------------------------------------------- #
# GRU step
# ---------------------------------------------------------------------- #
_GRU_SHAPES = ((1, 1, 1), (1, 3, 4), (4, 3, 5), (3, 6, 2))  # (B, I, H), smallest first
_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _gru_inputs(seed: int, batch: int, input_size: int, hidden: int) -> dict[str, Tensor]:
    """Random x, h and GRU weights, larger than PyTorch's init so that bugs show."""
    gen = _gen(seed)
    return {
        "x": _randn(gen, batch, input_size),  # [B, I]
        "h": _uniform(gen, batch, hidden),  # [B, H], in the range of tanh
        "weight_ih": _randn(gen, 3 * hidden, input_size, scale=0.8),  # [3H, I], rows r, z, n
        "weight_hh": _randn(gen, 3 * hidden, hidden, scale=0.8),  # [3H, H]
        "bias_ih": _randn(gen, 3 * hidden, scale=0.5),  # [3H]
        "bias_hh": _randn(gen, 3 * hidden, scale=0.5),  # [3H]
    }


def _torch_cell(weights: dict[str, Tensor]) -> nn.GRUCell:
    """A ``torch.nn.GRUCell`` holding ``weights`` (its own init is overwritten)."""
    three_h, input_size = weights["weight_ih"].shape
    with _preserved_random_state():  # the module's own init draws from the global generator
        cell = nn.GRUCell(input_size, three_h // 3, dtype=weights["weight_ih"].dtype)
    with torch.no_grad():
        for name in _WEIGHT_NAMES:
            getattr(cell, name).copy_(weights[name])
    return cell


def _gru_parts(x: Tensor, h: Tensor, w: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Reset gate r, keep gate z (PyTorch's) and candidate n of one GRU step, each [B, H]."""
    i_r, i_z, i_n = F.linear(x, w["weight_ih"], w["bias_ih"]).chunk(3, dim=-1)  # 3 x [B, H]
    h_r, h_z, h_n = F.linear(h, w["weight_hh"], w["bias_hh"]).chunk(3, dim=-1)  # 3 x [B, H]
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    return r, z, torch.tanh(i_n + r * h_n)


def _gru_mistakes(x: Tensor, h: Tensor, w: dict[str, Tensor]) -> dict[str, Tensor]:
    """Results of GRU steps with a known mistake, for hints."""
    i_r, i_z, i_n = F.linear(x, w["weight_ih"], w["bias_ih"]).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w["weight_hh"], w["bias_hh"]).chunk(3, dim=-1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    swapped_n = torch.tanh(i_n + z * h_n)  # r and z swapped: z resets, r keeps
    W_hn, b_hn = w["weight_hh"].chunk(3)[2], w["bias_hh"].chunk(3)[2]
    reset_first = torch.tanh(i_n + F.linear(r * h, W_hn, b_hn))
    bias_outside = torch.tanh(i_n + r * (h_n - b_hn) + b_hn)
    return {
        "the step with r and z swapped (rows 0..H-1 are r, H..2H-1 are z, in PyTorch's order r, z, n)":
            (1 - r) * swapped_n + r * h,
        "the step with h_new = z * n + (1 - z) * h: PyTorch's z is the KEEP gate, so "
        "h_new = (1 - z) * n + z * h":
            z * n + (1 - z) * h,
        "the reset gate applied before the product, W_hn (r * h) + b_hn: PyTorch computes "
        "r * (W_hn h + b_hn)": (1 - z) * reset_first + z * h,
        "b_hn added outside the reset gate: PyTorch keeps it inside, r * (W_hn h + b_hn)":
            (1 - z) * bias_outside + z * h,
        "the candidate n itself: the blend with the old state h is missing": n,
    }


def _gru_input_text(case: dict[str, Tensor]) -> str:
    batch, input_size = case["x"].shape
    hidden = case["h"].shape[1]
    head = f"B = {batch}, I = {input_size}, H = {hidden}"
    parts = [_tensor_text("x", case["x"]), _tensor_text("h", case["h"])]
    if sum(t.numel() for t in case.values()) <= 40:
        parts += [_tensor_text(name, case[name]) for name in _WEIGHT_NAMES]
    else:
        parts.append("weight_ih [3H, I], weight_hh [3H, H], bias_ih [3H], bias_hh [3H]: random, "
                     "rows in PyTorch's order r, z, n")
    return head + "\n" + "\n".join(parts)


def _gru_state(out: Any, input: str, inputs: dict[str, Any]) -> Tensor:
    """h_new from a return of h_new or (h_new, gates)."""
    if isinstance(out, (tuple, list)):
        if not out:
            raise _Failure(input, "h_new or (h_new, gates)", "an empty tuple", inputs=inputs)
        out = out[0]
    return _as_tensor(out, input, "h_new", inputs)


def check_gru_cell(gru_step: Callable[..., Any], raise_on_fail: bool = False) -> CheckReport:
    """Check a hand-written GRU step against ``torch.nn.GRUCell`` (chapter 2).

    Your function: ``gru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh)``
    with ``x [B, I]``, ``h [B, H]``, ``weight_ih [3H, I]``,
    ``weight_hh [3H, H]``, ``bias_ih [3H]``, ``bias_hh [3H]`` (rows in
    PyTorch's order r, z, n), returning ``h_new [B, H]`` or
    ``(h_new, gates)``; only ``h_new`` is checked.

    Args:
        gru_step: your function.
        raise_on_fail: raise :class:`CheckFailed` instead of returning a
            failed report.
    """
    cases = [_gru_inputs(10 + k, *shape) for k, shape in enumerate(_GRU_SHAPES)]

    def h_new_of(student: _Student, case: dict[str, Tensor]) -> Tensor:
        text = _gru_input_text(case)
        out = student.call(text, *_clones(case).values(), inputs=case)
        return _gru_state(out, text, case)

    def returns_state(student: _Student) -> None:
        for case in cases:
            h_new = h_new_of(student, case)
            _expect_shape(h_new, tuple(case["h"].shape), _gru_input_text(case), case)

    def equals_torch(student: _Student) -> None:
        for case in cases:
            got = h_new_of(student, case).detach()
            expected = _torch_cell(case)(case["x"], case["h"]).detach()
            if not _close(got, expected):
                hint = _which_mistake(got, _gru_mistakes(case["x"], case["h"], case))
                raise _Failure(_gru_input_text(case), _fmt(expected), _got_text(got, expected),
                               f"your h_new equals {hint}" if hint else None, case)

    def equals_torch_gru_sequence(student: _Student) -> None:
        gen = _gen(20)
        steps = 4
        case = _gru_inputs(21, 2, 3, 4)
        xs = _randn(gen, 2, steps, 3)  # [B, T, I]
        with _preserved_random_state():
            gru = nn.GRU(3, 4, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            for name in _WEIGHT_NAMES:
                getattr(gru, name + "_l0").copy_(case[name])
            expected, _ = gru(xs, case["h"].unsqueeze(0))  # [B, T, H]
        h = case["h"]
        text = (f"a sequence xs [2, {steps}, 3] run step by step from h_0 = h, B = 2, I = 3, H = 4\n"
                + _tensor_text("h_0", case["h"]))
        inputs = {**case, "xs": xs}
        for t in range(steps):
            step_case = {**case, "x": xs[:, t], "h": h}
            out = student.call(text, *_clones(step_case).values(), inputs=inputs)
            h = _gru_state(out, text, inputs).detach()
            if not _close(h, expected[:, t]):
                raise _Failure(text, f"state after step {t + 1}: {_fmt(expected[:, t])}",
                               _got_text(h, expected[:, t]), inputs=inputs)

    def gradients(student: _Student) -> None:
        case = cases[2]
        text = _gru_input_text(case)
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in case.items()}
        probe = _randn(_gen(30), *case["h"].shape)  # a random direction to differentiate along
        got = _gru_state(student.call(text, *leaves.values(), inputs=case), text, case)
        if not got.requires_grad:
            raise _Failure(text, "h_new connected to the autograd graph", "a result without gradient",
                           "did you use .detach(), .item(), numpy, or torch.no_grad() inside the step?", case)
        got_grads = torch.autograd.grad((got * probe).sum(), list(leaves.values()), allow_unused=True)
        cell = _torch_cell(case)
        x, h = (case[k].clone().requires_grad_(True) for k in ("x", "h"))
        params = [getattr(cell, name) for name in _WEIGHT_NAMES]
        ref_grads = torch.autograd.grad((cell(x, h) * probe).sum(), [x, h, *params])
        for name, g, ref in zip(leaves, got_grads, ref_grads):
            if g is None or not _close(g, ref):
                raise _Failure(text + f"\nd/d{name} of sum(h_new * R), R a fixed random [B, H]",
                               f"gradient {_fmt(ref)}", "no gradient" if g is None else _got_text(g, ref),
                               inputs=case)

    def float32(student: _Student) -> None:
        case = {k: v.float() for k, v in cases[2].items()}
        text = "float32 inputs, " + _gru_input_text(case)
        got = _gru_state(student.call(text, *_clones(case).values(), inputs=case), text, case)
        expected = _torch_cell(cases[2])(cases[2]["x"], cases[2]["h"])
        if not _close(got, expected, ATOL_FLOAT32):
            raise _Failure(text, _fmt(expected), _got_text(got, expected), inputs=case)

    def inputs_unchanged(student: _Student) -> None:
        case = cases[2]
        given = _clones(case)
        student.call(_gru_input_text(case), *given.values(), inputs=case)
        changed = _unchanged(case, given)
        if changed:
            raise _Failure(_gru_input_text(case), f"{changed} unchanged after the call",
                           f"{changed} was modified in place", "use out-of-place ops (h * z, not h.mul_(z))",
                           case)

    shapes = ", ".join(f"({b}, {i}, {h})" for b, i, h in _GRU_SHAPES)
    properties: list[Property] = [
        ("returns h_new as a tensor [B, H], also for B = 1 (a tuple (h_new, gates) is fine)", returns_state),
        (f"h_new equals torch.nn.GRUCell on random weights for (B, I, H) = {shapes} (atol {ATOL:g})",
         equals_torch),
        ("leaves its inputs unchanged", inputs_unchanged),
        ("stepped over a 4-step sequence, the states equal torch.nn.GRU's", equals_torch_gru_sequence),
        ("gradients with respect to x, h and the four weights equal nn.GRUCell's", gradients),
        (f"works on float32 inputs, the training dtype (atol {ATOL_FLOAT32:g})", float32),
    ]
    return _run("check_gru_cell", gru_step, properties, raise_on_fail)


# ---------------------------------------------------------------------- #
# Masked softmax
# ---------------------------------------------------------------------- #
def _softmax_case(seed: int, lengths: list[int], steps: int, padding_scale: float = 3.0) -> dict[str, Tensor]:
    gen = _gen(seed)
    length = torch.tensor(lengths)
    mask = torch.arange(steps)[None, :] < length[:, None]  # [B, T], True on valid steps
    scores = _randn(gen, len(lengths), steps, scale=2.0)  # [B, T]
    noise = _randn(gen, len(lengths), steps, scale=padding_scale)
    scores = torch.where(mask, scores, noise)  # padding gets scores of its own
    return {"scores": scores, "mask": mask}


def _softmax_reference(scores: Tensor, mask: Tensor) -> Tensor:
    """Row by row: softmax over the valid entries, 0 elsewhere."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    for b in range(scores.shape[0]):
        valid = mask[b]
        if valid.any():
            out[b, valid] = torch.softmax(scores[b, valid].to(torch.float64), dim=0)
    return out


def _softmax_mistakes(scores: Tensor, mask: Tensor) -> dict[str, Tensor]:
    keep = mask.to(scores.dtype)
    plain = torch.softmax(scores, dim=1)
    over_batch = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=0).nan_to_num(0.0)
    return {
        "torch.softmax(scores, dim=1) over all T steps: padding was not masked": plain,
        "torch.softmax over every step, then zeroed on padding, without renormalising: mask the "
        "scores BEFORE the softmax": plain * keep,
        "a softmax over a dimension of size 1 (every valid weight is exactly 1): check the dim of "
        "the softmax and any unsqueeze(-1)": keep,
        "a softmax over a dimension of size 1 (every weight is exactly 1, padding included): check the "
        "dim of the softmax and any unsqueeze(-1)": torch.ones_like(scores),
        "a softmax over dim 0, across the batch: the softmax runs over the steps, dim 1": over_batch * keep,
    }


def _softmax_input_text(case: dict[str, Tensor], note: str = "") -> str:
    lengths = case["mask"].sum(dim=1).tolist()
    head = f"B = {case['scores'].shape[0]}, T = {case['scores'].shape[1]}, mask = arange(T) < lengths, " \
           f"lengths = {lengths}{note}"
    return head + "\n" + _tensor_text("scores", case["scores"])


def check_masked_softmax(masked_softmax: Callable[[Tensor, Tensor], Any],
                         raise_on_fail: bool = False) -> CheckReport:
    """Check a softmax over the valid steps of each row (chapter 3).

    Your function: ``masked_softmax(scores, mask)`` with ``scores [B, T]``
    (float) and ``mask [B, T]`` (bool, True on valid steps, right-padded
    as in every batch of the package), returning weights ``[B, T]``:
    exactly 0 on padding, summing to 1 over each row's valid steps, and
    all zeros for a row without any valid step.

    Args:
        masked_softmax: your function.
        raise_on_fail: raise :class:`CheckFailed` instead of returning a
            failed report.
    """
    main = _softmax_case(40, [5, 2, 1, 3], 5)
    with_empty = _softmax_case(41, [2, 0, 4], 4)
    huge = dict(main)
    sign = torch.where(torch.arange(main["scores"].numel()).view_as(main["scores"]) % 2 == 0, 1.0, -1.0)
    huge["scores"] = torch.where(main["mask"], main["scores"], 1e4 * sign.to(torch.float64))
    tiny_cases = [{"scores": torch.tensor([[0.7]], dtype=torch.float64), "mask": torch.tensor([[True]])},
                  {"scores": torch.tensor([[0.7]], dtype=torch.float64), "mask": torch.tensor([[False]])}]

    def weights(student: _Student, case: dict[str, Tensor], note: str = "") -> Tensor:
        text = _softmax_input_text(case, note)
        out = _as_tensor(student.call(text, *_clones(case).values(), inputs=case), text, "weights", case)
        _expect_shape(out, tuple(case["scores"].shape), text, case)
        return out.detach()

    def fail(case: dict[str, Tensor], got: Tensor, expected: Tensor, what: str, note: str = "") -> None:
        hint = _which_mistake(got, _softmax_mistakes(case["scores"], case["mask"]))
        raise _Failure(_softmax_input_text(case, note), f"{what}\n{_fmt(expected)}", _got_text(got, expected),
                       f"your weights equal {hint}" if hint else None, case)

    def shape_and_finite(student: _Student) -> None:
        got = weights(student, main)
        if not torch.isfinite(got).all():
            fail(main, got, _softmax_reference(**main), "finite weights")

    def zero_on_padding(student: _Student) -> None:
        got = weights(student, main)
        if (got[~main["mask"]] != 0).any():
            expected = _softmax_reference(**main)
            fail(main, got, expected, "weights exactly 0 where mask is False")

    def sums_to_one(student: _Student) -> None:
        got = weights(student, main)
        sums = got.to(torch.float64).sum(dim=1)
        if not _close(sums, torch.ones_like(sums)):
            hint = _which_mistake(got, _softmax_mistakes(main["scores"], main["mask"]))
            raise _Failure(_softmax_input_text(main), f"row sums {_fmt(torch.ones_like(sums))}",
                           f"row sums {_fmt(sums)}; weights\n{_fmt(got)}",
                           f"your weights equal {hint}" if hint else None, main)

    def equals_softmax(student: _Student) -> None:
        got = weights(student, main)
        expected = _softmax_reference(**main)
        if not _close(got, expected):
            fail(main, got, expected, "softmax of each row's valid scores, 0 on padding")

    def empty_row(student: _Student) -> None:
        got = weights(student, with_empty)
        expected = _softmax_reference(**with_empty)
        if not _close(got, expected):
            hint = None
            if not torch.isfinite(got).all():
                hint = ("a softmax over a row of -inf is 0/0 = NaN: give rows without a valid step finite "
                        "scores (or fill with a large negative number instead of -inf) and zero padding "
                        "afterwards")
            raise _Failure(_softmax_input_text(with_empty, " (row 1, counting from 0, has no valid step)"),
                           f"zeros for the empty row, softmax elsewhere\n{_fmt(expected)}",
                           _got_text(got, expected), hint, with_empty)

    def padding_values_ignored(student: _Student) -> None:
        note = " (padded scores set to +-1e4)"
        got = weights(student, huge, note)
        expected = _softmax_reference(**huge)
        if not _close(got, expected):
            hint = None
            if not torch.isfinite(got).all():
                hint = ("exp of a huge padded score overflows to inf, and inf * 0 is NaN: mask the scores "
                        "(masked_fill) before exp/softmax instead of multiplying by the mask after")
            raise _Failure(_softmax_input_text(huge, note), f"the same weights as with small padded scores\n"
                           f"{_fmt(expected)}", _got_text(got, expected), hint, huge)

    def single_step(student: _Student) -> None:
        for case, value in zip(tiny_cases, (1.0, 0.0)):
            got = weights(student, case)
            expected = torch.tensor([[value]], dtype=torch.float64)
            if not _close(got, expected):
                raise _Failure(_softmax_input_text(case), _fmt(expected), _got_text(got, expected), inputs=case)

    def float32(student: _Student) -> None:
        case = {"scores": main["scores"].float(), "mask": main["mask"]}
        got = weights(student, case, " (float32 scores)")
        expected = _softmax_reference(**main)
        if not _close(got, expected, ATOL_FLOAT32):
            fail(case, got, expected, "the float64 result", " (float32 scores)")

    def inputs_unchanged(student: _Student) -> None:
        given = _clones(main)
        student.call(_softmax_input_text(main), *given.values(), inputs=main)
        changed = _unchanged(main, given)
        if changed:
            raise _Failure(_softmax_input_text(main), f"{changed} unchanged after the call",
                           f"{changed} was modified in place", "use masked_fill, not masked_fill_", main)

    properties: list[Property] = [
        ("returns finite weights of shape [B, T]", shape_and_finite),
        ("padded steps (mask False) get weight exactly 0", zero_on_padding),
        ("the weights of each row sum to 1 over its valid steps", sums_to_one),
        ("equals the softmax over each row's valid scores alone", equals_softmax),
        ("leaves its inputs unchanged", inputs_unchanged),
        ("a row with no valid step (empty history) gives zeros, not NaN", empty_row),
        ("padded scores do not matter, even huge ones (+-1e4)", padding_values_ignored),
        ("works for B = 1, T = 1: weight 1 if the step is valid, 0 if not", single_step),
        (f"works on float32 scores, the training dtype (atol {ATOL_FLOAT32:g})", float32),
    ]
    return _run("check_masked_softmax", masked_softmax, properties, raise_on_fail)


# ---------------------------------------------------------------------- #
# AUGRU step
# ---------------------------------------------------------------------- #
def _augru_case(seed: int, a: list[float], input_size: int = 3, hidden: int = 2) -> dict[str, Any]:
    """x, h, a and a package GRUCell with random weights."""
    gen = _gen(seed)
    batch = len(a)
    with _preserved_random_state():  # the module's own init draws from the global generator
        cell = GRUCell(input_size, hidden).double()
    with torch.no_grad():
        for name in _WEIGHT_NAMES:
            param = getattr(cell, name)
            param.copy_(_randn(gen, *param.shape, scale=0.8))
    return {
        "x": _randn(gen, batch, input_size),  # [B, I]
        "h": _uniform(gen, batch, hidden),  # [B, H]
        "a": torch.tensor(a, dtype=torch.float64),  # [B]
        "cell": cell,
    }


def _cell_weights(cell: nn.Module) -> dict[str, Tensor]:
    """The four weights of a GRU cell (None for one the cell no longer has)."""
    return {name: getattr(cell, name, None) for name in _WEIGHT_NAMES}


def _augru_reference(x: Tensor, h: Tensor, a: Tensor, cell: nn.Module) -> Tensor:
    """The paper's AUGRU: u' = a * u with u = 1 - z, h' = (1 - u') h + u' n."""
    _, z, n = _gru_parts(x, h, _cell_weights(cell))
    u_att = a.unsqueeze(-1) * (1 - z)  # [B, H]
    return (1 - u_att) * h + u_att * n


def _augru_mistakes(x: Tensor, h: Tensor, a: Tensor, cell: nn.Module) -> dict[str, Tensor]:
    w = _cell_weights(cell)
    _, z, n = _gru_parts(x, h, w)
    a1 = a.unsqueeze(-1)  # [B, 1]
    u = 1 - z
    keep = (1 - a1) * z  # the authors' code: attention scales the keep gate
    scaled_z = a1 * z
    _, z_in, n_in = _gru_parts(a1 * x, h, w)
    return {
        "the authors' code convention, z' = (1 - a) * z (attention scales the KEEP gate): the paper "
        "scales the update gate u = 1 - z, u' = a * u, h' = (1 - u') * h + u' * h~":
            keep * h + (1 - keep) * n,
        "attention applied to the candidate, (1 - u) * h + u * (a * h~): the paper scales the gate, "
        "u' = a * u": (1 - u) * h + u * (a1 * n),
        "a step that scales PyTorch's z as if it were the update gate: the paper's update gate is "
        "u = 1 - z": (1 - scaled_z) * h + scaled_z * n,
        "AGRU, h' = (1 - a) * h + a * h~: AUGRU keeps the GRU's own gate and scales it, u' = a * u":
            (1 - a1) * h + a1 * n,
        "AIGRU, a plain GRU step on a * x: AUGRU scales the update gate instead":
            (1 - z_in) * n_in + z_in * h,
        "a plain GRU step: the attention a is not used": (1 - z) * n + z * h,
        "h itself: the state never changes": h,
    }


def _augru_input_text(case: dict[str, Any], note: str = "") -> str:
    batch, input_size = case["x"].shape
    hidden = case["h"].shape[1]
    parts = [f"B = {batch}, I = {input_size}, H = {hidden}{note}", _tensor_text("a", case["a"]),
             _tensor_text("x", case["x"]), _tensor_text("h", case["h"]),
             f"cell = GRUCell({input_size}, {hidden}) with random weights (weight_ih, weight_hh, bias_ih, "
             "bias_hh; rows in PyTorch's order r, z, n)"]
    return "\n".join(parts)


def _augru_args(case: dict[str, Any]) -> list[Any]:
    """Fresh copies of x, h, a and the cell for one call.

    Every call gets its own deep copy of the cell, so that a function that
    changes the cell's weights in place cannot change what the next call,
    or the check's own reference, computes with: ``case["cell"]`` itself is
    never handed to the function.
    """
    return [case["x"].clone(), case["h"].clone(), case["a"].clone(), copy.deepcopy(case["cell"])]


def check_augru_cell(augru_step: Callable[..., Any], raise_on_fail: bool = False) -> CheckReport:
    """Check an AUGRU step in the paper's convention (chapter 3).

    Your function: ``augru_step(x, h, a, cell)`` with ``x [B, I]``,
    ``h [B, H]``, attention ``a [B]`` and ``cell`` a GRU cell like
    ``torch.nn.GRUCell`` or :class:`dien_tutorial.layers.GRUCell`
    (attributes ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``,
    rows in PyTorch's order r, z, n; calling ``cell(x, h)`` gives a plain
    GRU step). Returns ``h_new [B, H]``::

        u  = 1 - z                      # the paper's update gate
        u' = a * u
        h_new = (1 - u') * h + u' * h~  # h~: the GRU's candidate n

    so ``a = 0`` leaves ``h`` exactly unchanged and ``a = 1`` is a plain GRU
    step.

    Args:
        augru_step: your function.
        raise_on_fail: raise :class:`CheckFailed` instead of returning a
            failed report.
    """
    shape_cases = [_augru_case(50, [0.5], 2, 3), _augru_case(51, [0.3, 0.7])]
    zero_cases = [_augru_case(52, [0.0, 0.0]), _augru_case(53, [0.0, 1.0, 0.3, 0.0], 4, 3)]
    one_case = _augru_case(54, [1.0, 1.0])
    between_case = _augru_case(55, [0.1, 0.25, 0.5, 0.9], 4, 3)
    mixed_case = _augru_case(56, [0.0, 1.0, 0.3, 0.8], 3, 3)
    # x, h, a and the cell's weights of every case as built, taken once before any call: what
    # "unchanged" is measured against. Each call gets copies (_augru_args), never these.
    snapshots: dict[int, dict[str, Tensor]] = {}

    def snapshot(case: dict[str, Any]) -> None:
        snapshots[id(case)] = _clones({**{k: case[k] for k in ("x", "h", "a")}, **_cell_weights(case["cell"])})

    for case in (*shape_cases, *zero_cases, one_case, between_case, mixed_case):
        snapshot(case)
    unchanged_prop = "leaves its inputs and the cell's weights unchanged"

    def check_unchanged(case: dict[str, Any], args: list[Any], text: str) -> None:
        """Fail the "unchanged" property at once if a call changed its x, h, a or the cell's weights.

        Checked after every call, not only in that property: a function that
        changes the cell's weights before using them would otherwise fail an
        earlier property with numbers that hide the cause.
        """
        before = snapshots[id(case)]
        after = {"x": args[0], "h": args[1], "a": args[2], **_cell_weights(args[3])}
        changed = _unchanged(before, after)
        if changed:
            hint = ("use out-of-place ops (h * u, not h.mul_(u))" if changed in ("x", "h", "a") else
                    "the cell's weights belong to the model: read them, never write to them (no .zero_(), "
                    ".clamp_(), .copy_(), assignment, or .float() / .double() on the cell)")
            raise _Failure(text, f"{changed} unchanged after the call", _change_text(changed, before[changed],
                           after[changed]), hint, case, prop=unchanged_prop)

    def call(student: _Student, case: dict[str, Any], text: str, args: list[Any] | None = None) -> Any:
        """The student's step on copies of ``case`` (or on ``args``), inputs checked afterwards."""
        args = _augru_args(case) if args is None else args
        out = student.call(text, *args, inputs=case)
        check_unchanged(case, args, text)
        return out

    def step(student: _Student, case: dict[str, Any], note: str = "") -> Tensor:
        text = _augru_input_text(case, note)
        out = _as_tensor(call(student, case, text), text, "h_new", case)
        _expect_shape(out, tuple(case["h"].shape), text, case)
        return out

    def known_mistake() -> str | None:
        """Which known mistake the function makes, judged on the batch with 0 < a < 1.

        With a = 0 or a = 1 several mistakes coincide (AGRU and the authors'
        convention both give the candidate at a = 1); with a strictly
        between 0 and 1 they all differ.
        """
        case = between_case
        try:
            with torch.no_grad():
                got = augru_step(*_augru_args(case))
                if not isinstance(got, Tensor):
                    return None
                return _which_mistake(got, _augru_mistakes(case["x"], case["h"], case["a"], case["cell"]))
        except Exception:  # only a hint: a function that fails here simply gets none
            return None

    def mismatch(case: dict[str, Any], got: Tensor, expected: Tensor, what: str, note: str = "") -> _Failure:
        hint = known_mistake()
        return _Failure(_augru_input_text(case, note), f"{what}\n{_fmt(expected)}", _got_text(got, expected),
                        f"your step equals {hint}" if hint else None, case)

    def returns_state(student: _Student) -> None:
        for case in shape_cases:
            step(student, case)

    def zero_keeps_state(student: _Student) -> None:
        for case in zero_cases:
            got = step(student, case).detach()
            rows = case["a"] == 0
            h = case["h"]
            # Exact in float64; a function that computes in float32 gets float32 rounding.
            same = torch.equal(got[rows], h[rows]) if got.dtype == torch.float64 else _close(got[rows], h[rows])
            if not same:
                raise mismatch(case, got, _augru_reference(case["x"], h, case["a"], case["cell"]).detach(),
                               "h unchanged in every row with a = 0 (the paper's rule)")

    def one_is_gru_step(student: _Student) -> None:
        case = one_case
        got = step(student, case).detach()
        expected = _torch_cell(_cell_weights(case["cell"]))(case["x"], case["h"]).detach()
        if not _close(got, expected):
            raise mismatch(case, got, expected, "torch.nn.GRUCell(x, h) with the cell's weights")

    def paper_formula(student: _Student) -> None:
        case = between_case
        got = step(student, case).detach()
        expected = _augru_reference(case["x"], case["h"], case["a"], case["cell"]).detach()
        if not _close(got, expected):
            raise mismatch(case, got, expected, "u' = a * (1 - z), h_new = (1 - u') * h + u' * n")

    def own_row(student: _Student) -> None:
        case = mixed_case
        got = step(student, case).detach()
        expected = _augru_reference(case["x"], case["h"], case["a"], case["cell"]).detach()
        if not _close(got, expected):
            raise mismatch(case, got, expected, "row b computed with its own a[b]")

    def gradients(student: _Student) -> None:
        case = between_case
        text = _augru_input_text(case)
        leaves = {k: case[k].detach().clone().requires_grad_(True) for k in ("x", "h", "a")}
        cell = copy.deepcopy(case["cell"])
        params = list(_cell_weights(cell).values())
        probe = _randn(_gen(57), *case["h"].shape)
        out = _as_tensor(call(student, case, text, [leaves["x"], leaves["h"], leaves["a"], cell]),
                         text, "h_new", case)
        if not out.requires_grad:
            raise _Failure(text, "h_new connected to the autograd graph", "a result without gradient",
                           "did you use .detach(), .item(), numpy, or torch.no_grad() inside the step?", case)
        names = ["x", "h", "a", *_WEIGHT_NAMES]
        got = torch.autograd.grad((out * probe).sum(), [*leaves.values(), *params], allow_unused=True)
        ref_leaves = {k: case[k].detach().clone().requires_grad_(True) for k in ("x", "h", "a")}
        ref_cell = copy.deepcopy(case["cell"])
        ref_out = _augru_reference(ref_leaves["x"], ref_leaves["h"], ref_leaves["a"], ref_cell)
        ref = torch.autograd.grad((ref_out * probe).sum(), [*ref_leaves.values(),
                                                             *_cell_weights(ref_cell).values()])
        for name, g, r in zip(names, got, ref):
            if g is None or not _close(g, r):
                raise _Failure(text + f"\nd/d{name} of sum(h_new * R), R a fixed random [B, H]",
                               f"gradient {_fmt(r)}", "no gradient" if g is None else _got_text(g, r),
                               "attention must stay differentiable: it is learned through this step"
                               if name == "a" else None, case)

    def float32(student: _Student) -> None:
        case = {**between_case, "x": between_case["x"].float(), "h": between_case["h"].float(),
                "a": between_case["a"].float(), "cell": copy.deepcopy(between_case["cell"]).float()}
        snapshot(case)
        got = step(student, case, " (float32 inputs and cell)").detach()
        expected = _augru_reference(between_case["x"], between_case["h"], between_case["a"],
                                    between_case["cell"]).detach()
        if not _close(got, expected, ATOL_FLOAT32):
            raise mismatch(case, got, expected, "the float64 result", " (float32 inputs and cell)")

    def inputs_unchanged(student: _Student) -> None:
        for case in (between_case, mixed_case):
            call(student, case, _augru_input_text(case))

    properties: list[Property] = [
        ("returns h_new as a tensor [B, H], also for B = 1", returns_state),
        ("a = 0 leaves the state h exactly unchanged (the step is skipped)", zero_keeps_state),
        ("a = 1 is a plain GRU step (torch.nn.GRUCell with the same weights)", one_is_gru_step),
        ("0 < a < 1 follows the paper: u' = a * u with u = 1 - z, h_new = (1 - u') * h + u' * h~",
         paper_formula),
        ("each row uses its own attention a[b] (batch with a = [0, 1, 0.3, 0.8])", own_row),
        (unchanged_prop, inputs_unchanged),
        ("gradients with respect to x, h, a and the cell's weights equal the reference", gradients),
        (f"works on float32 inputs and a float32 cell (atol {ATOL_FLOAT32:g})", float32),
    ]
    return _run("check_augru_cell", augru_step, properties, raise_on_fail)


# ---------------------------------------------------------------------- #
# Auxiliary loss
# ---------------------------------------------------------------------- #
_AUX_H, _AUX_E = 4, 3  # E != H, so that a transposed W cannot go unnoticed


def _aux_case(seed: int, lengths: list[int], steps: int, garbage: bool = False) -> dict[str, Tensor]:
    """states, clicked, negatives [B, T, .], lengths [B], W [E, H]; padding zero or garbage."""
    gen = _gen(seed)
    batch = len(lengths)
    length = torch.tensor(lengths, dtype=torch.int64)
    valid = (torch.arange(steps)[None, :] < length[:, None]).unsqueeze(-1)  # [B, T, 1]
    states = _uniform(gen, batch, steps, _AUX_H)  # [B, T, H]
    clicked = _randn(gen, batch, steps, _AUX_E, scale=0.8)  # [B, T, E]
    negatives = _randn(gen, batch, steps, _AUX_E, scale=0.8)  # [B, T, E]
    W = _randn(gen, _AUX_E, _AUX_H, scale=0.8)  # [E, H]
    fill = [_randn(gen, batch, steps, d, scale=50.0) if garbage else None for d in (_AUX_H, _AUX_E, _AUX_E)]
    tensors = []
    for value, noise in zip((states, clicked, negatives), fill):
        tensors.append(torch.where(valid, value, noise if noise is not None else torch.zeros_like(value)))
    return {"states": tensors[0], "clicked": tensors[1], "negatives": tensors[2], "lengths": length, "W": W}


def _aux_pair_losses(states: Tensor, clicked: Tensor, negatives: Tensor, W: Tensor,
                     before: slice, after: slice) -> Tensor:
    """BCE of every (state, positive, negative) slot pairing steps ``before`` with ``after``: [B, P]."""
    mapped = states[:, before] @ W.T  # [B, P, E]: W h_t
    pos = (mapped * clicked[:, after]).sum(-1)  # [B, P]
    neg = (mapped * negatives[:, after]).sum(-1)  # [B, P]
    return F.softplus(-pos) + F.softplus(neg)  # -log sigmoid(pos) - log(1 - sigmoid(neg))


def _aux_reference(states: Tensor, clicked: Tensor, negatives: Tensor, lengths: Tensor,
                   W: Tensor) -> tuple[Tensor, Tensor, int]:
    """(loss, per-pair losses [B, T-1] with 0 off the real pairs, number of real pairs)."""
    steps = states.shape[1]
    pair = torch.arange(steps - 1)[None, :] < (lengths - 1)[:, None]  # [B, T-1], real pairs
    per = _aux_pair_losses(states, clicked, negatives, W, slice(None, -1), slice(1, None))  # [B, T-1]
    per = torch.where(pair, per, torch.zeros_like(per))
    n_pairs = int(pair.sum())
    return per.sum() / max(n_pairs, 1), per, n_pairs


def _aux_mistakes(case: dict[str, Tensor]) -> dict[str, Tensor]:
    """Results of auxiliary losses with a known mistake, for hints."""
    states, clicked, negatives, lengths, W = case.values()
    batch, steps = states.shape[:2]
    t = torch.arange(steps)
    loss, per, n_pairs = _aux_reference(**case)
    total = per.sum()
    out: dict[str, Tensor] = {}

    def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
        return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp_min(1)

    every = slice(None)
    same = _aux_pair_losses(states, clicked, negatives, W, every, every)  # [B, T]
    out["pairs h_t with e_t, the click it has already read (same step): pair h_t with the NEXT click "
        "e_{t+1}"] = masked_mean(same, t[None, :] < lengths[:, None])
    out["pairs h_t with e_t for t < L - 1: pair h_t with the NEXT click e_{t+1} and negative "
        "n_{t+1}"] = masked_mean(same, t[None, :] < (lengths - 1)[:, None])
    if steps > 1:
        late = _aux_pair_losses(states, clicked, negatives, W, slice(1, None), slice(1, None))  # [B, T-1]
        out["pairs h_{t+1} with e_{t+1} (both shifted): the state must come from the step BEFORE the "
            "click, h_t with e_{t+1}"] = masked_mean(late, t[None, :-1] < (lengths - 1)[:, None])
        plain = _aux_pair_losses(states, clicked, negatives, W, slice(None, -1), slice(1, None))
        out[f"the mean over all B * (T - 1) = {batch * (steps - 1)} slots, padding included: average over "
            f"the N = {n_pairs} real pairs only (t + 1 < L)"] = plain.mean()
        out[f"the sum over all slots, padding included, divided by N = {n_pairs}: padded slots must not "
            "enter the sum"] = plain.sum() / max(n_pairs, 1)
        swapped = _aux_pair_losses(states, negatives, clicked, W, slice(None, -1), slice(1, None))
        out["the positive and negative labels swapped: the real click e_{t+1} has label 1"] = masked_mean(
            swapped, t[None, :-1] < (lengths - 1)[:, None])
    out[f"the sum over the real pairs divided by B * (T - 1) = {batch * (steps - 1)}, the number of slots: "
        f"divide by the N = {n_pairs} real pairs"] = total / max(batch * (steps - 1), 1)
    out[f"the sum over the real pairs divided by sum(L) = {int(lengths.sum())}: a user with L clicks has "
        f"L - 1 pairs, N = {n_pairs}"] = total / max(int(lengths.sum()), 1)
    out[f"the sum over the real pairs divided by the batch size B = {batch} (the paper's average): this "
        f"package averages over the N = {n_pairs} real pairs"] = total / batch
    out[f"the sum over the real pairs, not their mean (N = {n_pairs})"] = total
    return out


def _aux_input_text(case: dict[str, Tensor], note: str = "") -> str:
    batch, steps, hidden = case["states"].shape
    lengths = case["lengths"].tolist()
    n_pairs = sum(max(n - 1, 0) for n in lengths)
    return (f"B = {batch}, T = {steps}, H = {hidden}, E = {case['W'].shape[0]}, lengths = {lengths} "
            f"(N = sum max(L - 1, 0) = {n_pairs} real pairs){note}\n"
            "states [B, T, H], clicked [B, T, E], negatives [B, T, E]: random on valid steps"
            + ("" if note else ", 0 on padded steps") + "\n"
            + _tensor_text("W", case["W"]))


def _aux_expected_text(case: dict[str, Tensor]) -> str:
    loss, per, _ = _aux_reference(**case)
    lengths = case["lengths"].tolist()
    pairs = [f"(row {b}: h_{t} -> e_{t + 1}) {float(per[b, t]):.4f}"
             for b, n in enumerate(lengths) for t in range(max(n - 1, 0))]
    listed = "\n".join(pairs[:12]) + ("\n..." if len(pairs) > 12 else "")
    return f"{float(loss):.6f}, the mean of the pair losses (code indices)\n{listed}" if pairs else \
        f"{float(loss):.6f} (no pairs)"


def _scalar(out: Any, input: str, inputs: dict[str, Any]) -> Tensor:
    value = _as_tensor(out, input, "the loss", inputs)
    if value.numel() != 1:
        raise _Failure(input, "a scalar loss (one number)", f"a tensor of shape {list(value.shape)}",
                       "average over the pairs: the loss is one number per batch", inputs)
    return value.reshape(())


def check_aux_loss(aux_loss: Callable[..., Any], raise_on_fail: bool = False) -> CheckReport:
    """Check the auxiliary loss of the interest extractor (chapter 4).

    Your function: ``aux_loss(states, clicked, negatives, lengths, W)``
    with extractor states ``states [B, T, H]``, embedded clicks
    ``clicked [B, T, E]``, embedded sampled negatives ``negatives [B, T, E]``
    (one per step), ``lengths [B]`` (int64; step ``t`` is real iff
    ``t < L``) and the scorer's matrix ``W [E, H]``. Returns the scalar
    loss (a tensor; a plain 0.0 is accepted when there is no pair)::

        mean over the N = sum_b max(L_b - 1, 0) real pairs (b, t), t + 1 < L_b, of
            -log sigmoid(<W h_t, e_{t+1}>) - log(1 - sigmoid(<W h_t, n_{t+1}>))

    and exactly 0 (never NaN) when ``N = 0``.

    Args:
        aux_loss: your function.
        raise_on_fail: raise :class:`CheckFailed` instead of returning a
            failed report.
    """
    full = _aux_case(60, [3, 3], 3)
    mixed = _aux_case(61, [0, 1, 2, 5], 5)
    noisy = _aux_case(61, [0, 1, 2, 5], 5, garbage=True)
    no_pairs = [_aux_case(62, [0, 1, 1], 2, garbage=True), _aux_case(63, [1, 0], 1)]
    noisy_note = " (padded steps filled with garbage of size ~50)"

    def loss_of(student: _Student, case: dict[str, Tensor], note: str = "", leaves: dict | None = None) -> Tensor:
        text = _aux_input_text(case, note)
        args = leaves if leaves is not None else _clones(case)
        return _scalar(student.call(text, *args.values(), inputs=case), text, case)

    def mismatch(case: dict[str, Tensor], got: Tensor, note: str = "") -> _Failure:
        expected, _, _ = _aux_reference(**case)
        hint = _which_mistake(got.reshape(1), {k: v.reshape(1) for k, v in _aux_mistakes(case).items()})
        return _Failure(_aux_input_text(case, note), _aux_expected_text(case),
                        f"{float(got):.6f}  (|got - expected| = {abs(float(got) - float(expected)):.3g})",
                        f"your loss equals {hint}" if hint else None, case)

    def scalar(student: _Student) -> None:
        loss_of(student, full)

    def next_click_pairs(student: _Student) -> None:
        got = loss_of(student, full).detach()
        if not _close(got, _aux_reference(**full)[0]):
            raise mismatch(full, got)

    def real_pairs_only(student: _Student) -> None:
        got = loss_of(student, mixed).detach()
        if not _close(got, _aux_reference(**mixed)[0]):
            raise mismatch(mixed, got)

    def padding_ignored(student: _Student) -> None:
        got = loss_of(student, noisy, noisy_note).detach()
        if not _close(got, _aux_reference(**noisy)[0]):
            raise mismatch(noisy, got, noisy_note)

    def no_pairs_zero(student: _Student) -> None:
        for case in no_pairs:
            note = noisy_note if case is no_pairs[0] else ""
            got = loss_of(student, case, note).detach()
            if not (torch.isfinite(got) and float(got) == 0.0):
                hint = None
                if not torch.isfinite(got):
                    hint = "0 pairs make sum / count = 0 / 0 = NaN: divide by max(count, 1)"
                raise _Failure(_aux_input_text(case, note), "exactly 0.0 (there is no pair to score)",
                               f"{float(got)}", hint, case)

    def gradients(student: _Student) -> None:
        for case, note in ((mixed, ""), (no_pairs[0], noisy_note)):
            text = _aux_input_text(case, note)
            leaves = {k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v.clone())
                      for k, v in case.items()}
            float_names = [k for k, v in case.items() if v.is_floating_point()]
            got = loss_of(student, case, note, leaves)
            ref_leaves = {k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v.clone())
                          for k, v in case.items()}
            ref_loss, _, n_pairs = _aux_reference(**ref_leaves)
            ref = torch.autograd.grad(ref_loss, [ref_leaves[k] for k in float_names], allow_unused=True)
            if not got.requires_grad:
                if n_pairs == 0:
                    continue  # a constant 0 for a batch without pairs is right: every gradient is 0
                raise _Failure(text, "a loss connected to the autograd graph", "a result without gradient",
                               "did you use .item(), float(), numpy or .detach() on a term of the sum?", case)
            grads = torch.autograd.grad(got, [leaves[k] for k in float_names], allow_unused=True)
            for name, g, r in zip(float_names, grads, ref):
                r = torch.zeros_like(leaves[name]) if r is None else r
                g_value = torch.zeros_like(r) if g is None else g
                if not torch.isfinite(g_value).all() or not _close(g_value, r):
                    raise _Failure(text, f"gradient d loss / d {name}, finite\n{_fmt(r)}",
                                   _got_text(g_value, r), inputs=case)

    def float32(student: _Student) -> None:
        case = {k: (v.float() if v.is_floating_point() else v) for k, v in mixed.items()}
        got = loss_of(student, case, " (float32 inputs)").detach()
        expected = _aux_reference(**mixed)[0]
        if not _close(got, expected, ATOL_FLOAT32):
            raise _Failure(_aux_input_text(case, " (float32 inputs)"), f"{float(expected):.6f}",
                           f"{float(got):.6f}", inputs=case)

    def inputs_unchanged(student: _Student) -> None:
        given = _clones(mixed)
        student.call(_aux_input_text(mixed), *given.values(), inputs=mixed)
        changed = _unchanged(mixed, given)
        if changed:
            raise _Failure(_aux_input_text(mixed), f"{changed} unchanged after the call",
                           f"{changed} was modified in place", None, mixed)

    n_mixed = sum(max(n - 1, 0) for n in mixed["lengths"].tolist())
    properties: list[Property] = [
        ("returns a scalar loss", scalar),
        ("pairs h_t with the NEXT click e_{t+1} and its negative n_{t+1}, BCE of <W h_t, .> "
         "(full histories, no padding)", next_click_pairs),
        (f"averages over the real pairs only: lengths [0, 1, 2, 5] give N = {n_mixed} pairs", real_pairs_only),
        ("padded steps do not matter, even filled with large garbage", padding_ignored),
        ("a batch without pairs (every L <= 1) gives exactly 0, not NaN", no_pairs_zero),
        ("leaves its inputs unchanged", inputs_unchanged),
        ("gradients are finite and equal the reference (with and without pairs)", gradients),
        (f"works on float32 inputs, the training dtype (atol {ATOL_FLOAT32:g})", float32),
    ]
    return _run("check_aux_loss", aux_loss, properties, raise_on_fail)


# ---------------------------------------------------------------------- #
# Negative sampler
# ---------------------------------------------------------------------- #
def _positives(seed: int, n_items: int, size: int) -> np.ndarray:
    """Random positives, from a stream of their own: not the draws the function's rng makes."""
    return np.random.default_rng([seed, 1]).integers(FIRST_ID, n_items, size=size)  # int64 [N]


def _sampler_input_text(positives: np.ndarray, n_items: int, seed: int) -> str:
    shown = _fmt(positives[:12]) + (" ..." if len(positives) > 12 else "")
    return (f"positives: {len(positives)} codes in [{FIRST_ID}, {n_items}), first ones {shown}; "
            f"n_items = {n_items} (codes 0 .. {n_items - 1}; {PAD} = padding, {UNK} = unknown, real items "
            f"{FIRST_ID} .. {n_items - 1}); rng = np.random.default_rng({seed})")


def check_negative_sampler(sample_negatives: Callable[..., Any], raise_on_fail: bool = False) -> CheckReport:
    """Check a sampler of negative items (chapter 1).

    Your function: ``sample_negatives(positives, n_items, rng)`` with
    ``positives`` an int64 array ``[N]`` of item codes, ``n_items`` the
    size of the item vocabulary (``len(samples.item_vocab)``, the rows of
    the embedding table) and ``rng`` a ``numpy.random.Generator``. Codes
    follow the package's vocabularies: ``0`` is padding, ``1`` an unknown
    item, real items are ``2 .. n_items - 1``. Returns an integer array
    ``[N]``: for each positive, a real item other than that positive, drawn
    uniformly with ``rng`` (and with nothing else, so that a seed fixes the
    draws). The check also uses vocabularies of 5,000 and 100,000 items:
    the draws must reach every code, in a dtype that holds them (int64, as
    ``rng.integers`` returns; int32 is fine too).

    The package's own sampler (:func:`dien_tutorial.data.samples.sample_negatives`)
    also excludes everything the user clicked at any time; here each draw
    has one positive to avoid.

    Args:
        sample_negatives: your function.
        raise_on_fail: raise :class:`CheckFailed` instead of returning a
            failed report.
    """
    cases = [(4, 300, 70), (7, 3000, 71), (50, 2000, 72)]  # (n_items, N, seed), smallest first
    # Vocabularies the size of real catalogues, few draws each: a sampler must reach every code and
    # return it in a dtype that holds it (uint8 wraps above 255, int16 above 32,767).
    large = [(5_000, 2000, 74), (100_000, 2000, 75)]
    cases += large

    def draw(student: _Student, positives: np.ndarray, n_items: int, seed: int) -> np.ndarray:
        text = _sampler_input_text(positives, n_items, seed)
        inputs = {"positives": positives.copy(), "n_items": n_items, "seed": seed}
        out = student.call(text, positives.copy(), n_items, np.random.default_rng(seed), inputs=inputs)
        try:
            arr = _numpy(out)
        except Exception as err:
            raise _Failure(text, "an integer array [N]", f"a {type(out).__name__} ({err})", inputs=inputs) from None
        if arr.shape != positives.shape or arr.dtype.kind not in "iu":
            raise _Failure(text, f"an integer array of shape [{len(positives)}]",
                           f"{arr.dtype} array of shape {list(arr.shape)}", inputs=inputs)
        if np.iinfo(arr.dtype).max < n_items - 1:  # the codes near the top cannot be represented
            raise _Failure(text, f"an integer dtype that holds every code up to n_items - 1 = {n_items - 1} "
                           "(int64, as rng.integers returns, or int32)",
                           f"{arr.dtype} array: it holds codes up to {np.iinfo(arr.dtype).max} only, larger "
                           "ones wrap round",
                           f"do not cast the negatives to {arr.dtype}: keep int64 codes", inputs=inputs)
        return arr.astype(np.int64)

    def first_bad(student: _Student, bad: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
                  expected: str, hint: Callable[[int, int, int], str | None]) -> None:
        for n_items, size, seed in cases:
            positives = _positives(seed, n_items, size)
            neg = draw(student, positives, n_items, seed)
            where = np.flatnonzero(bad(neg, positives, n_items))
            if len(where):
                i = int(where[0])
                raise _Failure(_sampler_input_text(positives, n_items, seed), expected,
                               f"negatives[{i}] = {neg[i]} for positives[{i}] = {positives[i]} "
                               f"({len(where)} of {size} draws are like that)",
                               hint(int(neg[i]), int(positives[i]), n_items),
                               {"positives": positives, "n_items": n_items, "seed": seed})

    def returns_codes(student: _Student) -> None:
        for n_items, size, seed in cases:
            draw(student, _positives(seed, n_items, size), n_items, seed)

    def in_range(student: _Student) -> None:
        first_bad(student, lambda neg, pos, n: (neg < 0) | (neg >= n), "every code in [0, n_items)",
                  lambda v, p, n: (f"{v} is past the last code {n - 1}: rng.integers(low, high) excludes high"
                                   if v >= n else None))

    def not_reserved(student: _Student) -> None:
        first_bad(student, lambda neg, pos, n: neg < FIRST_ID,
                  f"real items only: never {PAD} (padding) or {UNK} (unknown)",
                  lambda v, p, n: f"draw from [{FIRST_ID}, n_items): codes {PAD} and {UNK} are reserved")

    def not_positive(student: _Student) -> None:
        first_bad(student, lambda neg, pos, n: neg == pos, "a negative different from its own positive",
                  lambda v, p, n: ("with n_items = 4 there are two real items, so the negative must be the "
                                   "other one" if n == 4 else
                                   "redraw (or shift) the draws that hit their positive"))

    def same_seed(student: _Student) -> None:
        n_items, size, seed = cases[2]
        positives = _positives(seed, n_items, size)
        first = draw(student, positives, n_items, seed)
        np.random.seed(12345)  # disturb the global states between the calls
        random.seed(12345)
        torch.manual_seed(12345)
        second = draw(student, positives, n_items, seed)
        if not np.array_equal(first, second):
            i = int(np.flatnonzero(first != second)[0])
            raise _Failure(_sampler_input_text(positives, n_items, seed) + " (called twice)",
                           "the same negatives from two generators with the same seed",
                           f"negatives[{i}] = {first[i]}, then {second[i]}",
                           "draw with the rng you are given (rng.integers, rng.choice), not np.random.* "
                           "or torch's global generator",
                           {"positives": positives, "n_items": n_items, "seed": seed})

    def seed_matters(student: _Student) -> None:
        n_items, size, seed = cases[2]
        positives = _positives(seed, n_items, size)
        first = draw(student, positives, n_items, seed)
        other = draw(student, positives, n_items, seed + 1)
        if np.array_equal(first, other):
            raise _Failure(_sampler_input_text(positives, n_items, seed) + f", then the seed {seed + 1}",
                           "different negatives for a different seed", "the same negatives",
                           "does the function make its own generator (np.random.default_rng(0)) instead of "
                           "using rng?", {"positives": positives, "n_items": n_items, "seed": seed})

    def spread(student: _Student) -> None:
        """With a large vocabulary, each tenth of the real codes gets about a tenth of the draws."""
        for n_items, size, seed in large:
            positive = n_items // 2
            positives = np.full(size, positive, dtype=np.int64)  # [N]
            neg = draw(student, positives, n_items, seed)
            tenth = (neg - FIRST_ID) * 10 // (n_items - FIRST_ID)  # [N], 0 .. 9
            counts = np.bincount(np.clip(tenth, 0, 9), minlength=10)
            share = size / 10
            low, high = 0.5 * share, 1.5 * share
            if ((counts < low) | (counts > high)).any():
                width = (n_items - FIRST_ID) / 10
                raise _Failure(_sampler_input_text(positives, n_items, seed) + f" (every positive is {positive})",
                               f"each tenth of the real codes (about {width:,.0f} codes each) drawn about "
                               f"{share:.0f} times (between {low:.0f} and {high:.0f})",
                               f"draws per tenth of the codes {counts.tolist()}; largest negative {neg.max()}",
                               f"draw among ALL real items {FIRST_ID} .. n_items - 1 = {n_items - 1}: is the "
                               "upper bound of the draw a fixed number instead of n_items?",
                               {"positives": positives, "n_items": n_items, "seed": seed})

    def uniform(student: _Student) -> None:
        n_items, size, seed, positive = 10, 4200, 73, 3
        positives = np.full(size, positive, dtype=np.int64)
        neg = draw(student, positives, n_items, seed)
        others = [v for v in range(FIRST_ID, n_items) if v != positive]
        counts = {v: int((neg == v).sum()) for v in others}
        share = size / len(others)
        low, high = 0.6 * share, 1.4 * share
        if any(not low <= c <= high for c in counts.values()):
            raise _Failure(_sampler_input_text(positives, n_items, seed) + f" (every positive is {positive})",
                           f"each of the other {len(others)} real items about {share:.0f} times "
                           f"(between {low:.0f} and {high:.0f})", f"counts {counts}",
                           "draw uniformly among the real items other than the positive; replacing a hit by "
                           "a fixed neighbour (positive + 1) doubles that neighbour's share",
                           {"positives": positives, "n_items": n_items, "seed": seed})
        spread(student)

    def inputs_unchanged(student: _Student) -> None:
        n_items, size, seed = cases[1]
        positives = _positives(seed, n_items, size)
        given = positives.copy()
        student.call(_sampler_input_text(positives, n_items, seed), given, n_items,
                     np.random.default_rng(seed))
        if not np.array_equal(given, positives):
            raise _Failure(_sampler_input_text(positives, n_items, seed), "positives unchanged after the call",
                           "positives was modified in place", "work on a copy",
                           {"positives": positives, "n_items": n_items, "seed": seed})

    properties: list[Property] = [
        ("returns one integer code per positive, shape [N]", returns_codes),
        ("every negative is a code of the vocabulary, 0 <= code < n_items", in_range),
        (f"never a reserved code: {PAD} (padding) or {UNK} (unknown)", not_reserved),
        ("never equals its own positive (also with only two real items)", not_positive),
        ("the same seed gives the same negatives: only rng is used, not a global generator", same_seed),
        ("a different seed gives different negatives", seed_matters),
        ("for a fixed positive, every other real item is drawn, each with about the same share", uniform),
        ("leaves positives unchanged", inputs_unchanged),
    ]
    return _run("check_negative_sampler", sample_negatives, properties, raise_on_fail)


# ---------------------------------------------------------------------- #
# History windows
# ---------------------------------------------------------------------- #
def _log_frame(users: list[Any], days: list[list[int]], first_item: int = 100) -> pd.DataFrame:
    """A behaviour log sorted by (user, time, order), whole-day timestamps."""
    rows = []
    item = first_item
    for user, user_days in zip(users, days):
        for order, day in enumerate(user_days):
            rows.append({"user": user, "item": item, "category": item % 7, "time": day * DAY, "order": order})
            item += 1
    frame = pd.DataFrame(rows, columns=["user", "item", "category", "time", "order"])
    return frame.astype({"item": np.int64, "category": np.int64, "time": np.int64, "order": np.int64})


def _history_frames() -> list[tuple[pd.DataFrame, int, str]]:
    """(frame, max_len, description) cases, smallest first."""
    hand = _log_frame(["ann", "bob", "cy"],
                      [[1, 2, 2, 4, 5], [3], [1, 2, 3, 3, 3, 4, 6, 7]])
    rng = np.random.default_rng(80)
    users, days = [], []
    for user in range(6):
        n = int(rng.integers(1, 13))
        gaps = rng.choice([0, 0, 1, 1, 2, 5], size=n)
        users.append(user)
        days.append((int(rng.integers(1, 30)) + np.cumsum(gaps)).tolist())
    random_frame = _log_frame(users, days)
    return [
        (hand, 50, "three shoppers, whole-day times (equal time = same day)"),
        (hand, 3, "the same three shoppers"),
        (hand, 1, "the same three shoppers"),
        (random_frame, 2, "six shoppers with random days"),
        (random_frame, 5, "six shoppers with random days"),
    ]


def _expected_rows(frame: pd.DataFrame, max_len: int) -> list[list[int]]:
    """For every row, the rows of its history, by brute force."""
    user, time = frame["user"].to_numpy(), frame["time"].to_numpy()
    out = []
    for i in range(len(frame)):
        earlier = np.flatnonzero((user == user[i]) & (time < time[i]))
        out.append(earlier[max(len(earlier) - max_len, 0):].tolist())  # the max_len most recent
    return out


def _timeline_text(frame: pd.DataFrame, row: int, max_len: int, note: str) -> str:
    """The target's user's rows as a small table, the target marked."""
    rows = np.flatnonzero(frame["user"].to_numpy() == frame["user"].iloc[row])
    table = pd.DataFrame({"row": rows, "user": frame["user"].to_numpy()[rows],
                          "day": frame["time"].to_numpy()[rows] // DAY, "order": frame["order"].to_numpy()[rows],
                          "": ["<- target" if r == row else "" for r in rows]})
    return (f"max_len = {max_len}; {note}; frame has {len(frame)} rows, columns user, item, category, time, "
            f"order (time = day * {DAY}); the target's user:\n"
            + "\n".join(line.rstrip() for line in table.to_string(index=False).splitlines()))


def _window_text(start: int, end: int) -> str:
    rows = list(range(start, end))
    return f"[start, end) = [{start}, {end}): rows {rows}" if rows else f"[start, end) = [{start}, {end}): empty"


def check_history_windows(history_windows: Callable[..., Any], raise_on_fail: bool = False) -> CheckReport:
    """Check the history window of every row of a behaviour log (chapter 1).

    Your function: ``history_windows(frame, max_len)`` with ``frame`` a
    behaviour log (a DataFrame with columns ``user``, ``item``,
    ``category``, ``time``, ``order``, sorted by (user, time, order), index
    ``0 .. n-1``, like ``log.frame``) and returns ``(start, end)``, two
    integer arrays ``[n]``: row ``i``'s history is the rows
    ``start[i] .. end[i] - 1``. A history holds the same user's clicks
    strictly earlier in time (no click of the target's own day, equal
    ``time``), the ``max_len`` most recent of them.

    Args:
        history_windows: your function.
        raise_on_fail: raise :class:`CheckFailed` instead of returning a
            failed report.
    """
    cases: list[dict[str, Any]] = []
    for frame, max_len, note in _history_frames():
        cases.append({"frame": frame, "max_len": max_len, "note": note, "user": frame["user"].to_numpy(),
                      "time": frame["time"].to_numpy(), "expected": _expected_rows(frame, max_len)})
    answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def windows(student: _Student, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The student's windows for case ``k`` (computed once, then reused by every property)."""
        if k in answers:
            return answers[k]
        frame, max_len, note = cases[k]["frame"], cases[k]["max_len"], cases[k]["note"]
        text = f"max_len = {max_len}; {note}; frame [{len(frame)} rows]\n" + frame.to_string()
        inputs = {"frame": frame.copy(), "max_len": max_len}
        out = student.call(text, frame.copy(), max_len, inputs=inputs)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise _Failure(text, "a pair (start, end)", f"a {type(out).__name__}", inputs=inputs)
        start, end = (_numpy(part) for part in out)
        n = len(frame)
        for name, arr in (("start", start), ("end", end)):
            if arr.shape != (n,) or arr.dtype.kind not in "iu":
                raise _Failure(text, f"{name}: an integer array of shape [{n}]",
                               f"{name}: {arr.dtype} array of shape {list(arr.shape)}", inputs=inputs)
        bad = np.flatnonzero((start < 0) | (start > end) | (end > n))
        if len(bad):
            i = int(bad[0])
            raise _Failure(_timeline_text(frame, i, max_len, note), f"0 <= start <= end <= {n}",
                           f"row {i}: start = {start[i]}, end = {end[i]}", inputs=inputs)
        answers[k] = (start.astype(np.int64), end.astype(np.int64))
        return answers[k]

    def each_row(student: _Student, fault: Callable[[dict[str, Any], int, list[int], list[int]], str | None],
                 hint: str) -> None:
        """Fail at the first (case, row) where ``fault(case, i, got, expected)`` says what is wrong."""
        for k, case in enumerate(cases):
            start, end = windows(student, k)
            for i in range(len(case["frame"])):
                got, exp = list(range(int(start[i]), int(end[i]))), case["expected"][i]
                problem = fault(case, i, got, exp)
                if problem:
                    exp_text = _window_text(exp[0], exp[-1] + 1) if exp else "an empty window (no earlier day)"
                    raise _Failure(_timeline_text(case["frame"], i, case["max_len"], case["note"]),
                                   f"row {i}: {exp_text}",
                                   f"row {i}: {_window_text(int(start[i]), int(end[i]))}; {problem}",
                                   hint, {"frame": case["frame"].copy(), "max_len": case["max_len"]})

    def rows_that(rows: list[int], what: str) -> str | None:
        return f"rows {rows} {what}" if rows else None

    def returns_windows(student: _Student) -> None:
        for k in range(len(cases)):
            windows(student, k)

    def same_user(student: _Student) -> None:
        each_row(student, lambda c, i, got, exp: rows_that(
            [j for j in got if c["user"][j] != c["user"][i]], "belong to another user"),
            "a window must not reach back past the first row of the target's user")

    def no_future(student: _Student) -> None:
        each_row(student, lambda c, i, got, exp: rows_that(
            [j for j in got if c["time"][j] > c["time"][i]], "are on a later day than the target"),
            "the history ends before the target: it must not hold the user's later clicks")

    def no_target(student: _Student) -> None:
        each_row(student, lambda c, i, got, exp: "the window holds the target row itself" if i in got else None,
                 "end must stop before the target row, at the first row of the target's day")

    def no_same_day(student: _Student) -> None:
        each_row(student, lambda c, i, got, exp: rows_that(
            [j for j in got if c["time"][j] == c["time"][i]], "are on the target's own day"),
            "clicks of the same day never see each other: end the window at the FIRST row of the "
            "target's day, not at the row before the target")

    def at_most_max_len(student: _Student) -> None:
        each_row(student, lambda c, i, got, exp: (
            f"{len(got)} rows, more than max_len" if len(got) > c["max_len"] else None),
            "start = max(first row of the user, end - max_len)")

    def most_recent(student: _Student) -> None:
        each_row(student, lambda c, i, got, exp: (
            "the most recent earlier clicks are missing" if got and exp and got[-1] < exp[-1] else None),
            "keep the max_len clicks just before the target's day (the most recent), not the oldest ones")

    def as_long_as_allowed(student: _Student) -> None:
        each_row(student, lambda c, i, got, exp: (
            f"{len(got)} rows, fewer than min(max_len, earlier clicks) = {len(exp)}" if len(got) < len(exp)
            else None),
            "start = max(first row of the user, end - max_len): look for an off-by-one")

    def frame_unchanged(student: _Student) -> None:
        frame, max_len, note = cases[0]["frame"], cases[0]["max_len"], cases[0]["note"]
        given = frame.copy()
        student.call(f"max_len = {max_len}; {note}", given, max_len, inputs={"frame": frame, "max_len": max_len})
        if not given.equals(frame) or list(given.columns) != list(frame.columns):
            raise _Failure(f"max_len = {max_len}; {note}", "frame unchanged after the call",
                           f"frame changed: columns now {list(given.columns)}",
                           "work on a copy, or keep new columns as separate arrays",
                           {"frame": frame, "max_len": max_len})

    properties: list[Property] = [
        ("returns (start, end): two integer arrays with one entry per row, 0 <= start <= end <= n",
         returns_windows),
        ("a history holds only rows of the target's own user", same_user),
        ("a history holds no click later in time than the target (no future)", no_future),
        ("a history never holds the target row itself", no_target),
        ("a history holds no click of the target's own day (equal time), not even an earlier one",
         no_same_day),
        ("a history holds at most max_len clicks", at_most_max_len),
        ("a history keeps the most recent earlier clicks (drops the oldest)", most_recent),
        ("a history is as long as allowed: min(max_len, number of strictly earlier clicks)",
         as_long_as_allowed),
        ("leaves frame unchanged", frame_unchanged),
    ]
    return _run("check_history_windows", history_windows, properties, raise_on_fail)


# ---------------------------------------------------------------------- #
# The package's versions, and going on when a check fails
# ---------------------------------------------------------------------- #
def reference_history_windows(frame: pd.DataFrame, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The package's history windows, those of ``build_samples`` (chapter 1).

    Same contract as :func:`check_history_windows` asks of yours: ``frame``
    sorted by (user, time, order); returns int64 ``(start, end)``, each
    ``[n]``, row ``i``'s history being rows ``start[i] .. end[i] - 1``.
    """
    if len(frame) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    user = pd.factorize(frame["user"])[0]  # [n], one code per user; rows are sorted by user
    first_of_user = _run_starts(user)  # [n]
    first_of_day = _run_starts(user, frame["time"].to_numpy())  # [n]: a history ends before the day
    return np.maximum(first_of_user, first_of_day - max_len), first_of_day


def reference_sample_negatives(positives: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """One negative per positive, as :func:`check_negative_sampler` asks (chapter 1).

    Draws uniformly among the ``n_items - 3`` real items other than the
    positive (codes ``2 .. n_items - 1``), with ``rng`` only: a draw at or
    above the positive steps over it.

    Raises:
        ValueError: fewer than two real items, or a positive that is not a
            real item code.
    """
    positives = np.asarray(positives)
    if n_items < FIRST_ID + 2:
        raise ValueError(f"n_items = {n_items}: drawing a negative other than the positive needs at least two "
                         f"real items (codes {FIRST_ID} and {FIRST_ID + 1})")
    outside = (positives < FIRST_ID) | (positives >= n_items)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"positives[{i}] = {positives[i]} is not a real item code "
                         f"({FIRST_ID} .. {n_items - 1})")
    draws = rng.integers(FIRST_ID, n_items - 1, size=len(positives))  # [N], n_items - 3 choices
    return draws + (draws >= positives)  # step over the positive


def reference_gru_step(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                       bias_hh: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One GRU step in PyTorch's convention (chapter 2): ``(h_new, (r, z, n))``.

    ``x [B, I]``, ``h [B, H]``, weights with rows in the order r, z, n;
    returns ``h_new [B, H]`` and the reset gate, keep gate and candidate,
    each ``[B, H]``, like the step written in chapter 2.
    """
    weights = {"weight_ih": weight_ih, "weight_hh": weight_hh, "bias_ih": bias_ih, "bias_hh": bias_hh}
    r, z, n = _gru_parts(x, h, weights)
    return (1 - z) * n + z * h, (r, z, n)


def reference_masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the valid steps of each row (chapter 3): :func:`dien_tutorial.layers.masked_softmax`."""
    return masked_softmax(scores, mask)


def reference_augru_step(x: Tensor, h: Tensor, a: Tensor, cell: nn.Module) -> Tensor:
    """One AUGRU step in the paper's convention (chapter 3), as :func:`check_augru_cell` asks."""
    return _augru_reference(x, h, a, cell)


def reference_aux_loss(states: Tensor, clicked: Tensor, negatives: Tensor, lengths: Tensor, W: Tensor) -> Tensor:
    """The auxiliary loss (chapter 4), as :func:`check_aux_loss` asks: the mean over the real pairs."""
    return _aux_reference(states, clicked, negatives, lengths, W)[0]


_STAND_IN = "dien_tutorial_stands_in_for"  # attribute of a stand-in: the name of the function it replaced


def _stand_in_text(fn: Callable[..., Any], replaced: str) -> str:
    return (f"the function checked is not yours: it is the package's {fn.__name__}, which passed_or_reference "
            f"put in place of your {replaced} because your version had not passed yet. Run the cell that "
            f"defines your {replaced} again, then this check.")


def passed_or_reference(report: CheckReport, yours: Callable[..., Any],
                        reference: Callable[..., Any]) -> Callable[..., Any]:
    """Your function if its check passed; otherwise the package's version, with a note.

    Use it right after a check, so that the rest of a notebook runs even
    while your function is unfinished::

        report = check_gru_cell(gru_step)
        print(report)
        gru_step = passed_or_reference(report, gru_step, reference_gru_step)

    If the check failed, this prints which function is replaced and by
    what, and returns a stand-in that calls ``reference``. Checking the
    stand-in gives a FAILED report saying that it is not your function, so
    running the check cell again without your own cell first cannot pass.

    Args:
        report: what the check returned for ``yours``.
        yours: your function.
        reference: the package's version, e.g. :func:`reference_gru_step`.

    Returns:
        ``yours`` if ``report.passed``, else the stand-in.
    """
    if not isinstance(report, CheckReport):
        raise TypeError(f"passed_or_reference takes the report of a check first, got a {type(report).__name__}")
    if not callable(yours) or not callable(reference):
        bad = "yours" if not callable(yours) else "reference"
        raise TypeError(f"passed_or_reference: {bad} must be a function")
    if report.passed:
        return yours
    name = getattr(yours, _STAND_IN, None) or getattr(yours, "__name__", "your function")
    ref_name = getattr(reference, "__name__", "the reference")

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return reference(*args, **kwargs)

    stand_in.__name__ = stand_in.__qualname__ = ref_name
    stand_in.__doc__ = reference.__doc__
    setattr(stand_in, _STAND_IN, name)
    print(textwrap.fill(f"Note: your {name} has not passed {report.name} yet, so from here on {name} is the "
                        f"package's version, {ref_name}, and the cells below run with it. Fix {name}, run its "
                        "cell, then run this cell again.", width=100))
    return stand_in
