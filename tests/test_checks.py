"""Tests of dien_tutorial.checks: right solutions pass, real mistakes fail for the right reason.

Three kinds of function go through every check:

- reference solutions: the hand-written versions of the notebooks (copied
  here verbatim), the package's own layers behind the check's signature,
  and other correct ways to write the same part;
- the mistakes of ``tests/student_mistakes.py``, each of which must fail
  the property it breaks, with a message that names it;
- stubs that raise ``NotImplementedError``, or crash, which must give a
  FAILED report rather than an exception.
"""

from __future__ import annotations

import inspect
import random
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import student_mistakes as m
from dien_tutorial import checks
from dien_tutorial.checks import (
    CheckFailed,
    CheckReport,
    check_augru_cell,
    check_aux_loss,
    check_gru_cell,
    check_history_windows,
    check_masked_softmax,
    check_negative_sampler,
)
from dien_tutorial.data.log import validate_log
from dien_tutorial.data.samples import FIRST_ID, _run_starts, build_samples, sample_negatives
from dien_tutorial.data.simulate import SimulationConfig, simulate
from dien_tutorial.layers import AuxiliaryLoss, GRUCell, evolve_interest, masked_softmax, packed_gru


# ---------------------------------------------------------------------- #
# Reference solutions: the notebooks' versions, verbatim
# ---------------------------------------------------------------------- #
def notebook_history_windows(frame, max_len):  # notebooks/01_data_preparation.ipynb
    """For every row, its history as a range [start, end) of log rows."""
    row = np.arange(len(frame))
    first_of_user = row - frame.groupby("user").cumcount().to_numpy()
    first_of_day = row - frame.groupby(["user", "time"]).cumcount().to_numpy()
    end = first_of_day  # stop before the first click of the same day
    start = np.maximum(first_of_user, end - max_len)
    return start, end


def notebook_gru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh):  # notebooks/02_gru_from_scratch.ipynb
    """One GRU step: x [B, I], h [B, H] -> new state [B, H] and gates (r, z, n)."""
    W_ir, W_iz, W_in = weight_ih.chunk(3)  # 3 x [H, I], rows in the order r, z, n
    W_hr, W_hz, W_hn = weight_hh.chunk(3)  # 3 x [H, H]
    b_ir, b_iz, b_in = bias_ih.chunk(3)  # 3 x [H]
    b_hr, b_hz, b_hn = bias_hh.chunk(3)  # 3 x [H]
    r = torch.sigmoid(x @ W_ir.T + b_ir + h @ W_hr.T + b_hr)  # reset gate [B, H]
    z = torch.sigmoid(x @ W_iz.T + b_iz + h @ W_hz.T + b_hz)  # keep gate [B, H]
    n = torch.tanh(x @ W_in.T + b_in + r * (h @ W_hn.T + b_hn))  # candidate [B, H]
    h_new = (1 - z) * n + z * h  # [B, H]
    return h_new, (r, z, n)


def gru_parts(x, h, cell):  # notebooks/03_attention_and_augru.ipynb
    """Update gate u, reset gate r and candidate of one GRU step; x [B, I], h [B, H]."""
    W_r, W_z, W_h = cell.weight_ih.chunk(3)  # 3 x [H, I], PyTorch's order r, z, n
    U_r, U_z, U_h = cell.weight_hh.chunk(3)  # 3 x [H, H]
    b_ir, b_iz, b_ih = cell.bias_ih.chunk(3)  # 3 x [H]
    b_hr, b_hz, b_hh = cell.bias_hh.chunk(3)  # 3 x [H]
    r = torch.sigmoid(x @ W_r.T + b_ir + h @ U_r.T + b_hr)  # reset gate [B, H]
    u = 1 - torch.sigmoid(x @ W_z.T + b_iz + h @ U_z.T + b_hz)  # update gate = 1 - keep gate
    cand = torch.tanh(x @ W_h.T + b_ih + r * (h @ U_h.T + b_hh))  # candidate h~ [B, H]
    return u, r, cand


def notebook_augru_step(x, h, a, cell):  # notebooks/03_attention_and_augru.ipynb
    """AUGRU: u' = a * u, h' = (1 - u') h + u' h~; a [B] is the step's attention."""
    u, _, cand = gru_parts(x, h, cell)
    u_att = a[:, None] * u  # [B, H]
    return (1 - u_att) * h + u_att * cand


def notebook_augru_step_as_in_code(x, h, a, cell):  # notebooks/03_attention_and_augru.ipynb
    """The authors' convention: attention scales the KEEP gate, z' = (1 - a) z."""
    u, _, cand = gru_parts(x, h, cell)
    keep = (1 - a[:, None]) * (1 - u)  # z' [B, H]
    return keep * h + (1 - keep) * cand


def notebook_aux_loss_by_hand(states, clicked, negatives, lengths, W):  # notebooks/04_auxiliary_loss.ipynb
    """Mean over real pairs of -log s(<W h_t, e_t+1>) - log(1 - s(<W h_t, n_t+1>))."""
    total, pairs = 0.0, 0
    for b in range(len(lengths)):
        for t in range(int(lengths[b]) - 1):  # code index t is the paper's step t + 1
            w_h = W @ states[b, t]  # W h_t, [E]
            positive = torch.dot(w_h, clicked[b, t + 1])  # logit of the real next click
            negative = torch.dot(w_h, negatives[b, t + 1])  # logit of the sampled item
            total = total - torch.log(torch.sigmoid(positive)) - torch.log(1 - torch.sigmoid(negative))
            pairs += 1
    return total / max(pairs, 1)  # a batch without pairs gives 0, not 0/0


# ---------------------------------------------------------------------- #
# Reference solutions: the package's layers behind the check's signature
# ---------------------------------------------------------------------- #
def package_gru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """dien_tutorial.layers.GRUCell, run with the given weights (gradients flow to them)."""
    cell = GRUCell(x.shape[1], h.shape[1])
    weights = {"weight_ih": weight_ih, "weight_hh": weight_hh, "bias_ih": bias_ih, "bias_hh": bias_hh}
    return torch.func.functional_call(cell, weights, (x, h))


def torch_gru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """torch.nn.GRUCell itself."""
    cell = torch.nn.GRUCell(x.shape[1], h.shape[1])
    weights = {"weight_ih": weight_ih, "weight_hh": weight_hh, "bias_ih": bias_ih, "bias_hh": bias_hh}
    return torch.func.functional_call(cell, weights, (x, h))


def package_augru_evolve_interest(x, h, a, cell):
    """One step of the package's evolve_interest loop (the ONNX path of InterestEvolving)."""
    input_proj = F.linear(x, cell.weight_ih, cell.bias_ih).unsqueeze(1)  # [B, 1, 3H]
    return evolve_interest(input_proj, a.unsqueeze(1), cell.weight_hh, cell.bias_hh, h, True)


def package_augru_packed_gru(x, h, a, cell):
    """One step of the package's packed_gru (the training path of InterestEvolving)."""
    input_proj = F.linear(x, cell.weight_ih, cell.bias_ih)  # [B, 3H]: one step, all B rows active
    _, final = packed_gru(input_proj, [x.shape[0]], cell.weight_hh, cell.bias_hh, h, step_scale=a)
    return final


def augru_step_via_cell(x, h, a, cell):
    """Another correct form: move from h towards the plain GRU step by a, h + a (g - h)."""
    return h + a[:, None] * (cell(x, h) - h)


def package_aux_loss(states, clicked, negatives, lengths, W):
    """dien_tutorial.layers.AuxiliaryLoss with the 'inner' scorer and W as its projection."""
    hidden, behaviour = states.shape[-1], clicked.shape[-1]
    module = AuxiliaryLoss(hidden, behaviour, "inner", ())
    mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]  # [B, T]
    return torch.func.functional_call(module, {"project.weight": W}, (states, clicked, negatives, mask)).loss


def aux_loss_vectorised(states, clicked, negatives, lengths, W):
    """Another correct form: all pairs at once, masked mean."""
    pair = torch.arange(states.shape[1] - 1)[None, :] < (lengths - 1)[:, None]  # [B, T-1]
    mapped = states[:, :-1] @ W.T  # [B, T-1, E]
    pos = (mapped * clicked[:, 1:]).sum(-1)
    neg = (mapped * negatives[:, 1:]).sum(-1)
    per = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="none") + \
        F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")
    return (per * pair).sum() / pair.sum().clamp_min(1)


def softmax_large_negative(scores, mask):
    """Another correct form: fill padding with -1e9 (no NaN), then zero it."""
    return torch.softmax(scores.masked_fill(~mask, -1e9), dim=1) * mask


def softmax_by_hand(scores, mask):
    """Another correct form: exp of scores minus the row's valid maximum."""
    filled = scores.masked_fill(~mask, float("-inf"))
    top = filled.max(dim=1, keepdim=True).values  # [B, 1], -inf for an empty row
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(filled - top)  # 0 on padding
    return e / e.sum(dim=1, keepdim=True).clamp_min(1e-30)


def sample_negatives_redraw(positives, n_items, rng):
    """Draw real items uniformly; redraw those equal to their positive."""
    neg = rng.integers(FIRST_ID, n_items, size=len(positives))
    hit = neg == positives
    while hit.any():
        neg[hit] = rng.integers(FIRST_ID, n_items, size=int(hit.sum()))
        hit = neg == positives
    return neg


def sample_negatives_shift(positives, n_items, rng):
    """Draw among the n_items - 3 other real items and step over the positive: no redraws."""
    neg = rng.integers(FIRST_ID, n_items - 1, size=len(positives))
    return neg + (neg >= positives)


def package_sampler(positives, n_items, rng):
    """dien_tutorial.data.samples.sample_negatives, every draw its own user with one click."""
    users = np.arange(len(positives), dtype=np.int64)
    clicked = np.sort(users * n_items + positives)
    pool = np.arange(FIRST_ID, n_items)
    seed = int(rng.integers(2**31))
    return sample_negatives(users.astype(np.uint64), users, clicked, pool, n_items, seed, stream=0)


def package_history_windows(frame, max_len):
    """The windows of build_samples, with the package's own run finder."""
    user_code = pd.factorize(frame["user"])[0]
    user_start = _run_starts(user_code)
    day_start = _run_starts(user_code, frame["time"].to_numpy())
    return np.maximum(user_start, day_start - max_len), day_start


REFERENCES = [
    (check_gru_cell, notebook_gru_step, 6),
    (check_gru_cell, package_gru_step, 6),
    (check_gru_cell, torch_gru_step, 6),
    (check_masked_softmax, masked_softmax, 9),
    (check_masked_softmax, softmax_large_negative, 9),
    (check_masked_softmax, softmax_by_hand, 9),
    (check_augru_cell, notebook_augru_step, 8),
    (check_augru_cell, package_augru_evolve_interest, 8),
    (check_augru_cell, package_augru_packed_gru, 8),
    (check_augru_cell, augru_step_via_cell, 8),
    (check_aux_loss, notebook_aux_loss_by_hand, 8),
    (check_aux_loss, package_aux_loss, 8),
    (check_aux_loss, aux_loss_vectorised, 8),
    (check_negative_sampler, sample_negatives_redraw, 8),
    (check_negative_sampler, sample_negatives_shift, 8),
    (check_negative_sampler, package_sampler, 8),
    (check_history_windows, notebook_history_windows, 9),
    (check_history_windows, package_history_windows, 9),
    # The package's versions that passed_or_reference puts in place of a failing function.
    (check_history_windows, checks.reference_history_windows, 9),
    (check_negative_sampler, checks.reference_sample_negatives, 8),
    (check_gru_cell, checks.reference_gru_step, 6),
    (check_masked_softmax, checks.reference_masked_softmax, 9),
    (check_augru_cell, checks.reference_augru_step, 8),
    (check_aux_loss, checks.reference_aux_loss, 8),
]
CHECKS = [check_gru_cell, check_masked_softmax, check_augru_cell, check_aux_loss, check_negative_sampler,
          check_history_windows]


def _id(value):
    return getattr(value, "__name__", str(value))


@pytest.mark.parametrize(("check", "solution", "n_properties"), REFERENCES, ids=_id)
def test_every_reference_solution_passes_every_property(check, solution, n_properties):
    report = check(solution, raise_on_fail=True)
    assert report.passed and bool(report)
    assert report.failure is None and report.failed_property is None and report.inputs is None
    assert len(report.verified) == n_properties
    assert str(report).splitlines()[0] == f"PASSED {check.__name__}: verified:"


# ---------------------------------------------------------------------- #
# Mistakes: the right property fails, with a message that says so
# ---------------------------------------------------------------------- #
# (check, mistake, words of the property that must fail, words of the hint or None)
MISTAKES = [
    (check_gru_cell, m.gru_step_r_z_swapped, "equals torch.nn.GRUCell", "r and z swapped"),
    (check_gru_cell, m.gru_step_convention_flipped, "equals torch.nn.GRUCell", "KEEP gate"),
    (check_gru_cell, m.gru_step_reset_before_product, "equals torch.nn.GRUCell", "reset gate applied before"),
    (check_gru_cell, m.gru_step_squeezes_batch, "tensor [B, H], also for B = 1", ".squeeze()"),
    (check_gru_cell, m.gru_step_in_place, "leaves its inputs unchanged", "out-of-place"),
    (check_masked_softmax, m.softmax_ignores_mask, "get weight exactly 0", "padding was not masked"),
    (check_masked_softmax, m.softmax_over_size_one_dim, "sum to 1", "dimension of size 1"),
    (check_masked_softmax, m.softmax_mask_after, "sum to 1", "without renormalising"),
    (check_masked_softmax, m.softmax_nan_on_empty_row, "no valid step", "NaN"),
    (check_masked_softmax, m.softmax_multiplies_exp_by_mask, "even huge ones", "overflows"),
    (check_augru_cell, m.augru_gate_swapped_as_in_code, "a = 0 leaves the state h exactly unchanged",
     "authors' code convention"),
    (check_augru_cell, notebook_augru_step_as_in_code, "a = 0 leaves the state h exactly unchanged",
     "authors' code convention"),
    (check_augru_cell, m.augru_attention_on_candidate, "a = 0 leaves the state h exactly unchanged",
     "attention applied to the candidate"),
    (check_augru_cell, m.augru_scales_keep_gate, "a = 1 is a plain GRU step", "scales PyTorch's z"),
    (check_augru_cell, m.agru_instead_of_augru, "a = 1 is a plain GRU step", "AGRU"),
    (check_augru_cell, m.augru_attention_detached, "gradients", "attention must stay differentiable"),
    (check_aux_loss, m.aux_loss_pairs_same_step, "pairs h_t with the NEXT click", "pairs h_t with e_t"),
    (check_aux_loss, m.aux_loss_pairs_shifted, "pairs h_t with the NEXT click", "both shifted"),
    (check_aux_loss, m.aux_loss_mean_over_all_slots, "averages over the real pairs only",
     "mean over all B * (T - 1) = 16 slots"),
    (check_aux_loss, m.aux_loss_counts_padded_pairs, "averages over the real pairs only",
     "divided by B * (T - 1) = 16"),
    (check_aux_loss, m.aux_loss_nan_without_pairs, "without pairs", "0 / 0 = NaN"),
    (check_negative_sampler, m.negatives_may_equal_positive, "never equals its own positive", "two real items"),
    (check_negative_sampler, m.negatives_may_be_padding, "never a reserved code", "reserved"),
    (check_negative_sampler, m.negatives_global_rng, "same seed gives the same negatives", "global generator"),
    (check_negative_sampler, m.negatives_fixed_neighbour, "about the same share", "fixed neighbour"),
    (check_history_windows, m.history_includes_target, "never holds the target row itself", "before the target"),
    (check_history_windows, m.history_includes_future, "no click later in time", "later clicks"),
    (check_history_windows, m.history_includes_same_day, "target's own day", "FIRST row of the target's day"),
    (check_history_windows, m.history_without_max_len, "at most max_len", "end - max_len"),
    (check_history_windows, m.history_keeps_oldest, "most recent", "not the oldest"),
    (check_history_windows, m.history_one_short, "as long as allowed", "off-by-one"),
    (check_history_windows, m.history_adds_a_column, "leaves frame unchanged", "copy"),
]


@pytest.mark.parametrize(("check", "mistake", "prop", "hint"), MISTAKES, ids=_id)
def test_each_mistake_fails_the_property_it_breaks(check, mistake, prop, hint):
    report = check(mistake)
    assert not report.passed and not bool(report)
    assert prop in report.failed_property
    text = str(report)
    assert text.startswith(f"FAILED {check.__name__}: property: {report.failed_property}\n")
    for label in ("\n  input:", "\n  expected:", "\n  got:"):
        assert label in text
    if hint is not None:
        assert "\n  hint: " in text and hint in text
    # The properties before the failing one held, and they are the ones the report lists.
    passing = check(REFERENCES[[c for c, _, _ in REFERENCES].index(check)][1])
    assert report.verified == passing.verified[: len(report.verified)]
    assert passing.verified[len(report.verified)] == report.failed_property


@pytest.mark.parametrize(("check", "mistake", "prop", "hint"), MISTAKES[:3] + MISTAKES[10:12], ids=_id)
def test_raise_on_fail_raises_the_same_message(check, mistake, prop, hint):
    report = check(mistake)
    with pytest.raises(CheckFailed) as caught:
        check(mistake, raise_on_fail=True)
    assert str(caught.value) == str(report)
    assert isinstance(caught.value, AssertionError)
    with pytest.raises(CheckFailed):
        report.raise_if_failed()


def test_every_mistake_in_the_module_is_tested():
    tested = {fn.__name__ for _, fn, _, _ in MISTAKES}
    defined = {name for name, fn in inspect.getmembers(m, inspect.isfunction)
               if fn.__module__ == m.__name__ and not name.startswith("_")}
    assert defined - tested == {"stub", "crashes_with_value_error"}


# ---------------------------------------------------------------------- #
# The failure message: small input, real numbers, reproducible
# ---------------------------------------------------------------------- #
def test_gru_failure_prints_the_smallest_input_and_real_numbers():
    report = check_gru_cell(m.gru_step_r_z_swapped)
    inputs = report.inputs
    assert inputs["x"].shape == (1, 1) and inputs["h"].shape == (1, 1)  # B = I = H = 1 comes first
    assert "B = 1, I = 1, H = 1" in report.failure
    expected = torch.nn.GRUCell(1, 1).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(expected, name).copy_(inputs[name])
        want = expected(inputs["x"], inputs["h"]).item()
        got = m.gru_step_r_z_swapped(inputs["x"], inputs["h"], inputs["weight_ih"], inputs["weight_hh"],
                                     inputs["bias_ih"], inputs["bias_hh"])[0].item()
    assert abs(want - got) > 1e-3  # the mistake really differs here
    assert f"expected: [[{want:.4f}]]" in report.failure
    assert f"got: [[{got:.4f}]]" in report.failure


def test_augru_failure_shows_h_as_expected_for_a_zero():
    report = check_augru_cell(m.augru_gate_swapped_as_in_code)
    h, a = report.inputs["h"], report.inputs["a"]
    assert torch.equal(a, torch.zeros_like(a))
    expected_block = report.failure.split("expected:")[1].split("got:")[0]
    for value in h.flatten().tolist():
        assert f"{value:.4f}" in expected_block


def test_aux_failure_reports_what_the_function_computes_on_report_inputs():
    report = check_aux_loss(m.aux_loss_mean_over_all_slots)
    inputs = report.inputs
    assert inputs["lengths"].tolist() == [0, 1, 2, 5]
    got = float(m.aux_loss_mean_over_all_slots(**inputs))
    want = float(notebook_aux_loss_by_hand(**inputs))
    assert f"got: {got:.6f}" in report.failure
    assert f"expected:\n      {want:.6f}" in report.failure
    assert abs(got - want) > 0.01


def test_history_failure_shows_the_target_users_timeline():
    report = check_history_windows(m.history_includes_same_day)
    assert report.inputs["max_len"] == 50
    assert "row 2: [start, end) = [0, 1): rows [0]" in report.failure  # expected
    assert "row 2: [start, end) = [0, 2): rows [0, 1]" in report.failure  # got
    assert "<- target" in report.failure


def test_sampler_failure_names_the_draw():
    report = check_negative_sampler(m.negatives_may_equal_positive)
    neg = m.negatives_may_equal_positive(report.inputs["positives"], report.inputs["n_items"],
                                         np.random.default_rng(report.inputs["seed"]))
    i = int(np.flatnonzero(neg == report.inputs["positives"])[0])
    assert f"negatives[{i}] = {neg[i]} for positives[{i}] = {neg[i]}" in report.failure


def test_reports_are_deterministic():
    for check, mistake, _, _ in MISTAKES[::4]:
        assert str(check(mistake)) == str(check(mistake))


# ---------------------------------------------------------------------- #
# Stubs and crashes give FAILED reports, not exceptions
# ---------------------------------------------------------------------- #
@pytest.mark.parametrize("check", CHECKS, ids=_id)
def test_a_stub_gives_a_failed_report_saying_it_is_not_filled_in(check):
    report = check(m.stub)
    assert not report.passed
    assert report.verified == []
    assert report.failed_property == "the solution is filled in"
    assert str(report) == (f"FAILED {check.__name__}: the solution is not filled in yet: stub raised "
                           "NotImplementedError. Write the function in place of the `raise NotImplementedError` "
                           "line, run its cell, then run this check again.")
    with pytest.raises(CheckFailed, match="not filled in yet"):
        check(m.stub, raise_on_fail=True)


@pytest.mark.parametrize("check", CHECKS, ids=_id)
def test_an_exception_gives_a_failed_report_naming_it_and_the_input(check):
    report = check(m.crashes_with_value_error)
    assert not report.passed
    assert "got: ValueError: operands could not be broadcast together" in report.failure
    assert "\n  input:" in report.failure
    assert report.inputs is not None


def test_a_non_callable_is_a_usage_error():
    with pytest.raises(TypeError, match="check_gru_cell takes your function"):
        check_gru_cell(torch.zeros(3))


# ---------------------------------------------------------------------- #
# Report object
# ---------------------------------------------------------------------- #
class _Printer:
    """Stands in for IPython's pretty printer."""

    def __init__(self) -> None:
        self.out = ""

    def text(self, value: str) -> None:
        self.out += value


def test_report_display_and_api():
    passed = check_negative_sampler(sample_negatives_redraw)
    lines = str(passed).splitlines()
    assert lines[0] == "PASSED check_negative_sampler: verified:"
    assert lines[1:] == [f"  - {p}" for p in passed.verified]
    printer = _Printer()
    passed._repr_pretty_(printer, cycle=False)
    assert printer.out == str(passed) == repr(passed)
    passed.raise_if_failed()  # no exception

    failed = check_negative_sampler(m.negatives_may_be_padding)
    printer = _Printer()
    failed._repr_pretty_(printer, cycle=False)
    assert printer.out == str(failed) == f"FAILED check_negative_sampler: {failed.failure}"
    assert isinstance(failed, CheckReport) and issubclass(CheckFailed, AssertionError)
    assert "(2 properties held before this one; report.inputs holds this input)" in failed.failure


def test_failure_message_never_shows_memory_addresses():
    texts = [str(check(mistake)) for check, mistake, _, _ in MISTAKES]
    assert not any(" at 0x" in text for text in texts)


# ---------------------------------------------------------------------- #
# Side effects, dtypes, speed
# ---------------------------------------------------------------------- #
def test_checks_leave_the_global_random_states_alone():
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    for check, solution, _ in REFERENCES:
        check(solution)
    check_negative_sampler(m.negatives_global_rng)  # draws from numpy's global generator itself
    check_augru_cell(m.augru_gate_swapped_as_in_code)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]


# ---------------------------------------------------------------------- #
# Shared inputs: every call gets its own copies
# ---------------------------------------------------------------------- #
def augru_zeroes_bias_first(x, h, a, cell):
    """Zeroes the cell's input bias in place, then computes the right step with what is left."""
    with torch.no_grad():
        cell.bias_ih.zero_()
    return notebook_augru_step(x, h, a, cell)


def augru_clamps_weights_after(x, h, a, cell):
    """The right step, then clamps the cell's recurrent weights in place."""
    out = notebook_augru_step(x, h, a, cell)
    with torch.no_grad():
        cell.weight_hh.clamp_(-0.1, 0.1)
    return out


def augru_casts_cell_to_float32(x, h, a, cell):
    """Casts the cell itself to float32 (Module.float() works in place), result back in float64."""
    cell.float()
    return notebook_augru_step(x.float(), h.float(), a.float(), cell).double()


def augru_replaces_a_weight(x, h, a, cell):
    """Rebinds a weight of the cell to a new parameter."""
    out = notebook_augru_step(x, h, a, cell)
    cell.bias_hh = torch.nn.Parameter(cell.bias_hh.detach() * 2)
    return out


@pytest.mark.parametrize(("mistake", "weight", "got"), [
    (augru_zeroes_bias_first, "bias_ih", "bias_ih was modified in place"),
    (augru_clamps_weights_after, "weight_hh", "weight_hh was modified in place"),
    (augru_casts_cell_to_float32, "weight_ih", "its dtype went from torch.float64 to torch.float32"),
    (augru_replaces_a_weight, "bias_hh", "bias_hh was modified in place"),
], ids=_id)
def test_augru_check_catches_a_function_that_changes_the_cells_weights(mistake, weight, got):
    report = check_augru_cell(mistake)
    assert not report.passed
    assert report.failed_property == "leaves its inputs and the cell's weights unchanged"
    assert f"expected: {weight} unchanged after the call" in report.failure
    assert got in report.failure
    assert "never write to them" in report.failure
    # The cell the report hands back is the one the check built, untouched by the calls.
    built = checks._augru_case(50, [0.5], 2, 3)
    assert report.inputs["cell"] is not built["cell"]
    for name in checks._WEIGHT_NAMES:
        assert torch.equal(getattr(report.inputs["cell"], name), getattr(built["cell"], name))
    # The same steps without the in-place change pass.
    assert check_augru_cell(notebook_augru_step).passed


def test_augru_check_hands_every_call_its_own_cell():
    seen = []

    def recording_step(x, h, a, cell):
        seen.append(cell)
        return notebook_augru_step(x, h, a, cell)

    report = check_augru_cell(recording_step, raise_on_fail=True)
    assert len(report.verified) == 8
    assert len(seen) >= 10 and len({id(c) for c in seen}) == len(seen)


def test_augru_check_still_names_an_input_changed_after_the_step():
    def step_then_scale_x(x, h, a, cell):
        out = notebook_augru_step(x, h, a, cell)
        x.mul_(2.0)
        return out

    report = check_augru_cell(step_then_scale_x)
    assert report.failed_property == "leaves its inputs and the cell's weights unchanged"
    assert "expected: x unchanged after the call" in report.failure
    assert "use out-of-place ops" in report.failure


def sampler_capped_at_60(positives, n_items, rng):
    """Right for small vocabularies, but draws only among the codes below 60."""
    top = min(n_items, 60)
    neg = rng.integers(FIRST_ID, top - 1, size=len(positives))
    return neg + (neg >= positives)


def sampler_returns_uint8(positives, n_items, rng):
    """Right codes, cast to uint8: codes above 255 wrap round."""
    return sample_negatives_shift(positives, n_items, rng).astype(np.uint8)


def sampler_returns_int16(positives, n_items, rng):
    """Right codes, cast to int16: codes above 32,767 wrap round."""
    return sample_negatives_shift(positives, n_items, rng).astype(np.int16)


def test_sampler_check_uses_large_vocabularies():
    report = check_negative_sampler(sampler_capped_at_60)
    assert report.failed_property == ("for a fixed positive, every other real item is drawn, each with about "
                                      "the same share")
    assert report.inputs["n_items"] == 5000
    assert "got: draws per tenth of the codes [2000, 0, 0, 0, 0, 0, 0, 0, 0, 0]; largest negative 58" in \
        report.failure
    assert "is the upper bound of the draw a fixed number instead of n_items?" in report.failure


@pytest.mark.parametrize(("sampler", "n_items", "limit"), [
    (sampler_returns_uint8, 5000, 255),
    (sampler_returns_int16, 100_000, 32767),
], ids=_id)
def test_sampler_check_rejects_a_dtype_too_narrow_for_the_codes(sampler, n_items, limit):
    report = check_negative_sampler(sampler)
    assert report.failed_property == "returns one integer code per positive, shape [N]"
    assert report.inputs["n_items"] == n_items
    assert f"holds codes up to {limit} only, larger ones wrap round" in report.failure
    assert f"every code up to n_items - 1 = {n_items - 1}" in report.failure


def test_sampler_check_accepts_int32_and_stays_fast():
    import time

    def int32_sampler(positives, n_items, rng):
        return sample_negatives_shift(positives, n_items, rng).astype(np.int32)

    start = time.perf_counter()
    check_negative_sampler(int32_sampler, raise_on_fail=True)
    assert time.perf_counter() - start < 2.0  # well under a second on an idle machine


def _float32(fn):
    """Run fn on float32 copies of its float tensors (what a float32-only implementation does)."""
    def wrapped(*args):
        return fn(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    wrapped.__name__ = fn.__name__ + "_float32"
    return wrapped


def augru_step_float32(x, h, a, cell):
    """AUGRU computed in float32 whatever the inputs."""
    weights = {name: getattr(cell, name).float() for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    x, h, a = x.float(), h.float(), a.float()
    i_r, i_z, i_n = F.linear(x, weights["weight_ih"], weights["bias_ih"]).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, weights["weight_hh"], weights["bias_hh"]).chunk(3, dim=-1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    u_att = a[:, None] * (1 - z)
    return (1 - u_att) * h + u_att * torch.tanh(i_n + r * h_n)


@pytest.mark.parametrize(("check", "solution"), [
    (check_gru_cell, _float32(notebook_gru_step)),
    (check_masked_softmax, _float32(masked_softmax)),
    (check_augru_cell, augru_step_float32),
    (check_aux_loss, _float32(notebook_aux_loss_by_hand)),
], ids=_id)
def test_implementations_that_compute_in_float32_pass(check, solution):
    check(solution, raise_on_fail=True)


# ---------------------------------------------------------------------- #
# The checks' own references agree with the package
# ---------------------------------------------------------------------- #
def test_history_reference_equals_the_windows_of_build_samples():
    log = simulate(SimulationConfig.tiny()).log
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny log may skip users with a single click
        samples = build_samples(log, max_len=4, seed=0)
    expected = checks._expected_rows(log.frame, 4)
    time_of_row = log.frame["time"].to_numpy()
    compared = 0
    for split in samples.splits.values():
        for start, length, t in zip(split.hist_start[::2], split.hist_len[::2], split.time[::2]):
            first_of_day = start + length  # a window ends at the first row of the target's day
            assert time_of_row[first_of_day] == t
            assert expected[first_of_day] == list(range(start, start + length))
            compared += 1
    assert compared == len(log.frame) - samples.counts["users_skipped_single_behaviour"]


def test_history_frames_hold_the_cases_the_properties_need():
    frame, _, _ = checks._history_frames()[0]
    validated = validate_log(frame, "hand-made frame").frame  # sorted, canonical, nothing dropped
    pd.testing.assert_frame_equal(validated, frame, check_dtype=False)
    same_day = frame.duplicated(["user", "time"]).sum()
    assert same_day == 3  # one pair for "ann", one triple for "cy"
    assert frame.groupby("user").size().to_dict() == {"ann": 5, "bob": 1, "cy": 8}


def test_history_reference_on_the_hand_made_frame():
    frame, _, _ = checks._history_frames()[0]  # ann: days 1 2 2 4 5; bob: 3; cy: days 1 2 3 3 3 4 6 7
    assert checks._expected_rows(frame, 3) == [
        [], [0], [0], [0, 1, 2], [1, 2, 3],  # ann: the two day-2 clicks share one history
        [],  # bob
        [], [6], [6, 7], [6, 7], [6, 7], [8, 9, 10], [9, 10, 11], [10, 11, 12],  # cy
    ]


# ---------------------------------------------------------------------- #
# The package's versions, and going on after a failed check
# ---------------------------------------------------------------------- #
def test_passed_or_reference_keeps_a_function_that_passed(capsys):
    report = check_gru_cell(notebook_gru_step)
    assert checks.passed_or_reference(report, notebook_gru_step, checks.reference_gru_step) is notebook_gru_step
    assert capsys.readouterr().out == ""


def test_passed_or_reference_puts_the_reference_in_place_of_a_failing_function(capsys):
    report = check_gru_cell(m.gru_step_r_z_swapped)
    stand_in = checks.passed_or_reference(report, m.gru_step_r_z_swapped, checks.reference_gru_step)
    note = " ".join(capsys.readouterr().out.split())
    assert note == ("Note: your gru_step_r_z_swapped has not passed check_gru_cell yet, so from here on "
                    "gru_step_r_z_swapped is the package's version, reference_gru_step, and the cells below run "
                    "with it. Fix gru_step_r_z_swapped, run its cell, then run this cell again.")
    case = checks._gru_inputs(5, 2, 3, 4)
    h_new, (r, z, n) = stand_in(*case.values())
    cell = checks._torch_cell(case)
    assert torch.allclose(h_new, cell(case["x"], case["h"]), atol=1e-12, rtol=0)
    assert torch.equal(h_new, (1 - z) * n + z * case["h"])
    assert stand_in.__name__ == "reference_gru_step"


def test_checking_the_stand_in_fails_and_says_why():
    """Running the check cell again without the student's own cell must not pass on the reference."""
    stand_in = checks.passed_or_reference(check_aux_loss(m.stub), m.stub, checks.reference_aux_loss)
    report = check_aux_loss(stand_in)
    assert not report.passed and report.verified == []
    assert report.failed_property == "the function checked is yours"
    assert str(report) == ("FAILED check_aux_loss: the function checked is not yours: it is the package's "
                           "reference_aux_loss, which passed_or_reference put in place of your stub because your "
                           "version had not passed yet. Run the cell that defines your stub again, then this "
                           "check.")
    with pytest.raises(CheckFailed, match="not yours"):
        check_aux_loss(stand_in, raise_on_fail=True)
    again = checks.passed_or_reference(report, stand_in, checks.reference_aux_loss)  # the cell run twice
    assert "the function checked is not yours" in str(check_aux_loss(again))
    assert "your stub" in str(check_aux_loss(again))


def test_passed_or_reference_rejects_misuse():
    report = check_masked_softmax(masked_softmax)
    with pytest.raises(TypeError, match="takes the report of a check first"):
        checks.passed_or_reference(masked_softmax, masked_softmax, checks.reference_masked_softmax)
    with pytest.raises(TypeError, match="reference must be a function"):
        checks.passed_or_reference(report, masked_softmax, None)


def test_reference_history_windows_equals_the_brute_force_windows():
    log = simulate(SimulationConfig.tiny()).log
    start, end = checks.reference_history_windows(log.frame, 4)
    assert start.dtype == end.dtype == np.int64
    assert [list(range(a, b)) for a, b in zip(start, end)] == checks._expected_rows(log.frame, 4)
    empty_start, empty_end = checks.reference_history_windows(log.frame.iloc[:0], 4)
    assert empty_start.shape == empty_end.shape == (0,)


def test_reference_sampler_refuses_what_it_cannot_draw_from():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="n_items = 3: drawing a negative other than the positive needs at least two"):
        checks.reference_sample_negatives(np.array([2]), 3, rng)
    with pytest.raises(ValueError, match=r"positives\[1\] = 1 is not a real item code \(2 .. 9\)"):
        checks.reference_sample_negatives(np.array([2, 1]), 10, rng)
    neg = checks.reference_sample_negatives(np.array([2, 3, 9]), 10, np.random.default_rng(4))
    assert neg.shape == (3,) and ((neg >= 2) & (neg < 10) & (neg != [2, 3, 9])).all()
