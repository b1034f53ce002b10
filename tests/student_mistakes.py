"""Wrong implementations that people really write, one function per mistake.

Each function has the signature of the part it gets wrong (see
``dien_tutorial.checks``) and runs without an error on the inputs of the
checks: only its numbers are wrong. ``tests/test_checks.py`` proves that the
right check fails on every one of them, naming the property that breaks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------- #
# GRU step: gru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
# ---------------------------------------------------------------------- #
def _gru_blocks(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """The three input and three state pre-activations, [B, H] each."""
    i_r, i_z, i_n = F.linear(x, weight_ih, bias_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, weight_hh, bias_hh).chunk(3, dim=-1)
    return i_r, i_z, i_n, h_r, h_z, h_n


def gru_step_r_z_swapped(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """Reads the stacked rows as (z, r, n) instead of PyTorch's (r, z, n)."""
    i_z, i_r, i_n, h_z, h_r, h_n = _gru_blocks(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h, (r, z, n)


def gru_step_convention_flipped(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """Treats PyTorch's keep gate z as the write gate: h_new = z * n + (1 - z) * h."""
    i_r, i_z, i_n, h_r, h_z, h_n = _gru_blocks(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return z * n + (1 - z) * h


def gru_step_reset_before_product(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """The textbook variant W_hn (r * h): a different cell from PyTorch's."""
    i_r, i_z, i_n, h_r, h_z, _ = _gru_blocks(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    W_hn, b_hn = weight_hh.chunk(3)[2], bias_hh.chunk(3)[2]
    n = torch.tanh(i_n + F.linear(r * h, W_hn, b_hn))
    return (1 - z) * n + z * h


def gru_step_squeezes_batch(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """Right numbers, but ``.squeeze()`` drops the batch dimension when B = 1."""
    i_r, i_z, i_n, h_r, h_z, h_n = _gru_blocks(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * h).squeeze()


def gru_step_in_place(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """Right numbers, but it overwrites the caller's h."""
    i_r, i_z, i_n, h_r, h_z, h_n = _gru_blocks(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    with torch.no_grad():
        h.mul_(z).add_((1 - z) * n)
    return h


# ---------------------------------------------------------------------- #
# Masked softmax: masked_softmax(scores, mask)
# ---------------------------------------------------------------------- #
def softmax_ignores_mask(scores, mask):
    """A softmax over every step, padding included."""
    return torch.softmax(scores, dim=1)


def softmax_over_size_one_dim(scores, mask):
    """A softmax over a trailing dimension of size 1: every valid weight is 1."""
    weights = torch.softmax(scores.unsqueeze(-1), dim=-1).squeeze(-1)  # [B, T], all ones
    return weights * mask


def softmax_mask_after(scores, mask):
    """Masks after the softmax and does not renormalise: rows sum to less than 1."""
    return torch.softmax(scores, dim=1) * mask


def softmax_nan_on_empty_row(scores, mask):
    """-inf on padding, then a softmax: a row without valid steps becomes NaN."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)


def softmax_multiplies_exp_by_mask(scores, mask):
    """exp(s) * mask / sum: exp of a huge padded score is inf, and inf * 0 is NaN."""
    e = torch.exp(scores) * mask
    return e / e.sum(dim=1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------- #
# AUGRU step: augru_step(x, h, a, cell)
# ---------------------------------------------------------------------- #
def _gates(x, h, cell):
    """PyTorch's reset gate r, keep gate z and candidate n of one step."""
    i_r, i_z, i_n = F.linear(x, cell.weight_ih, cell.bias_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, cell.weight_hh, cell.bias_hh).chunk(3, dim=-1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    return r, z, torch.tanh(i_n + r * h_n)


def augru_gate_swapped_as_in_code(x, h, a, cell):
    """The authors' code: attention scales the KEEP gate, z' = (1 - a) z."""
    _, z, n = _gates(x, h, cell)
    keep = (1 - a[:, None]) * z
    return keep * h + (1 - keep) * n


def augru_attention_on_candidate(x, h, a, cell):
    """Attention multiplies the candidate instead of the update gate."""
    _, z, n = _gates(x, h, cell)
    u = 1 - z
    return (1 - u) * h + u * (a[:, None] * n)


def augru_scales_keep_gate(x, h, a, cell):
    """The paper's formula with PyTorch's z used as if it were the update gate u."""
    _, z, n = _gates(x, h, cell)
    u_att = a[:, None] * z
    return (1 - u_att) * h + u_att * n


def agru_instead_of_augru(x, h, a, cell):
    """AGRU: attention replaces the update gate."""
    _, _, n = _gates(x, h, cell)
    return (1 - a[:, None]) * h + a[:, None] * n


def augru_attention_detached(x, h, a, cell):
    """Right numbers, but the attention is cut from the graph (it would never be learned)."""
    _, z, n = _gates(x, h, cell)
    u_att = a.detach()[:, None] * (1 - z)
    return (1 - u_att) * h + u_att * n


# ---------------------------------------------------------------------- #
# Auxiliary loss: aux_loss(states, clicked, negatives, lengths, W)
# ---------------------------------------------------------------------- #
def _pair_bce(state, positive, negative, W):
    w_h = W @ state  # [E]
    pos, neg = torch.dot(w_h, positive), torch.dot(w_h, negative)
    return F.softplus(-pos) + F.softplus(neg)


def aux_loss_pairs_same_step(states, clicked, negatives, lengths, W):
    """Scores h_t against e_t, the click the state has already read."""
    total, pairs = 0.0, 0
    for b in range(len(lengths)):
        for t in range(int(lengths[b]) - 1):
            total = total + _pair_bce(states[b, t], clicked[b, t], negatives[b, t], W)
            pairs += 1
    return total / max(pairs, 1)


def aux_loss_pairs_shifted(states, clicked, negatives, lengths, W):
    """Scores h_{t+1} against e_{t+1}: both indices shifted."""
    total, pairs = 0.0, 0
    for b in range(len(lengths)):
        for t in range(int(lengths[b]) - 1):
            total = total + _pair_bce(states[b, t + 1], clicked[b, t + 1], negatives[b, t + 1], W)
            pairs += 1
    return total / max(pairs, 1)


def aux_loss_mean_over_all_slots(states, clicked, negatives, lengths, W):
    """Vectorised, but averages over all B * (T - 1) slots: padding is not masked."""
    mapped = states[:, :-1] @ W.T  # [B, T-1, E]
    pos = (mapped * clicked[:, 1:]).sum(-1)
    neg = (mapped * negatives[:, 1:]).sum(-1)
    return (F.softplus(-pos) + F.softplus(neg)).mean()


def aux_loss_counts_padded_pairs(states, clicked, negatives, lengths, W):
    """Sums the real pairs only, but divides by the number of slots, B * (T - 1)."""
    steps = states.shape[1]
    pair = torch.arange(steps - 1)[None, :] < (lengths - 1)[:, None]  # [B, T-1]
    mapped = states[:, :-1] @ W.T
    pos = (mapped * clicked[:, 1:]).sum(-1)
    neg = (mapped * negatives[:, 1:]).sum(-1)
    per = (F.softplus(-pos) + F.softplus(neg)) * pair
    return per.sum() / pair.numel()


def aux_loss_nan_without_pairs(states, clicked, negatives, lengths, W):
    """Right on batches with pairs; 0 / 0 = NaN on a batch without any."""
    steps = states.shape[1]
    pair = torch.arange(steps - 1)[None, :] < (lengths - 1)[:, None]
    mapped = states[:, :-1] @ W.T
    pos = (mapped * clicked[:, 1:]).sum(-1)[pair]
    neg = (mapped * negatives[:, 1:]).sum(-1)[pair]
    return (F.softplus(-pos) + F.softplus(neg)).sum() / pair.sum()


# ---------------------------------------------------------------------- #
# Negative sampler: sample_negatives(positives, n_items, rng)
# ---------------------------------------------------------------------- #
def negatives_may_equal_positive(positives, n_items, rng):
    """Uniform over the real items, but never checks against the positive."""
    return rng.integers(2, n_items, size=len(positives))


def negatives_may_be_padding(positives, n_items, rng):
    """Avoids the positive, but draws from every code, padding and unknown included."""
    neg = rng.integers(0, n_items, size=len(positives))
    hit = neg == positives
    while hit.any():
        neg[hit] = rng.integers(0, n_items, size=int(hit.sum()))
        hit = neg == positives
    return neg


def negatives_global_rng(positives, n_items, rng):
    """Right distribution, but draws from numpy's global generator, not from rng."""
    neg = np.random.randint(2, n_items - 1, size=len(positives))
    return neg + (neg >= positives)


def negatives_fixed_neighbour(positives, n_items, rng):
    """Replaces a hit by the next item: that item gets twice its share."""
    neg = rng.integers(2, n_items, size=len(positives))
    hit = neg == positives
    neg[hit] = 2 + (neg[hit] - 1) % (n_items - 2)  # the next real item, wrapping round
    return neg


# ---------------------------------------------------------------------- #
# History windows: history_windows(frame, max_len) -> (start, end)
# ---------------------------------------------------------------------- #
def _firsts(frame):
    """First row of each row's user and of each row's (user, day)."""
    row = np.arange(len(frame))
    first_of_user = row - frame.groupby("user").cumcount().to_numpy()
    first_of_day = row - frame.groupby(["user", "time"]).cumcount().to_numpy()
    return row, first_of_user, first_of_day


def history_includes_target(frame, max_len):
    """Ends the window after the row itself."""
    row, first_of_user, _ = _firsts(frame)
    end = row + 1
    return np.maximum(first_of_user, end - max_len), end


def history_includes_future(frame, max_len):
    """The user's whole timeline (the latest max_len clicks) as every row's history."""
    row, first_of_user, _ = _firsts(frame)
    end = first_of_user + frame.groupby("user")["user"].transform("size").to_numpy()
    return np.maximum(first_of_user, end - max_len), end


def history_includes_same_day(frame, max_len):
    """Trusts ``order``: ends at the previous row, so earlier clicks of the same day get in."""
    row, first_of_user, _ = _firsts(frame)
    end = row
    return np.maximum(first_of_user, end - max_len), end


def history_without_max_len(frame, max_len):
    """Forgets the cap: every earlier day, however many clicks."""
    _, first_of_user, first_of_day = _firsts(frame)
    return first_of_user, first_of_day


def history_keeps_oldest(frame, max_len):
    """Caps at max_len, but keeps the user's first clicks instead of the most recent."""
    _, first_of_user, first_of_day = _firsts(frame)
    return first_of_user, np.minimum(first_of_day, first_of_user + max_len)


def history_one_short(frame, max_len):
    """Off by one: keeps only max_len - 1 clicks."""
    _, first_of_user, first_of_day = _firsts(frame)
    return np.maximum(first_of_user, first_of_day - max_len + 1), first_of_day


def history_adds_a_column(frame, max_len):
    """Right windows, but writes a helper column into the caller's frame."""
    frame["day"] = frame["time"] // 86_400
    row = np.arange(len(frame))
    first_of_user = row - frame.groupby("user").cumcount().to_numpy()
    first_of_day = row - frame.groupby(["user", "day"]).cumcount().to_numpy()
    return np.maximum(first_of_user, first_of_day - max_len), first_of_day


# ---------------------------------------------------------------------- #
# Stubs, as a notebook hands them out
# ---------------------------------------------------------------------- #
def stub(*args):
    """An exercise not filled in yet."""
    raise NotImplementedError("write this function")


def crashes_with_value_error(*args):
    """A solution that fails on its input."""
    raise ValueError("operands could not be broadcast together")

