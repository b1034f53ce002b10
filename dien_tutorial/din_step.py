"""DIN's training step with its gradients written out by hand.

DIN (:func:`dien_tutorial.model.build_model` with ``"din"``) has no
recurrence: it embeds the target and the valid history steps, scores each
step with the attention MLP, pools the history with the softmax of the
scores, and sends ``[e_target, sum_t e_t, e_target * sum_t e_t, interest]``
through the Dice head. At batch 256 on Amazon Toys that is about 1 ms of
matrix products and some 265 small operations; autograd records every one
of them, replays each backwards with its own bookkeeping, and then hands
the gradients to the parameters one by one. Once the arithmetic had been
trimmed, that bookkeeping was the larger part of a DIN step.

:func:`din_loss_and_gradients` does the same step with the chain rule
written out: the forward pass without recording, then the backward pass
as a short list of products (about 190 operations in all), compiled with
TorchScript like the packed GRU loops, and the gradients stored in
``param.grad``, exactly where ``loss.backward()`` would put them. With
the optimizer's step, a DIN step at batch 256 went from about 3.9 to 2.8
ms (1 thread; ``benchmarks/bench_train.py`` has the measurements).
:func:`dien_tutorial.train.train_step` uses it for DIN whenever
:func:`applies` says the model is the plain DIN it was written for; every
other model, and DIN with dropout, PReLU, hooks, frozen or parametrized
weights, or a subclass or stand-in for one of its modules, goes through
autograd. ``tests/test_din_step.py`` checks the loss, every
gradient and the Dice running estimates against autograd. This step
repeats DIN's forward computation: a change to the code of DIN's layers
must be made here too, and that test fails until it is.

The backward, layer by layer, with ``g_x`` for ``dL/dx``, ``B`` users,
``P`` valid steps, ``row[p]`` the user of step ``p``, ``K = E`` the width
of a behaviour:

- loss: ``L = mean(BCE(logit, y))``, so ``g_logit = (sigmoid(logit) - y) / B``.
- a linear layer ``y = x W^T + b``: ``g_W = g_y^T x``, ``g_b = sum(g_y)``,
  ``g_x = g_y W``.
- Dice: the closed form of :class:`~dien_tutorial.layers.DiceFunction`.
- the head's input ``[t, s, t * s, i]`` (target, history sum, their
  product, interest): ``g_t += g_{t*s} * s`` and ``g_s += g_{t*s} * t``.
- pooling ``i_b = sum_p w_p k_p`` over the steps of user ``b``:
  ``g_w_p = <g_i_{row[p]}, k_p>`` and ``g_k_p += w_p g_i_{row[p]}``; the
  history sum adds ``g_s_{row[p]}`` to every ``g_k_p``.
- the softmax of each user's scores: ``g_score_p = w_p (g_w_p - sum_q
  w_q g_w_q)``, the sum over the steps ``q`` of the same user.
- sigmoid ``a = sigmoid(z)``: ``g_z = g_a * a * (1 - a)``.
- the attention's first layer on ``[q, k, q * k]`` with the folded weight
  (see :class:`~dien_tutorial.layers.AttentionUnit`): the gradient of the
  folded weight ``[F_q, F_k, F_p] = [W_q + W_d, W_k - W_d, W_p]`` unfolds
  to ``g_W = [g_F_q, g_F_k, g_F_q - g_F_k, g_F_p]``; ``g_q += g_pairs_q +
  g_pairs_qk * k`` (summed into each user's target) and ``g_k +=
  g_pairs_k + g_pairs_qk * q``.
- the embedding lookups: each looked-up row adds its gradient to its
  table row (``index_add_``); the padding row 0 gets none, as with
  ``nn.Embedding(padding_idx=0)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dien_tutorial.data.samples import Batch
from dien_tutorial.layers import MLP, AttentionUnit, Dice, dice_backward, dice_forward, scripted
from dien_tutorial.model import DIEN, BehaviourEmbedding, check_inputs, id_range_error


class _Parts(NamedTuple):
    """The layers of a plain DIN, in the order the forward pass uses them."""

    item: nn.Embedding
    cate: nn.Embedding
    first: nn.Linear  # the attention's first layer, on [q, k, q - k, q * k]
    tail: list[nn.Linear]  # the attention's later layers, the last of width 1
    linears: list[nn.Linear]  # the head's layers, the last of width 1
    dices: list[Dice]  # the head's activations, after each linear layer but the last


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _parts(model: nn.Module) -> _Parts | None:
    """The layers of ``model`` if it is the plain DIN this step is written for, else None.

    That is a DIN built by ``build_model("din", ...)``, in training mode,
    with a Dice head and no dropout, made of exactly the package's classes
    (not subclasses or stand-ins, whose ``forward`` could differ), with
    dense embedding tables, no parametrized weights, every parameter
    requiring a gradient, and no hooks on its modules or parameters (the
    hand-written step calls no module, so it would skip them). The checks
    touch only the layers themselves: walking ``model.parameters()`` alone
    would cost about 15 us a step.
    """
    if type(model) is not DIEN or not model.training:
        return None
    if model.extractor is not None or model.evolving is not None or model.aux is not None:
        return None
    embedding, attention, head = model.embedding, model.attention, model.head
    if (type(embedding) is not BehaviourEmbedding or type(attention) is not AttentionUnit
            or type(head) is not MLP):
        return None
    if type(attention.query_proj) is not nn.Identity or type(attention.first) is not nn.Linear:
        return None
    if type(attention.rest) is not nn.Sequential or type(head.layers) is not nn.Sequential:
        return None
    tables = (embedding.item, embedding.cate)
    if any(type(t) is not nn.Embedding or t.sparse or t.max_norm is not None for t in tables):
        return None
    rest, layers = list(attention.rest), list(head.layers)
    # rest: Sigmoid, Linear, Sigmoid, Linear, ...; layers: Linear, Dice, ..., Linear.
    if not rest or len(rest) % 2 or len(layers) % 2 == 0:
        return None
    if any(type(m) is not (nn.Sigmoid if i % 2 == 0 else nn.Linear) for i, m in enumerate(rest)):
        return None
    if any(type(m) is not (nn.Linear if i % 2 == 0 else Dice) for i, m in enumerate(layers)):
        return None
    modules = [model, embedding, *tables, attention, attention.query_proj, attention.first, attention.rest,
               *rest, head, head.layers, *layers]
    # (A parametrized weight changes its module's class, so the exact types
    # above already send torch.nn.utils.parametrize out to autograd.)
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
           for m in modules) or any(getattr(nn.modules.module, name) for name in _GLOBAL_HOOKS):
        return None
    parts = _Parts(embedding.item, embedding.cate, attention.first, rest[1::2], layers[0::2], layers[1::2])
    params = [parts.item.weight, parts.cate.weight]
    for layer in (parts.first, *parts.tail, *parts.linears):
        params += [layer.weight, layer.bias]
    params += [dice.alpha for dice in parts.dices]
    if any(p is None or not p.requires_grad or p._backward_hooks or p._post_accumulate_grad_hooks
           for p in params):
        return None
    return parts


def applies(model: nn.Module) -> bool:
    """Whether :func:`din_loss_and_gradients` computes ``model``'s training step (see :func:`_parts`)."""
    return _parts(model) is not None


def din_loss_and_gradients(model: nn.Module, batch: Batch) -> Tensor | None:
    """One DIN training step's loss, with every parameter's gradient stored in ``.grad``.

    The same as ``loss = F.binary_cross_entropy_with_logits(model(...).logit,
    label); loss.backward()`` on a model with no gradients yet (the Dice
    layers update their running estimates as in that forward pass), without
    autograd. Existing ``.grad`` tensors are replaced, not added to, so no
    ``zero_grad`` is needed first.

    Args:
        model: the model; nothing happens unless :func:`applies` is true.
        batch: the training batch.

    Returns:
        The click loss, a detached scalar; None, with the model untouched,
        when the model is not a plain DIN (see :func:`applies`).

    Raises:
        ValueError: the batch breaks the model's input contract
            (:func:`dien_tutorial.model.check_inputs`).
    """
    parts = _parts(model)
    if parts is None:
        return None
    check_inputs(batch.item, batch.cate, batch.hist_item, batch.hist_cate, batch.length, None, None)
    if batch.item.shape[0] == 0:
        raise ValueError("a training batch needs at least one sample (Dice's batch statistics need one)")
    first, tail, linears, dices = parts.first, parts.tail, parts.linears, parts.dices
    try:
        with torch.no_grad():
            result = _DIN_STEP(
                batch.item, batch.cate, batch.hist_item, batch.hist_cate, batch.length, batch.label,
                parts.item.weight, parts.cate.weight, _padding_row(parts.item), _padding_row(parts.cate),
                first.weight, first.bias, [m.weight for m in tail], [m.bias for m in tail],
                [m.weight for m in linears], [m.bias for m in linears],
                [d.alpha for d in dices], [d.running_mean for d in dices], [d.running_var for d in dices],
                [d.eps for d in dices], [d.momentum for d in dices])
    except (IndexError, RuntimeError):  # a failed lookup; name the argument if an id is out of range
        valid = torch.arange(batch.hist_item.shape[1], device=batch.length.device) < batch.length.unsqueeze(1)
        error = id_range_error(model.config, valid, item=batch.item, cate=batch.cate,
                               hist_item=batch.hist_item, hist_cate=batch.hist_cate)
        if error is None:
            raise
        raise error from None
    loss, g_item, g_cate, g_first_w, g_first_b, g_tail_w, g_tail_b, g_head_w, g_head_b, g_alpha = result
    parts.item.weight.grad, parts.cate.weight.grad = g_item, g_cate
    first.weight.grad, first.bias.grad = g_first_w, g_first_b
    for layer, g_w, g_b in zip(tail, g_tail_w, g_tail_b):
        layer.weight.grad, layer.bias.grad = g_w, g_b
    for layer, g_w, g_b in zip(linears, g_head_w, g_head_b):
        layer.weight.grad, layer.bias.grad = g_w, g_b
    for dice, g_a in zip(dices, g_alpha):
        dice.alpha.grad = g_a
    return loss


def _padding_row(table: nn.Embedding) -> int:
    """The row that never gets a gradient, or -1 when there is none."""
    return -1 if table.padding_idx is None else int(table.padding_idx)


def _sum_rows(x: Tensor, row: Tensor, n_users: int) -> Tensor:
    """``[P, ...]`` -> ``[B, ...]``: each user's sum over the valid steps."""
    return torch.zeros((n_users,) + x.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, row, x)


def _din_step(
    item: Tensor, cate: Tensor, hist_item: Tensor, hist_cate: Tensor, length: Tensor, label: Tensor,
    item_table: Tensor, cate_table: Tensor, item_pad: int, cate_pad: int,
    first_w: Tensor, first_b: Tensor, tail_w: list[Tensor], tail_b: list[Tensor],
    head_w: list[Tensor], head_b: list[Tensor],
    alphas: list[Tensor], running_means: list[Tensor], running_vars: list[Tensor],
    eps: list[float], momentum: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor],
           list[Tensor]]:
    """The loss and the gradient of every parameter, for :func:`din_loss_and_gradients`.

    Compiled with TorchScript when the module is imported, as the packed
    GRU loops are (:func:`dien_tutorial.layers.scripted`): the same
    kernels, without the interpreter between them (about 15% of the step).

    Args:
        item, cate: ``[B]``; hist_item, hist_cate: ``[B, T]``; length,
            label: ``[B]`` (the batch).
        item_table, cate_table: the embedding tables; item_pad, cate_pad:
            their padding rows (-1 for none).
        first_w, first_b: the attention's first layer, ``[A1, 4E]``, ``[A1]``.
        tail_w, tail_b: its later layers, the last of width 1.
        head_w, head_b: the head's layers, the last of width 1.
        alphas, running_means, running_vars, eps, momentum: the head's Dice
            layers, one entry each.

    Returns:
        ``(loss, g_item, g_cate, g_first_w, g_first_b, g_tail_w, g_tail_b,
        g_head_w, g_head_b, g_alpha)``, gradients in the order of the
        arguments.
    """
    # ---- forward: the computation of DIEN.forward for DIN --------------
    n_users, steps = hist_item.shape[0], hist_item.shape[1]  # B, T
    # The valid steps, user after user. DIN runs nothing step by step, so
    # it needs none of the sorting PackedSteps does for the GRUs.
    valid = (torch.arange(steps, device=length.device) < length.unsqueeze(1)).view(-1)  # [B*T]
    index = valid.nonzero().squeeze(1)  # [P]: positions in the flattened batch
    row = torch.div(index, steps, rounding_mode="floor")  # [P]: the user of each step
    item_ids = torch.cat([item, hist_item.reshape(-1).index_select(0, index)])  # [B + P]
    cate_ids = torch.cat([cate, hist_cate.reshape(-1).index_select(0, index)])  # [B + P]
    embedded = torch.cat([item_table.index_select(0, item_ids), cate_table.index_select(0, cate_ids)], dim=1)
    target, history = embedded[:n_users], embedded[n_users:]  # [B, E], [P, E]
    width = target.shape[1]  # E = K

    # Attention scores: first layer on [q, k, q*k] with the folded weight.
    q_rows = target.index_select(0, row)  # [P, E]
    pairs = torch.cat([q_rows, history, q_rows * history], dim=1)  # [P, 3E]
    w_q, w_k, w_d, w_p = first_w.split(width, dim=1)  # 4 x [A1, E]
    folded = torch.cat([w_q + w_d, w_k - w_d, w_p], dim=1)  # [A1, 3E]
    hidden = [torch.addmm(first_b, pairs, folded.t()).sigmoid_()]  # [P, A1]
    for k in range(len(tail_w) - 1):
        hidden.append(torch.addmm(tail_b[k], hidden[-1], tail_w[k].t()).sigmoid_())  # [P, A_k+1]
    scores = torch.addmm(tail_b[-1], hidden[-1], tail_w[-1].t()).squeeze(1)  # [P]
    # Each user's softmax over the valid steps: padding enters as -inf, so
    # its weight is exactly 0. A user without history gets a row of NaN,
    # which nothing reads: only valid steps are gathered back.
    padded = torch.full((n_users * steps,), float("-inf"), dtype=scores.dtype, device=scores.device)
    padded = padded.index_copy_(0, index, scores)  # [B*T]
    weights = torch.softmax(padded.view(n_users, steps), dim=1).view(-1).index_select(0, index)  # [P]
    interest = _sum_rows(weights.unsqueeze(1) * history, row, n_users)  # [B, E]
    history_sum = _sum_rows(history, row, n_users)  # [B, E]
    features = torch.cat([target, history_sum, target * history_sum, interest], dim=1)  # [B, 4E]

    # The head: Linear -> Dice, ..., Linear.
    inputs = [features]  # the input of each linear layer
    dice_saved: list[list[Tensor]] = []
    x = features
    for k in range(len(alphas)):
        x, mean, var, saved = dice_forward(torch.addmm(head_b[k], x, head_w[k].t()), alphas[k], eps[k])  # [B, M_k]
        running_means[k].lerp_(mean, momentum[k])
        running_vars[k].lerp_(var, momentum[k])
        dice_saved.append(saved)
        inputs.append(x)
    logit = torch.addmm(head_b[-1], x, head_w[-1].t()).squeeze(1)  # [B]
    label = label.to(logit.dtype)
    loss = F.binary_cross_entropy_with_logits(logit, label)

    # ---- backward (lists filled last layer first, then reversed) --------
    g_head_w: list[Tensor] = []
    g_head_b: list[Tensor] = []
    g_alpha: list[Tensor] = []
    g = ((torch.sigmoid(logit) - label) / n_users).unsqueeze(1)  # [B, 1]: dL/dlogit
    for k in range(len(head_w) - 1, -1, -1):
        if k < len(alphas):  # through Dice k first
            g, g_a = dice_backward(g, dice_saved[k], eps[k])  # [B, M_k], [M_k]
            g_alpha.append(g_a)
        g_head_w.append(g.t() @ inputs[k])  # [M_out, M_in]
        g_head_b.append(g.sum(dim=0))
        g = g @ head_w[k]  # [B, M_in]
    g_head_w.reverse()
    g_head_b.reverse()
    g_alpha.reverse()
    g_target, g_hsum, g_product, g_interest = g.split(width, dim=1)  # 4 x [B, E]
    g_target = torch.addcmul(g_target, g_product, history_sum)  # [B, E]
    g_hsum = torch.addcmul(g_hsum, g_product, target)  # [B, E]

    # Pooling and the softmax of each user's scores.
    g_interest_rows = g_interest.index_select(0, row)  # [P, E]
    weighted = weights * (g_interest_rows * history).sum(dim=1)  # [P]: w_p g_w_p
    g_scores = weighted - weights * _sum_rows(weighted, row, n_users).index_select(0, row)  # [P]

    # The attention MLP, last layer first.
    g_tail_w: list[Tensor] = []
    g_tail_b: list[Tensor] = []
    g = g_scores.unsqueeze(1)  # [P, 1]
    for k in range(len(tail_w) - 1, -1, -1):
        g_tail_w.append(g.t() @ hidden[k])
        g_tail_b.append(g.sum(dim=0))
        # Through the sigmoid: g * a * (1 - a), one kernel.
        g = torch.ops.aten.sigmoid_backward(g @ tail_w[k], hidden[k])  # [P, A_k]
    g_tail_w.reverse()
    g_tail_b.reverse()
    g_fq, g_fk, g_fp = (g.t() @ pairs).split(width, dim=1)  # the folded weight's gradient, 3 x [A1, E]
    g_first_w = torch.cat([g_fq, g_fk, g_fq - g_fk, g_fp], dim=1)  # [A1, 4E]
    g_first_b = g.sum(dim=0)
    g_pq, g_pk, g_pp = (g @ folded).split(width, dim=1)  # 3 x [P, E]

    g_target = g_target.index_add_(0, row, torch.addcmul(g_pq, g_pp, history))  # [B, E]
    g_history = torch.addcmul(g_pk, weights.unsqueeze(1), g_interest_rows)  # [P, E]
    g_history = g_history.addcmul_(g_pp, q_rows).add_(g_hsum.index_select(0, row))

    # The lookups: every looked-up row adds its gradient to its table row.
    g_embedded = torch.cat([g_target, g_history])  # [B + P, E]
    item_dim = item_table.shape[1]
    g_item = torch.zeros_like(item_table).index_add_(0, item_ids, g_embedded[:, :item_dim])
    g_cate = torch.zeros_like(cate_table).index_add_(0, cate_ids, g_embedded[:, item_dim:])
    if item_pad >= 0:
        g_item[item_pad].zero_()
    if cate_pad >= 0:
        g_cate[cate_pad].zero_()
    return (loss, g_item, g_cate, g_first_w, g_first_b, g_tail_w, g_tail_b, g_head_w, g_head_b, g_alpha)


_DIN_STEP = scripted(_din_step)
