"""The building blocks of DIEN: recurrent cells, attention, auxiliary loss.

Read top to bottom, the module follows the model from the inside out:

1. :class:`GRUCell`: one GRU step written out, interchangeable with
   ``torch.nn.GRU``.
2. :func:`evolve_interest`: the loop of the interest evolving layer, shared
   by AUGRU, AGRU and AIGRU (TorchScript-compilable), then
   :class:`PackedSteps` and :func:`packed_gru`: the same loop over the valid
   steps only, which is what training and evaluation run, compiled by
   TorchScript (:func:`scripted`), and :class:`PackedGRUFunction`, its
   hand-written backward.
3. :class:`InterestExtractor`: the first GRU, over the behaviour sequence.
4. :func:`masked_softmax` and :class:`AttentionUnit`: how much each history
   step matters for the target item.
5. :class:`InterestEvolving`: the second GRU, steered by attention.
6. :class:`AuxiliaryLoss`: supervises every extractor state with the next
   behaviour.
7. :class:`Dice` (with :class:`DiceFunction`, its hand-written backward)
   and :class:`MLP`: the prediction head.

Shape legend (used in every shape comment below):

- ``B``: batch size (users).
- ``T``: history steps after padding; step ``t`` is valid iff
  ``t < length``, so valid steps come first and padding last.
- ``E``: width of one embedded behaviour, item embedding ++ category
  embedding.
- ``H``: hidden width of the GRUs.
- ``K``: width of the attention keys (``H`` for DIEN, ``E`` for DIN).
- ``Q``: width of the attention query before projection (``E``).
- ``A``: width of a hidden layer of an MLP.
- ``P``: number of valid history steps in the batch (the rows of a
  packed tensor, see :class:`PackedSteps`).
- ``P'``: number of valid auxiliary-loss pairs in the batch.
- ``n_t``: number of users whose history is longer than ``t``.
- ``D``: width of the prediction head's input.

Masks are bool tensors ``[B, T]``, True on valid steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dien_tutorial.config import DIEN_EVOLVING_KINDS

# Dice normalises with an epsilon inside the square root; 1e-8 is the value
# given in the DIN paper (Zhou et al., 2018, eq. 9).
DICE_EPS = 1e-8
# Weight of the newest batch in Dice's running statistics: PyTorch's
# BatchNorm default.
DICE_MOMENTUM = 0.1


def scripted(fn: Callable) -> Callable:
    """``torch.jit.script(fn)``: the function compiled by TorchScript.

    The packed GRU loops below and DIN's hand-written training step
    (:mod:`dien_tutorial.din_step`) are compiled once, when their module is
    imported, and ONNX export (:mod:`dien_tutorial.export`) compiles
    :func:`evolve_interest` when it runs. Torch 2.13 marks
    ``torch.jit.script`` deprecated; it still works, so that one warning is
    silenced around the call. With the environment variable
    ``PYTORCH_JIT=0`` it returns ``fn`` unchanged, which lets a debugger
    step through the loops.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=DeprecationWarning)
        return torch.jit.script(fn)


# ---------------------------------------------------------------------- #
# 1. GRU cell
# ---------------------------------------------------------------------- #
class GRUCell(nn.Module):
    """One GRU step, with exactly the equations of ``torch.nn.GRU``::

        r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)        # reset gate
        z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)        # update gate
        n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))     # candidate
        h' = (1 - z) * n + z * h

    Gate convention: in PyTorch, ``z`` is the KEEP gate (``z = 1`` keeps the
    old state), as in Cho et al. (2014). The DIEN paper calls its update gate
    ``u`` and uses it as the WRITE gate: ``h' = (1 - u) * h + u * n``. The
    two describe the same cell with ``u = 1 - z``. Everything in this
    package that follows the paper (AUGRU, AGRU) is written with ``u``.

    The parameters have the names, shapes and row order (r, z, n) of
    ``torch.nn.GRUCell``, which are those of layer 0 of ``torch.nn.GRU``
    without the ``_l0`` suffix, so weights copy across unchanged
    (:meth:`copy_from_torch`, :meth:`to_torch_gru`).

    Args:
        input_size: width of ``x``.
        hidden_size: width of ``h``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        gates = 3 * hidden_size  # r, z and n stacked row-wise
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates))
        self.bias_hh = nn.Parameter(torch.empty(gates))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's GRU initialisation: uniform in ``±1/sqrt(H)``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def input_projection(self, x: Tensor) -> Tensor:
        """``W_i x + b_i`` for all three gates, for any number of steps.

        The input half of a GRU step does not depend on the state, so a
        sequence can project all its steps in one matrix product before the
        loop starts.

        Args:
            x: inputs ``[..., I]``.

        Returns:
            ``[..., 3H]``, gates in the order r, z, n.
        """
        return F.linear(x, self.weight_ih, self.bias_ih)  # [..., 3H]

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """One step.

        Args:
            x: input ``[B, I]``.
            h: previous state ``[B, H]``.

        Returns:
            The next state ``[B, H]``.
        """
        gi = self.input_projection(x)  # [B, 3H]
        gh = F.linear(h, self.weight_hh, self.bias_hh)  # [B, 3H]
        i_r, i_z, i_n = gi.chunk(3, dim=-1)  # 3 x [B, H]
        h_r, h_z, h_n = gh.chunk(3, dim=-1)  # 3 x [B, H]
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h

    @torch.no_grad()
    def copy_from_torch(self, gru: nn.GRU | nn.GRUCell) -> None:
        """Copy the weights of a one-layer, one-direction GRU into this cell."""
        if isinstance(gru, nn.GRU):
            if gru.num_layers != 1 or gru.bidirectional or not gru.bias:
                raise ValueError("copy_from_torch needs a 1-layer, unidirectional GRU with bias")
            suffix = "_l0"
        else:
            suffix = ""
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(self, name).copy_(getattr(gru, name + suffix))

    @torch.no_grad()
    def to_torch_gru(self) -> nn.GRU:
        """A ``torch.nn.GRU`` (``batch_first=True``) with this cell's weights."""
        gru = nn.GRU(self.input_size, self.hidden_size, batch_first=True)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, name + "_l0").copy_(getattr(self, name))
        return gru


# ---------------------------------------------------------------------- #
# 2. The attention-steered recurrence
# ---------------------------------------------------------------------- #
def evolve_interest(
    input_proj: Tensor,
    step_scale: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor,
    h0: Tensor,
    use_update_gate: bool,
) -> Tensor:
    """Run the interest evolving GRU over all steps; return the last state.

    In the paper's notation, with ``u`` the WRITE gate (``u = 1 - z`` for
    PyTorch's keep gate ``z``) and ``s_t`` the step scale::

        u'_t = s_t * u_t      if use_update_gate   (AUGRU, AIGRU, plain GRU)
        u'_t = s_t            otherwise            (AGRU)
        h_t  = (1 - u'_t) * h_{t-1} + u'_t * n_t

    so ``s_t = 0`` leaves the state exactly unchanged and ``s_t = 1`` is an
    ordinary GRU step. The caller folds the padding mask into ``s_t`` (it is
    0 on padded steps), so the state after the loop is the state at each
    user's true last step, and ``h0`` for a user with no history.

    Written for ``torch.jit.script``: plain tensors and a bool in, a ``for``
    over ``unbind`` lists, so a scripted version is a loop whose trip count
    is the runtime ``T`` (an ONNX ``Loop`` on export). ``unbind`` rather than
    ``input_proj[:, t]`` because indexing a tensor that requires grad inside
    the loop makes backward allocate and fill a full ``[B, T, 3H]`` gradient
    for every step (forward plus backward 2.7x to 5x slower when we measured it);
    ``unbind`` has a single backward for all steps.

    Args:
        input_proj: ``W_i x_t + b_i`` for every step, ``[B, T, 3H]``, gates
            in PyTorch's order r, z, n (see :meth:`GRUCell.input_projection`).
        step_scale: ``s_t``, ``[B, T]``.
        weight_hh: ``W_h``, ``[3H, H]``.
        bias_hh: ``b_h``, ``[3H]``.
        h0: initial state ``[B, H]``.
        use_update_gate: False for AGRU, where attention replaces the gate.

    Returns:
        The final state ``[B, H]``.
    """
    hidden = h0.shape[1]
    # Split the projection into its (r, z) and n parts once, outside the
    # loop, so each step does a single add and sigmoid for both gates.
    gates_in, cand_in = input_proj.split([2 * hidden, hidden], dim=2)  # [B, T, 2H], [B, T, H]
    h = h0
    for gi_rz, gi_n, s in zip(
        gates_in.unbind(1),  # T x [B, 2H]
        cand_in.unbind(1),  # T x [B, H]
        step_scale.unsqueeze(-1).unbind(1),  # T x [B, 1]
    ):
        gh_rz, gh_n = F.linear(h, weight_hh, bias_hh).split([2 * hidden, hidden], dim=1)  # [B, 2H], [B, H]
        r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, dim=1)  # 2 x [B, H]
        n = torch.tanh(torch.addcmul(gi_n, r, gh_n))  # [B, H]: tanh(gi_n + r * gh_n)
        # torch.lerp(a, b, w) = a + w * (b - a), exactly a when w = 0 and
        # exactly b when w = 1: the paper's (1 - w) a + w b in one op.
        if use_update_gate:
            # The plain GRU step, then a move from h towards it by s:
            # h + s * (g - h) = h + (s * u) * (n - h), i.e. u' = s * u.
            g = torch.lerp(n, h, z)  # [B, H]: (1 - z) n + z h
            h = torch.lerp(h, g, s)  # [B, H]
        else:
            h = torch.lerp(h, n, s)  # [B, H]: s replaces the update gate
    return h


# ---------------------------------------------------------------------- #
# 2b. The same loop over the valid steps only
# ---------------------------------------------------------------------- #
class PackedSteps:
    """The valid steps of a right-padded batch, in step-major order.

    Histories are short: in Amazon Toys at ``T = 50`` about 88% of the
    ``B * T`` history slots of a batch are padding. Work on ``[B, T, ...]``
    tensors spends most of its time on them, and a loop over the steps
    updates padded rows only to keep them frozen. Sort the users by history
    length, longest first; then the users still reading their history at
    step ``t`` are the first ``n_t`` rows, and a step needs only those rows.
    Written step after step, the valid steps form one ``[P, ...]`` tensor:
    the layout of ``torch.nn.utils.rnn.PackedSequence``, built here by hand
    so that empty histories are allowed.

    Every layer below takes the history either padded, ``[B, T, ...]`` with
    its ``[B, T]`` mask, or packed, ``[P, ...]`` with a ``PackedSteps`` in
    place of the mask. :meth:`dien_tutorial.model.DIEN.forward` packs once
    and stays packed; the layers pack a padded input themselves. Packing
    changes the order of the work, never its result.

    Args:
        mask: valid steps ``[B, T]``, right-padded.
    """

    def __init__(self, mask: Tensor) -> None:
        batch, steps = mask.shape
        self.mask = mask
        self.batch, self.steps = batch, steps
        length = mask.sum(dim=1)  # [B]
        # order[i]: the batch row at sorted position i (longest history first).
        self.order = torch.argsort(length, descending=True, stable=True)  # [B]
        sorted_mask = mask.index_select(0, self.order).t()  # [T, B]: step-major
        # n_t for every step that has a valid entry; non-increasing.
        self.sizes: list[int] = [n for n in sorted_mask.sum(dim=1).tolist() if n > 0]
        # Where each packed entry sits in the flattened [B * T] batch, and
        # whose step it is.
        flat = self.order.unsqueeze(0) * steps + torch.arange(steps, device=mask.device).unsqueeze(1)  # [T, B]
        self.index = flat.masked_select(sorted_mask)  # [P]
        self.row = self.index.div(steps, rounding_mode="floor")  # [P]
        # Batch rows of the users with no valid step (they sort last).
        self.empty_rows = self.order[self.sizes[0] if self.sizes else 0:]  # [B - n_0]
        self._softmax_start: Tensor | None = None  # built by softmax()

    def pack(self, x: Tensor) -> Tensor:
        """``[B, T, ...]`` -> ``[P, ...]``: the valid steps, step-major."""
        # index_select rather than x.flatten(0, 1)[self.index]: the same
        # gather, several times faster on CPU, forward and backward.
        return x.flatten(0, 1).index_select(0, self.index)  # [P, ...]

    def unpack(self, data: Tensor) -> Tensor:
        """``[P, ...]`` -> ``[B, T, ...]``, zero on padded steps."""
        rest = data.shape[1:]
        out = data.new_zeros((self.batch * self.steps, *rest))  # [B*T, ...]
        return out.index_copy(0, self.index, data).view(self.batch, self.steps, *rest)

    def softmax(self, scores: Tensor) -> Tensor:
        """:func:`masked_softmax` of packed scores: ``[P]`` -> weights ``[B, T]``.

        The same numbers as ``masked_softmax(self.unpack(scores), mask)``
        in fewer operations: the padded slots are written as ``-inf``
        straight away (the softmax turns them into exactly 0, so they need
        no masking afterwards), and only users with no history at all need
        a fix: their row starts at 0 instead (``-inf`` everywhere would be
        NaN) and is zeroed after the softmax. Those users are known from
        the sorting (:attr:`empty_rows`), so the fix touches their rows only.
        """
        if self._softmax_start is None or self._softmax_start.dtype != scores.dtype:
            start = torch.full((self.batch, self.steps), float("-inf"), dtype=scores.dtype, device=scores.device)
            self._softmax_start = start.index_fill_(0, self.empty_rows, 0.0).flatten()  # [B*T]
        padded = self._softmax_start.index_copy(0, self.index, scores).view(self.batch, self.steps)  # [B, T]
        weights = torch.softmax(padded, dim=1)  # [B, T]
        return weights.index_fill(0, self.empty_rows, 0.0) if len(self.empty_rows) else weights

    def unsort(self, rows: Tensor) -> Tensor:
        """``[B, ...]`` in sorted order -> the same rows in batch order."""
        return torch.empty_like(rows).index_copy(0, self.order, rows)  # [B, ...]

    def sum_rows(self, data: Tensor) -> Tensor:
        """``[P, ...]`` -> ``[B, ...]``: each user's sum over the valid steps."""
        out = data.new_zeros((self.batch, *data.shape[1:]))  # [B, ...]
        return out.index_add(0, self.row, data)

    def next_step_pairs(self) -> tuple[Tensor, Tensor]:
        """Packed positions of every (step ``t``, step ``t + 1``) of one user.

        Step ``t + 1`` of the user at sorted position ``i`` follows step
        ``t`` by ``n_t`` entries, so the pairs are every entry after the
        first step and the entry ``n_t`` before it.

        Returns:
            ``(before [P'], after [P'])``, with ``P' = P - n_0``.
        """
        device = self.index.device
        if not self.sizes:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return empty, empty
        after = torch.arange(self.sizes[0], len(self.index), device=device)  # [P']
        sizes = torch.tensor(self.sizes, device=device)  # [T']
        before = after - torch.repeat_interleave(sizes[:-1], sizes[1:])  # [P']
        return before, after


def packed_gru(
    input_proj: Tensor,
    sizes: list[int],
    weight_hh: Tensor,
    bias_hh: Tensor,
    h0: Tensor,
    step_scale: Tensor | None = None,
    use_update_gate: bool = True,
) -> tuple[Tensor, Tensor]:
    """A GRU (or AUGRU/AGRU) over packed steps: every state and the last ones.

    The step is the one of :func:`evolve_interest` (see there for the
    equations). With ``step_scale=None`` it is the plain GRU step
    ``h' = (1 - z) n + z h`` of ``torch.nn.GRU``, which the interest
    extractor runs.

    Step ``t`` reads ``sizes[t]`` rows: the users whose history is longer
    than ``t`` (:class:`PackedSteps` sorts them to the top). When ``n_t``
    drops, the rows that fell off have reached their last step, and their
    state is set aside as final.

    Args:
        input_proj: ``W_i x + b_i`` of every valid step, packed, ``[P, 3H]``.
        sizes: ``n_t`` for each step (:attr:`PackedSteps.sizes`).
        weight_hh: ``W_h``, ``[3H, H]``.
        bias_hh: ``b_h``, ``[3H]``.
        h0: initial state of every user in sorted order, ``[B, H]``.
        step_scale: ``s_t`` of every valid step, packed, ``[P]``; None for
            a plain GRU.
        use_update_gate: False for AGRU (attention replaces the gate).

    Returns:
        ``(states [P, H], final [B, H])``: the state after every valid step
        (packed like the input), and each user's last state in sorted order
        (``h0`` for a user with no history).

    Speed: when a gradient is needed, the loop runs inside
    :class:`PackedGRUFunction`, whose hand-written backward gives the same
    gradients as autograd through :func:`packed_gru_loop` (the readable
    version, which runs otherwise) at a fraction of the cost.
    """
    tensors = (input_proj, weight_hh, bias_hh, h0, step_scale)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return PackedGRUFunction.apply(input_proj, step_scale, weight_hh, bias_hh, h0, sizes, use_update_gate)
    return packed_gru_loop(input_proj, sizes, weight_hh, bias_hh, h0, step_scale, use_update_gate)


def packed_gru_loop(
    input_proj: Tensor,
    sizes: list[int],
    weight_hh: Tensor,
    bias_hh: Tensor,
    h0: Tensor,
    step_scale: Tensor | None = None,
    use_update_gate: bool = True,
    record: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`packed_gru` as a plain loop of tensor operations.

    Same arguments and result as :func:`packed_gru`; autograd can run
    backward through it. The loop itself is :func:`_packed_steps`. A
    ``record`` dict, if given and there is a step, receives the values the
    hand-written backward of :class:`PackedGRUFunction` needs, packed like
    the states: under ``"h"`` the state entering each step ``[P, H]``,
    under ``"gh_n"`` the candidate's ``W_hn h + b_hn`` ``[P, H]``, under
    ``"rz"`` the two gates ``[P, 2H]`` and under ``"n"`` the candidate
    ``[P, H]``.
    """
    hidden = h0.shape[1]
    # Each step costs a few microseconds per operation whatever its size,
    # so the loop body is kept to as few operations as possible. The r and
    # z gates need gi + gh = (gi + b_h) + W_h h: their hidden bias joins the
    # inputs once, for all steps. The n gate needs W_hn h + b_hn on its own
    # (r multiplies it), so its columns start from b_hn. Then one addmm per
    # step gives [r, z pre-activations, W_hn h + b_hn].
    bias_rz, bias_n = bias_hh.split([2 * hidden, hidden])  # [2H], [H]
    start = torch.cat(
        [input_proj[:, : 2 * hidden] + bias_rz, bias_n.expand(input_proj.shape[0], hidden)], dim=1
    )  # [P, 3H]
    cand_in = input_proj[:, 2 * hidden:]  # [P, H]: W_in x + b_in
    packed_states, final, recorded = _PACKED_STEPS(
        start, cand_in, sizes, weight_hh.t(), h0, step_scale, use_update_gate, record is not None
    )
    if record is not None:
        record.update(zip(("h", "gh_n", "rz", "n"), recorded))
    return packed_states, final


def _packed_steps(
    start: Tensor,
    cand_in: Tensor,
    sizes: list[int],
    weight_t: Tensor,
    h0: Tensor,
    step_scale: Tensor | None,
    use_update_gate: bool,
    keep_record: bool,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The loop of :func:`packed_gru_loop`, run as TorchScript.

    Compiled with ``torch.jit.script`` (see :func:`scripted`): the same
    operations, without the Python interpreter's overhead between them,
    which made the loop about a quarter faster on CPU.

    Args:
        start: ``[P, 3H]``, each step's ``W_i x + b_i`` plus ``b_h`` for the
            r and z parts, ``b_hn`` for the n part.
        cand_in: ``[P, H]``, ``W_in x + b_in``.
        sizes: ``n_t`` for each step.
        weight_t: ``W_h`` transposed, ``[H, 3H]``.
        h0: ``[B, H]``.
        step_scale: ``[P]`` or None.
        use_update_gate: False for AGRU.
        keep_record: also return what the backward needs.

    Returns:
        ``(states [P, H], final [B, H], recorded)``, where ``recorded`` is
        ``[h, gh_n, rz, n]``, packed like the states: the state entering
        each step ``[P, H]``, ``W_hn h + b_hn`` ``[P, H]``, the gates r and
        z ``[P, 2H]`` and the candidate ``[P, H]``; or ``[]`` when
        ``keep_record`` is False or there is no step.
    """
    hidden = h0.shape[1]
    # Cut the inputs into steps once, before the loop (one backward for
    # all steps, as unbind in evolve_interest).
    start_steps = start.split(sizes)
    cand_steps = cand_in.split(sizes)
    scales: list[Tensor] = []
    if step_scale is not None:
        scales = step_scale.unsqueeze(-1).split(sizes)  # T' x [n_t, 1]
    h = h0
    states: list[Tensor] = []
    finished: list[Tensor] = []  # final states of users whose history ended
    seen_h: list[Tensor] = []
    seen_gh_n: list[Tensor] = []
    seen_rz: list[Tensor] = []
    seen_n: list[Tensor] = []
    for t in range(len(sizes)):
        active = sizes[t]  # n_t
        if active < h.shape[0]:
            finished.append(h[active:])
            h = h[:active]
        pre = torch.addmm(start_steps[t], h, weight_t)  # [n_t, 3H]
        rz = torch.sigmoid(pre[:, : 2 * hidden])  # [n_t, 2H]
        r, z = rz.chunk(2, dim=1)  # 2 x [n_t, H]
        gh_n = pre[:, 2 * hidden:]  # [n_t, H]
        n = torch.tanh(torch.addcmul(cand_steps[t], r, gh_n))  # [n_t, H]: tanh(gi_n + r * gh_n)
        if keep_record:
            seen_h.append(h)
            seen_gh_n.append(gh_n)
            seen_rz.append(rz)
            seen_n.append(n)
        if step_scale is None:
            h = torch.lerp(n, h, z)  # plain GRU: (1 - z) n + z h
        elif use_update_gate:
            h = torch.lerp(h, torch.lerp(n, h, z), scales[t])  # AUGRU: u' = s * u
        else:
            h = torch.lerp(h, n, scales[t])  # AGRU: s replaces the update gate
        states.append(h)
    finished.append(h)
    # Users fell off the bottom first, so the reversed list is in sorted order.
    finished.reverse()
    final = torch.cat(finished)  # [B, H]
    packed_states = torch.cat(states) if len(states) > 0 else h0.new_zeros((0, hidden))  # [P, H]
    recorded: list[Tensor] = []
    if keep_record and len(states) > 0:
        recorded = [torch.cat(seen_h), torch.cat(seen_gh_n), torch.cat(seen_rz), torch.cat(seen_n)]
    return packed_states, final, recorded


_PACKED_STEPS = scripted(_packed_steps)


class PackedGRUFunction(torch.autograd.Function):
    """:func:`packed_gru` with a hand-written backward.

    Why: autograd replays the loop backwards step by step, about 25 small
    kernels per step, each with its fixed overhead of a few microseconds,
    on tensors of ``n_t x H`` numbers (often a handful of rows). At batch
    256 that overhead was most of a DIEN training step.

    How: the gradient of one step is linear in the gradient ``G`` arriving
    at its output ``h'``, with coefficients that depend only on values of
    the forward pass. Writing ``gh = W_h h + b_h`` and ``x_pre`` for the
    input of a gate's sigmoid or tanh, and with ``s`` the step scale (1 for
    a plain GRU)::

        AUGRU / GRU:  h' = h + s (lerp(n, h, z) - h)
        AGRU:         h' = h + s (n - h)

        dL/dn_pre  = G * q_n * (1 - n^2)              = G * k_n
        dL/dz_pre  = G * q_z * z (1 - z)              = G * c_z
        dL/dr_pre  = G * k_n * gh_n * r (1 - r)       = G * c_r
        dL/dgh     = G * [c_r, c_z, k_n * r]          (r, z, n parts)
        dL/dgi     = G * [c_r, c_z, k_n]
        dL/dh      = G * keep + dL/dgh @ W_h          (the step before)

    with ``q_n = s (1 - z)``, ``q_z = s (h - n)``, ``keep = 1 - s (1 - z)``
    for AUGRU and GRU, and ``q_n = s``, ``q_z = 0``, ``keep = 1 - s`` for
    AGRU. So the backward computes every coefficient for all ``P`` steps at
    once (a few operations on ``[P, H]`` tensors), then runs the only truly
    sequential part, ``G_t += keep * G_{t+1} + dL/dgh_{t+1} @ W_h``, from
    the last step to the first: two kernels per step. Once every ``G`` is
    known, the gradients of the inputs, of ``W_h``, ``b_h`` and of the step
    scales (``sum_H G * (lerp(n, h, z) - h)``, or ``(n - h)`` for AGRU)
    are again single operations over all steps.

    The forward is :func:`packed_gru_loop` (without autograd), recording the
    gates. ``tests/test_fast_paths.py`` checks outputs and every gradient
    against autograd through :func:`packed_gru_loop`.
    """

    @staticmethod
    def forward(
        ctx,
        input_proj: Tensor,
        step_scale: Tensor | None,
        weight_hh: Tensor,
        bias_hh: Tensor,
        h0: Tensor,
        sizes: list[int],
        use_update_gate: bool,
    ) -> tuple[Tensor, Tensor]:
        record: dict[str, Tensor] = {}
        states, final = packed_gru_loop(
            input_proj, sizes, weight_hh, bias_hh, h0, step_scale, use_update_gate, record
        )
        saved = [record.get(key) for key in ("h", "gh_n", "rz", "n")]
        ctx.save_for_backward(step_scale, weight_hh, *saved)
        ctx.sizes = sizes
        ctx.use_update_gate = use_update_gate
        return states, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_states: Tensor, d_final: Tensor):
        step_scale, weight_hh, h_prev, gh_n, rz, n = ctx.saved_tensors
        sizes: list[int] = ctx.sizes
        if not sizes:  # no valid step: the final states are h0
            return None, None, None, None, d_final, None, None
        hidden = weight_hh.shape[1]
        total = h_prev.shape[0]  # P
        r, z = rz.chunk(2, dim=1)  # 2 x [P, H]

        # 1. Coefficients of every step, all at once, written in place into
        # one buffer (at large batches these passes over [P, H] are bound by
        # memory traffic, so no temporaries): coef[:, 0..3] = c_r, c_z,
        # k_n * r (that is, dh'/dgh for the r, z, n parts) and keep.
        coef = torch.empty(total, 4, hidden, dtype=n.dtype, device=n.device)  # [P, 4, H]
        c_r, c_z, c_hn, keep = coef.unbind(dim=1)  # 4 x [P, H], views of coef
        k_n = torch.mul(n, n).neg_().add_(1)  # [P, H]: 1 - n^2, tanh'
        if step_scale is None:  # plain GRU: q_n = 1 - z, q_z = h - n, keep = z
            torch.sub(1, z, out=keep)  # q_n for now
        else:
            s = step_scale.unsqueeze(1)  # [P, 1]
            if ctx.use_update_gate:  # AUGRU: q_n = s (1 - z), q_z = s (h - n)
                torch.sub(1, z, out=keep).mul_(s)  # q_n for now
            else:  # AGRU: q_n = s, q_z = 0, keep = 1 - s
                keep.copy_(s.expand(total, hidden))  # q_n for now
        k_n.mul_(keep)  # dh'/dn_pre = q_n (1 - n^2)
        if step_scale is not None and not ctx.use_update_gate:
            c_z.zero_()
        else:  # c_z = q_z z (1 - z) = (h - n) z q_n
            torch.sub(h_prev, n, out=c_z).mul_(z).mul_(keep)
        if step_scale is None:
            keep.copy_(z)
        else:
            torch.sub(1, keep, out=keep)  # keep = 1 - q_n
        torch.mul(k_n, r, out=c_hn)
        torch.mul(r, r, out=c_r)
        torch.sub(r, c_r, out=c_r).mul_(gh_n).mul_(k_n)  # r (1 - r) gh_n k_n
        # dL/dh = [dL/dgh, G * keep] @ [W_h; I]: with keep as a fourth
        # "gate" whose weight is the identity, the step before gets its
        # whole gradient from one product.
        identity = torch.eye(hidden, dtype=weight_hh.dtype, device=weight_hh.device)  # [H, H]
        weight_aug = torch.cat([weight_hh, identity])  # [4H, H]

        # 2. G: the gradient at every step's output. It starts as what
        # arrives from outside: d_states, plus d_final at each user's last
        # step (sorted user i's last step is the last t with n_t > i).
        grad = d_states.clone()  # [P, H]
        first = sizes[0]  # users with any history: sorted rows 0 .. n_0 - 1
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        users = torch.arange(first, device=grad.device)  # [n_0]
        size_t = torch.tensor(sizes, device=grad.device)  # [T']
        steps_of_user = (size_t.unsqueeze(0) > users.unsqueeze(1)).sum(dim=1)  # [n_0]: history length
        last = torch.tensor(offsets, device=grad.device)[steps_of_user - 1] + users  # [n_0]: last step's position
        grad.index_add_(0, last, d_final[:first])

        # 3. The recurrence, last step first: step t's rows are the first
        # n_t rows of step t-1 (same users, same sorted order). The
        # products coef * G go into one buffer, [P, 4, H], kept for step 4.
        scaled = torch.empty_like(coef)  # [P, 4, H]
        _BACKWARD_STEPS(coef, grad, scaled, weight_aug, sizes)

        # 4. Everything else from the complete G, over all steps at once.
        d_gh = scaled.view(total, 4 * hidden)[:, : 3 * hidden]  # [P, 3H], a view
        d_input = None
        if ctx.needs_input_grad[0]:
            d_input = torch.empty(total, 3 * hidden, dtype=n.dtype, device=n.device)  # [P, 3H]
            d_input[:, : 2 * hidden] = d_gh[:, : 2 * hidden]  # r and z parts: the same as for gh
            torch.mul(k_n, grad, out=d_input[:, 2 * hidden:])  # n part: not multiplied by r
        d_scale = None
        if step_scale is not None and ctx.needs_input_grad[1]:
            moved = torch.lerp(n, h_prev, z).sub_(h_prev) if ctx.use_update_gate else n - h_prev  # [P, H]
            d_scale = moved.mul_(grad).sum(dim=1)  # [P]
        d_weight = d_gh.t().mm(h_prev) if ctx.needs_input_grad[2] else None  # [3H, H]
        d_bias = d_gh.sum(dim=0) if ctx.needs_input_grad[3] else None  # [3H]
        d_h0 = None
        if ctx.needs_input_grad[4]:
            start = scaled[:first].view(first, 4 * hidden).mm(weight_aug)  # [n_0, H]
            d_h0 = torch.cat([start, d_final[first:]])  # [B, H]
        return d_input, d_scale, d_weight, d_bias, d_h0, None, None


def _backward_steps(coef: Tensor, grad: Tensor, scaled: Tensor, weight_aug: Tensor, sizes: list[int]) -> None:
    """Step 3 of :meth:`PackedGRUFunction.backward`, run as TorchScript.

    From the last step to the first: ``G_t`` is complete once the step after
    it has added its share, so ``scaled_t = coef_t * G_t`` can be formed,
    and the step before gets ``G_{t-1} += scaled_t @ [W_h; I]`` (the first
    ``n_t`` rows of step ``t - 1`` are the same users). Two kernels per
    step, written into ``grad`` and ``scaled`` in place.

    Args:
        coef: ``[P, 4, H]``, the coefficients ``c_r, c_z, k_n r, keep``.
        grad: ``[P, H]``, what arrives from outside; on return, ``G``.
        scaled: ``[P, 4, H]``, filled with ``coef * G``.
        weight_aug: ``[4H, H]``, ``W_h`` stacked on the identity.
        sizes: ``n_t`` for each step.
    """
    width = weight_aug.shape[0]  # 4H
    grad_steps = grad.unsqueeze(1).split(sizes)  # T' x [n_t, 1, H], views of grad
    coef_steps = coef.split(sizes)  # T' x [n_t, 4, H]
    scaled_steps = scaled.split(sizes)  # T' x [n_t, 4, H]
    for t in range(len(sizes) - 1, 0, -1):
        torch.mul(coef_steps[t], grad_steps[t], out=scaled_steps[t])  # G_t is complete
        before = grad_steps[t - 1][: sizes[t]].squeeze(1)  # [n_t, H], a view of grad
        before.addmm_(scaled_steps[t].view(sizes[t], width), weight_aug)
    torch.mul(coef_steps[0], grad_steps[0], out=scaled_steps[0])


_BACKWARD_STEPS = scripted(_backward_steps)


# ---------------------------------------------------------------------- #
# 3. Interest extractor
# ---------------------------------------------------------------------- #
class InterestExtractor(nn.Module):
    """The first GRU: one hidden state per clicked behaviour.

    Holds a ``torch.nn.GRU`` (same equations as :class:`GRUCell`). Training
    and evaluation run its weights through :func:`packed_gru`, which visits
    only the valid steps; with most of a batch being padding that is
    several times less work than ``torch.nn.GRU`` over all ``T`` steps,
    whose own packed mode was no faster on CPU when we measured it. While
    the model is traced for ONNX export the ``torch.nn.GRU`` itself runs, as
    one ONNX ``GRU`` node. The two agree: histories are right-padded and a
    GRU only looks back, so the state at a valid step never sees padding.
    States at padded steps are set to zero; nothing downstream should read
    them, and zero keeps an accidental read harmless.

    Args:
        input_dim: ``E``, width of one behaviour.
        hidden: ``H``.
    """

    def __init__(self, input_dim: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(input_dim, hidden, batch_first=True)

    def forward(self, behaviours: Tensor, steps: Tensor | PackedSteps) -> Tensor:
        """Encode the history.

        Args:
            behaviours: embedded history, padded ``[B, T, E]`` or packed
                ``[P, E]``.
            steps: the mask ``[B, T]`` of padded input, or the
                :class:`PackedSteps` of packed input.

        Returns:
            States in the layout of the input: ``[B, T, H]``, zero on padded
            steps, or ``[P, H]``.
        """
        if isinstance(steps, PackedSteps):
            return self._packed(behaviours, steps)  # [P, H]
        mask = steps
        if torch.jit.is_tracing():  # ONNX export: keep the GRU node
            states, _ = self.gru(behaviours)  # [B, T, H]
            return states.masked_fill(~mask.unsqueeze(-1), 0.0)  # [B, T, H]
        packing = PackedSteps(mask)
        return packing.unpack(self._packed(packing.pack(behaviours), packing))  # [B, T, H]

    def _packed(self, behaviours: Tensor, packing: PackedSteps) -> Tensor:
        """``[P, E]`` -> ``[P, H]`` with the GRU's weights and :func:`packed_gru`."""
        gru = self.gru
        input_proj = F.linear(behaviours, gru.weight_ih_l0, gru.bias_ih_l0)  # [P, 3H]
        h0 = behaviours.new_zeros(packing.batch, gru.hidden_size)  # [B, H]
        states, _ = packed_gru(input_proj, packing.sizes, gru.weight_hh_l0, gru.bias_hh_l0, h0)  # [P, H]
        return states


# ---------------------------------------------------------------------- #
# 4. Attention
# ---------------------------------------------------------------------- #
def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the valid steps of each row.

    Padded steps get weight exactly 0 (their score becomes ``-inf`` before
    the softmax). A row with no valid step (a user with an empty history)
    gets all-zero weights rather than the NaN of a softmax over nothing.

    Args:
        scores: ``[B, T]``.
        mask: valid steps ``[B, T]``.

    Returns:
        Weights ``[B, T]``: zero on padding, summing to 1 over valid steps.
    """
    has_valid = mask.any(dim=1, keepdim=True)  # [B, 1]
    scores = scores.masked_fill(~mask, float("-inf"))
    # An all-padding row would be softmax(-inf, ..., -inf) = NaN; give it
    # finite scores, then zero its weights below.
    scores = scores.masked_fill(~has_valid, 0.0)
    return torch.softmax(scores, dim=1).masked_fill(~mask, 0.0)  # [B, T]


def _sigmoid_tail(widths: Sequence[int]) -> nn.Sequential:
    """The layers after the first linear one of a sigmoid MLP scorer.

    The DIEN code uses sigmoid activations inside its attention and
    auxiliary networks. Given hidden widths ``[A1, A2, ...]`` this returns
    ``sigmoid, Linear(A1, A2), sigmoid, ..., Linear(A_last, 1)``.
    """
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, [*widths[1:], 1]):
        layers += [nn.Sigmoid(), nn.Linear(width_in, width_out)]
    return nn.Sequential(*layers)


class AttentionUnit(nn.Module):
    """DIN's activation unit with a softmax over the valid steps.

    Each step's score is an MLP of ``[q, k_t, q - k_t, q * k_t]``, where
    ``q`` is the target item (projected to the key width ``K`` when it
    differs, as in the authors' code) and ``k_t`` a history step. The
    hidden layers use sigmoid, following the DIEN code.

    Speed: the first layer, ``W [q, k, q - k, q*k] + b`` with
    ``W = [W_q, W_k, W_d, W_p]``, equals
    ``[W_q + W_d, W_k - W_d, W_p] [q, k, q*k] + b``: ``q - k`` is a
    combination of ``q`` and ``k``, so the ``4K``-wide input shrinks to
    ``3K`` and the first layer is one matrix product. (Computing the ``q``
    term once per user and copying it to every step was slower: the copy of
    an ``A1``-wide row per step, and its backward, cost more than the
    product it saved.) The parameter is still the single
    ``Linear(4K, A1)`` of the paper. And
    :meth:`forward` scores only the valid steps: padded steps get weight 0
    whatever their score, and in Amazon-like data most of the ``B * T``
    slots are padding (about 88% of them for Toys at ``T = 50``).

    Deviation notes:

    - Normalisation: DIN (Zhou et al., 2018) uses the raw scores as weights,
      to keep the intensity of interest. The DIEN paper (eq. 6) and its code
      normalise with a softmax; we follow DIEN, which also bounds the AUGRU
      gate scale to [0, 1].
    - Score function: the DIEN paper writes the score as a bilinear form
      ``h_t W e_a``; its code uses the DIN MLP above. We follow the code.

    Args:
        query_dim: ``Q``, width of the target embedding.
        key_dim: ``K``, width of a history step.
        widths: hidden widths of the MLP (at least one).
    """

    def __init__(self, query_dim: int, key_dim: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.key_dim = key_dim
        self.query_proj: nn.Module = (
            nn.Identity() if query_dim == key_dim else nn.Linear(query_dim, key_dim)
        )
        self.first = nn.Linear(4 * key_dim, widths[0])
        self.rest = _sigmoid_tail(widths)

    def _score_pairs(self, q: Tensor, row: Tensor, keys: Tensor) -> Tensor:
        """Scores of ``N`` (query, key) pairs; pair ``i`` is ``(q[row[i]], keys[i])``.

        Args:
            q: projected queries ``[B, K]``.
            row: the query row of each pair ``[N]``.
            keys: one key per pair ``[N, K]``.

        Returns:
            ``[N]``.
        """
        w_q, w_k, w_d, w_p = self.first.weight.split(self.key_dim, dim=1)  # 4 x [A1, K]
        # index_select, not q[row]: same rows, faster (see PackedSteps.pack).
        q_rows = q.index_select(0, row)  # [N, K]
        pairs = torch.cat([q_rows, keys, q_rows * keys], dim=1)  # [N, 3K]
        weight = torch.cat([w_q + w_d, w_k - w_d, w_p], dim=1)  # [A1, 3K]
        return self.rest(F.linear(pairs, weight, self.first.bias)).squeeze(-1)  # [N]

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """Unnormalised score of every step (padding included).

        Args:
            query: target embedding ``[B, Q]``.
            keys: history ``[B, T, K]``.

        Returns:
            ``[B, T]``.
        """
        batch, steps, _ = keys.shape
        row = torch.arange(batch, device=keys.device).repeat_interleave(steps)  # [B*T]
        flat = self._score_pairs(self.query_proj(query), row, keys.flatten(0, 1))  # [B*T]
        return flat.view(batch, steps)  # [B, T]

    def forward(self, query: Tensor, keys: Tensor, steps: Tensor | PackedSteps) -> Tensor:
        """Attention weights.

        Args:
            query: target embedding ``[B, Q]``.
            keys: history, padded ``[B, T, K]`` or packed ``[P, K]``.
            steps: the mask ``[B, T]`` of padded keys, or the
                :class:`PackedSteps` of packed keys.

        Returns:
            ``[B, T]`` in both cases: 0 on padding, summing to 1 over valid
            steps (all zero for an empty history).
        """
        if not isinstance(steps, PackedSteps):
            if torch.jit.is_tracing():  # ONNX export: score every step
                return masked_softmax(self.scores(query, keys), steps)  # [B, T]
            steps = PackedSteps(steps)
            keys = steps.pack(keys)  # [P, K]
        valid = self._score_pairs(self.query_proj(query), steps.row, keys)  # [P]
        return steps.softmax(valid)  # [B, T]


# ---------------------------------------------------------------------- #
# 5. Interest evolving layer
# ---------------------------------------------------------------------- #
class InterestEvolving(nn.Module):
    """The second GRU, whose updates are steered by attention.

    The paper's three variants, with ``a_t`` the attention weight of step
    ``t`` and ``u_t`` the paper's update gate (the WRITE gate, ``1 - z`` in
    PyTorch's notation):

    - ``"aigru"``: attention scales the input, ``i'_t = a_t * h_t``; then a
      plain GRU.
    - ``"agru"``: attention replaces the update gate,
      ``h'_t = (1 - a_t) * h'_{t-1} + a_t * n_t``.
    - ``"augru"``: attention scales the update gate, ``u'_t = a_t * u_t``,
      ``h'_t = (1 - u'_t) * h'_{t-1} + u'_t * n_t``. Attention 0 leaves the
      state exactly unchanged; attention 1 is a plain GRU step.

    Paper vs code: the authors' AUGRU (``VecAttGRUCell``) scales the other
    gate. TensorFlow's GRU gate is a keep gate ``k`` (PyTorch's ``z``) and
    the code computes ``k' = (1 - a_t) * k``, so there attention 0 is a plain
    GRU step and attention 1 overwrites the state with the candidate. We
    follow the paper (equations 10-11); ``tests/test_layers.py`` shows the
    two on the same numbers.

    Padded steps leave the state unchanged, so the returned interest is the
    state at each user's last valid step, and zero for an empty history.
    The loop itself runs over the valid steps only (:func:`packed_gru`),
    except while the model is traced for ONNX export, which needs the loop
    over all ``T`` steps of :func:`evolve_interest`; the two agree.

    Args:
        hidden: ``H``; input and state have the same width, as in the paper.
        kind: ``"augru"``, ``"agru"`` or ``"aigru"``.
    """

    def __init__(self, hidden: int, kind: str) -> None:
        super().__init__()
        if kind not in DIEN_EVOLVING_KINDS:
            raise ValueError(f"kind must be one of {DIEN_EVOLVING_KINDS}, got {kind!r}")
        self.kind = kind
        self.cell = GRUCell(hidden, hidden)

    def forward(self, states: Tensor, attention: Tensor, steps: Tensor | PackedSteps) -> Tensor:
        """Evolve the interest towards the target item.

        Args:
            states: extractor states, padded ``[B, T, H]`` or packed
                ``[P, H]``.
            attention: weights ``[B, T]`` (0 on padding).
            steps: the mask ``[B, T]`` of padded states, or the
                :class:`PackedSteps` of packed states.

        Returns:
            Final interest ``[B, H]``.
        """
        h0 = states.new_zeros(attention.shape[0], self.cell.hidden_size)  # [B, H]
        use_update_gate = self.kind != "agru"
        if not isinstance(steps, PackedSteps):
            mask = steps
            if torch.jit.is_tracing():
                # ONNX export: the loop over all T steps of evolve_interest,
                # which the exporter compiles into one Loop node.
                valid = mask.to(states.dtype)  # [B, T]
                if self.kind == "aigru":
                    padded_inputs = states * attention.unsqueeze(-1)  # [B, T, H]
                    padded_scale = valid  # plain GRU on valid steps, frozen on padding
                else:
                    padded_inputs = states
                    padded_scale = attention * valid  # [B, T]
                input_proj = self.cell.input_projection(padded_inputs)  # [B, T, 3H]
                return evolve_interest(
                    input_proj, padded_scale, self.cell.weight_hh, self.cell.bias_hh, h0, use_update_gate
                )  # [B, H]
            steps = PackedSteps(mask)
            states = steps.pack(states)  # [P, H]
        # The recurrence of evolve_interest over the valid steps only: the
        # padded steps, which it freezes with s = 0, are skipped.
        weights = steps.pack(attention)  # [P]
        if self.kind == "aigru":
            inputs, scale = states * weights.unsqueeze(-1), None  # plain GRU on scaled inputs
        else:
            inputs, scale = states, weights
        _, final = packed_gru(
            self.cell.input_projection(inputs),  # [P, 3H]
            steps.sizes,
            self.cell.weight_hh,
            self.cell.bias_hh,
            h0,
            step_scale=scale,
            use_update_gate=use_update_gate,
        )  # [B, H], sorted
        return steps.unsort(final)  # [B, H]


# ---------------------------------------------------------------------- #
# 6. Auxiliary loss
# ---------------------------------------------------------------------- #
class AuxLossResult(NamedTuple):
    """What :class:`AuxiliaryLoss` returns.

    Attributes:
        loss: scalar, mean over the batch's valid pairs (0 when there are
            none).
        row_loss: ``[B]``, each user's summed pair losses, so one user's
            contribution can be compared across batches.
        row_pairs: ``[B]`` int64, each user's number of pairs,
            ``max(length - 1, 0)``.
        pairs: with ``return_pairs=True``, ``(states [P', H], positives
            [P', E], negatives [P', E])``, ordered as
            :meth:`AuxiliaryLoss.forward` says; else None.
    """

    loss: Tensor
    row_loss: Tensor
    row_pairs: Tensor
    pairs: tuple[Tensor, Tensor, Tensor] | None = None


class AuxiliaryLoss(nn.Module):
    """Supervise each extractor state with the behaviour that follows it.

    For a user with ``L`` clicks, the state ``h_t`` (after clicks
    ``1..t``) is scored against the next click ``e_{t+1}`` (label 1) and a
    sampled non-clicked item at step ``t+1`` (label 0), for
    ``t = 1 .. L-1``: ``L - 1`` pairs, none when ``L <= 1``. The loss is the
    binary cross-entropy averaged over all valid pairs of the batch.

    Paper vs code, and what we do:

    - Scorer: the paper (eq. 5) scores a pair by a sigmoid of the inner
      product ``<h_t, e_{t+1}>``, which needs ``H == E``; the code feeds
      ``[h, e]`` to a 100-50-2 MLP with sigmoid layers and a batch norm on
      the input. Default ``"inner"`` follows the paper, with a learned map
      ``W`` (``H -> E``) so the widths may differ (``W = I`` is the paper's
      plain product when they match): ``logit = <W h_t, e_{t+1}>``. It costs
      a fraction of the MLP, which at ``T = 50`` took more time than the
      attention. ``"mlp"`` follows the code, with one output logit (a 2-way
      softmax is a sigmoid of the logit difference) and without the batch
      norm, which would tie a user's loss to the rest of the batch.
    - Averaging: the paper divides the sum over users and steps by the
      number of users; the code averages over all ``B * (T - 1)`` slots,
      padding included. Both change with padding or history length. We
      average over valid pairs only, so a user's contribution does not
      depend on the padded width ``T``.

    Args:
        hidden: ``H``, width of a state.
        behaviour_dim: ``E``, width of a behaviour.
        scorer: ``"mlp"`` or ``"inner"``.
        widths: hidden widths of the ``"mlp"`` scorer.
    """

    def __init__(self, hidden: int, behaviour_dim: int, scorer: str, widths: Sequence[int]) -> None:
        super().__init__()
        if scorer not in ("mlp", "inner"):
            raise ValueError(f"scorer must be 'mlp' or 'inner', got {scorer!r}")
        if scorer == "mlp" and not widths:
            raise ValueError("the 'mlp' scorer needs at least one hidden width")
        self.scorer = scorer
        if scorer == "mlp":
            # First layer of the MLP on [h, e], split into its h and e halves:
            # the h half is computed once and shared by the positive and the
            # negative of a pair.
            self.from_state = nn.Linear(hidden, widths[0])
            self.from_behaviour = nn.Linear(behaviour_dim, widths[0], bias=False)
            self.rest = _sigmoid_tail(widths)
        else:
            self.project = nn.Linear(hidden, behaviour_dim, bias=False)

    def score_pairs(self, states: Tensor, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of (state, clicked) and (state, not clicked).

        Args:
            states: ``[P', H]``.
            positives: ``[P', E]``.
            negatives: ``[P', E]``.

        Returns:
            Two logit tensors ``[P']``.
        """
        if self.scorer == "mlp":
            shared = self.from_state(states)  # [P', A1]
            pos = self.rest(shared + self.from_behaviour(positives)).squeeze(-1)  # [P']
            neg = self.rest(shared + self.from_behaviour(negatives)).squeeze(-1)  # [P']
        else:
            mapped = self.project(states)  # [P', E]
            pos = (mapped * positives).sum(-1)  # [P']
            neg = (mapped * negatives).sum(-1)  # [P']
        return pos, neg

    def forward(
        self,
        states: Tensor,
        clicked: Tensor,
        negatives: Tensor,
        steps: Tensor | PackedSteps,
        return_pairs: bool = False,
    ) -> AuxLossResult:
        """Compute the loss.

        Args:
            states: extractor states, padded ``[B, T, H]`` or packed
                ``[P, H]``.
            clicked: embedded history, ``[B, T, E]`` or ``[P, E]``.
            negatives: embedded sampled negatives, one per step, ``[B, T, E]``
                or ``[P, E]``.
            steps: the mask ``[B, T]`` of padded inputs, or the
                :class:`PackedSteps` of packed inputs.
            return_pairs: also return the (state, positive, negative) triples
                that entered the loss (in (user, step) order for padded
                inputs, in packed order for packed ones).

        Returns:
            An :class:`AuxLossResult`.
        """
        # Pair t joins state t with behaviour t+1. It is valid when step
        # t+1 is (then step t is too). Only valid pairs are gathered and
        # scored: padding never enters, and short histories cost less.
        if isinstance(steps, PackedSteps):
            mask = steps.mask
            before_at, after_at = steps.next_step_pairs()  # 2 x [P']
            before = states.index_select(0, before_at)  # [P', H]: h_t
            after_pos = clicked.index_select(0, after_at)  # [P', E]: e_{t+1}
            after_neg = negatives.index_select(0, after_at)  # [P', E]: sampled at t+1
            row_of_pair = steps.row.index_select(0, after_at)  # [P']
        else:
            mask = steps
            pair_mask = mask[:, 1:]  # [B, T-1]
            before = states[:, :-1][pair_mask]  # [P', H]: h_t
            after_pos = clicked[:, 1:][pair_mask]  # [P', E]: e_{t+1}
            after_neg = negatives[:, 1:][pair_mask]  # [P', E]: sampled at t+1
            rows = torch.arange(mask.shape[0], device=mask.device)  # [B]
            row_of_pair = rows.unsqueeze(1).expand_as(pair_mask)[pair_mask]  # [P']

        pos_logit, neg_logit = self.score_pairs(before, after_pos, after_neg)  # 2 x [P']
        per_pair = F.binary_cross_entropy_with_logits(
            pos_logit, torch.ones_like(pos_logit), reduction="none"
        ) + F.binary_cross_entropy_with_logits(
            neg_logit, torch.zeros_like(neg_logit), reduction="none"
        )  # [P']

        row_loss = per_pair.new_zeros(mask.shape[0]).index_add(0, row_of_pair, per_pair)  # [B]
        row_pairs = mask[:, 1:].sum(dim=1)  # [B]
        # clamp: a batch with no pair gives 0 / 1 = 0, not 0 / 0.
        loss = per_pair.sum() / row_pairs.sum().clamp_min(1)  # []

        pairs = (before, after_pos, after_neg) if return_pairs else None
        return AuxLossResult(loss, row_loss, row_pairs, pairs)


# ---------------------------------------------------------------------- #
# 7. Prediction head
# ---------------------------------------------------------------------- #
class Dice(nn.Module):
    """The data-adaptive activation of DIN (Zhou et al., 2018)::

        p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))
        f(s) = p(s) * s + (1 - p(s)) * alpha * s

    A PReLU whose kink sits at the batch mean instead of at 0, softened by a
    sigmoid. ``alpha`` is learned per channel and starts at 0, as in the
    authors' code.

    Formulation: written out here rather than built on ``nn.BatchNorm1d``,
    with no affine scale or shift (the code's batch norm has none). In
    training, mean and variance are those of the current batch (biased
    variance, so a batch of one gives ``p = 0.5`` instead of an error or
    NaN) and update running estimates; in eval mode the running estimates
    are used, so each row's output depends on that row alone. Compare
    predictions across batches in eval mode.

    Args:
        width: number of channels ``A``.
        eps: added to the variance.
        momentum: weight of the current batch in the running estimates.
    """

    def __init__(self, width: int, eps: float = DICE_EPS, momentum: float = DICE_MOMENTUM) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(width))
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        """Apply Dice.

        Args:
            x: ``[B, A]``.

        Returns:
            ``[B, A]``.
        """
        if self.training:
            if x.shape[0] == 0:  # the batch-norm kernel of the backward cannot take it
                raise ValueError("Dice in training mode needs a batch of at least one row, got 0")
            # DiceFunction: the computation below with batch statistics and
            # a hand-written backward.
            out, mean, var = DiceFunction.apply(x, self.alpha, self.eps)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
            return out  # [B, A]
        centred, var = x - self.running_mean, self.running_var
        p = torch.sigmoid(centred * torch.rsqrt(var + self.eps))  # [B, A]
        # p * x + (1 - p) * alpha * x, as x * (alpha + p * (1 - alpha)).
        return x * torch.addcmul(self.alpha, p, 1 - self.alpha)  # [B, A]


class DiceFunction(torch.autograd.Function):
    """Dice in training mode (batch statistics), with a hand-written backward.

    The forward is the one of :class:`Dice`::

        c = x - mean(x),  v = mean(c^2),  x_hat = c / sqrt(v + eps)
        p = sigmoid(x_hat),  y = x * (alpha + p (1 - alpha))

    and also returns the batch's ``mean`` and ``v`` (for the running
    estimates; no gradient flows through them). Autograd would replay about
    a dozen small operations backwards, each with its own bookkeeping; the
    gradient has a short closed form. With ``g = dL/dy`` and means over the
    batch::

        dL/dalpha = sum(g * x * (1 - p))
        d         = dL/dx_hat = g * x * (1 - alpha) * p * (1 - p)
        dL/dx     = g * (alpha + p (1 - alpha))                     (direct)
                  + (d - mean(d) - x_hat * mean(d * x_hat)) / sqrt(v + eps)

    The second line of ``dL/dx`` is the backward of batch normalisation
    without scale and shift, which PyTorch has as a single kernel (the one
    behind ``nn.BatchNorm1d``); it takes the saved mean and ``1 / sqrt(v +
    eps)`` and replaces about eight small operations. The forward keeps the
    two-pass mean and variance written out above: with the batch-norm
    forward kernel instead, a batch of one in float32 gave ``p`` up to
    about 1e-3 away from its exact 0.5 for inputs of a few units (and
    further for larger ones); the two-pass form gives exactly 0.5.
    ``tests/test_fast_paths.py`` checks the result against autograd.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        out, mean, var, saved = dice_forward(x, alpha, eps)
        ctx.save_for_backward(*saved)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _mean: Tensor, _var: Tensor):
        grad_x, grad_alpha = dice_backward(grad, list(ctx.saved_tensors), ctx.eps)
        return grad_x, grad_alpha, None  # [B, A], [A]


def dice_forward(x: Tensor, alpha: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Dice with batch statistics, and what its backward needs.

    Plain tensor code, so that TorchScript can compile it into the
    hand-written DIN step (:mod:`dien_tutorial.din_step`) as well.

    Args:
        x: ``[B, A]``.
        alpha: ``[A]``.
        eps: added to the variance.

    Returns:
        ``(out [B, A], mean [A], var [A], saved)``; ``saved`` goes to
        :func:`dice_backward`.
    """
    mean = x.mean(dim=0)  # [A]
    centred = x - mean  # [B, A]
    # The biased variance, from the centred values we need anyway
    # (x.var(dim=0) took longer than all of Dice's other steps on CPU).
    var = centred.square().mean(dim=0)  # [A]
    inv_std = torch.rsqrt(var + eps)  # [A]
    p = centred.mul_(inv_std).sigmoid_()  # [B, A], in place: centred is not needed again
    one_minus_alpha = 1 - alpha  # [A]
    scale = torch.addcmul(alpha, p, one_minus_alpha)  # [B, A]: alpha + p (1 - alpha)
    return x * scale, mean, var, [x, one_minus_alpha, mean, inv_std, p, scale]


def dice_backward(grad: Tensor, saved: list[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`dice_forward`: ``dL/dout [B, A]`` -> ``(dL/dx [B, A], dL/dalpha [A])``."""
    x, one_minus_alpha, mean, inv_std, p, scale = saved
    grad_x = grad * x  # [B, A]
    grad_x_q = torch.addcmul(grad_x, grad_x, p, value=-1)  # [B, A]: g x (1 - p)
    d_alpha = grad_x_q.sum(dim=0)  # [A]
    d_normed = grad_x_q.mul_(p).mul_(one_minus_alpha)  # [B, A]: d, in place
    d_norm_in, _, _ = torch.ops.aten.native_batch_norm_backward(
        d_normed, x, None, None, None, mean, inv_std, True, eps, [True, False, False])  # [B, A]
    return torch.addcmul(d_norm_in, grad, scale), d_alpha  # [B, A], [A]


def make_activation(name: str, width: int) -> nn.Module:
    """``"dice"`` -> :class:`Dice`, ``"prelu"`` -> per-channel PReLU."""
    if name == "dice":
        return Dice(width)
    if name == "prelu":
        return nn.PReLU(width)
    raise ValueError(f"activation must be 'dice' or 'prelu', got {name!r}")


class MLP(nn.Module):
    """The prediction head: hidden layers, then one click logit.

    ``Linear -> activation -> dropout`` for each hidden width, then
    ``Linear(.., 1)``. The paper's head is 200-80-1 with Dice.

    Args:
        in_dim: ``D``, width of the input.
        widths: hidden widths (may be empty: logistic regression).
        activation: ``"dice"`` or ``"prelu"``.
        dropout: dropout probability after each hidden layer.
    """

    def __init__(self, in_dim: int, widths: Sequence[int], activation: str, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out in zip([in_dim, *widths[:-1]], widths):
            layers += [nn.Linear(width_in, width_out), make_activation(activation, width_out)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-1] if widths else in_dim, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Click logits.

        Args:
            x: ``[B, D]``.

        Returns:
            ``[B]`` (never 0-d, also for ``B = 1``).
        """
        return self.layers(x).squeeze(-1)  # [B]
