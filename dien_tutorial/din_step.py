"""DIN's training step with its gradients written out by hand.

DIN (:func:`dien_tutorial.model.build_model` with ``"din"``) has no
recurrence: it embeds the target and the valid history steps, scores each
step with the attention MLP, pools the history with the softmax of the
scores, and sends ``[e_target, sum_t e_t, e_target * sum_t e_t, interest]``
through the Dice head. At batch 256 on Amazon Toys that is about 1 ms of
matrix products and some 250 small operations; autograd records every one
of them, replays each backwards with its own bookkeeping, and then hands
the gradients to the parameters one by one. For DIN that bookkeeping cost
about a fifth of the training step (measured in ``benchmarks/bench_train.py``).

:func:`din_loss_and_gradients` does the same step with the chain rule
written out: the forward pass without recording, then the backward pass
as a short list of products, and the gradients stored in ``param.grad``,
exactly where ``loss.backward()`` would put them.
:func:`dien_tutorial.train.train_step` uses it for DIN whenever
:func:`applies` says the model is the plain DIN it was written for; every
other model, and DIN with dropout, PReLU, hooks or frozen parameters, goes
through autograd. ``tests/test_din_step.py`` checks the loss, every
gradient and the Dice running estimates against autograd.

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
from dien_tutorial.layers import Dice, PackedSteps, dice_backward, dice_forward
from dien_tutorial.model import DIEN, check_inputs


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
    with a Dice head and no dropout, whose parameters all require a
    gradient, and without hooks on its modules or parameters (the
    hand-written step calls no module, so it would skip them). The checks
    touch only the layers themselves: walking ``model.parameters()`` alone
    would cost about 15 us a step.
    """
    if not isinstance(model, DIEN) or not model.training:
        return None
    if model.extractor is not None or model.evolving is not None or model.aux is not None:
        return None
    attention, head = model.attention, model.head
    if not isinstance(attention.query_proj, nn.Identity):
        return None
    rest, layers = list(attention.rest), list(head.layers)
    # rest: Sigmoid, Linear, Sigmoid, Linear, ...; layers: Linear, Dice, ..., Linear.
    if not rest or len(rest) % 2 or len(layers) % 2 == 0:
        return None
    if any(not isinstance(m, nn.Sigmoid if i % 2 == 0 else nn.Linear) for i, m in enumerate(rest)):
        return None
    if any(not isinstance(m, nn.Linear if i % 2 == 0 else Dice) for i, m in enumerate(layers)):
        return None
    modules = [model, model.embedding, model.embedding.item, model.embedding.cate, attention,
               attention.query_proj, attention.first, attention.rest, *rest, head, head.layers, *layers]
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
           for m in modules) or any(getattr(nn.modules.module, name) for name in _GLOBAL_HOOKS):
        return None
    parts = _Parts(model.embedding.item, model.embedding.cate, attention.first, rest[1::2], layers[0::2],
                   layers[1::2])
    params = [parts.item.weight, parts.cate.weight]
    for layer in (parts.first, *parts.tail, *parts.linears):
        params += [layer.weight, layer.bias]
    params += [dice.alpha for dice in parts.dices]
    if any(p is None or not p.requires_grad or p._backward_hooks for p in params):
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
    with torch.no_grad():
        loss, grads = _step(parts, batch)
    for param, grad in grads.items():
        param.grad = grad
    return loss


def _step(parts: _Parts, batch: Batch) -> tuple[Tensor, dict[nn.Parameter, Tensor]]:
    """The loss and the gradient of every parameter, for :func:`din_loss_and_gradients`."""
    item_table, cate_table = parts.item.weight, parts.cate.weight
    first, tail, linears, dices = parts.first, parts.tail, parts.linears, parts.dices

    # ---- forward: the computation of DIEN.forward for DIN --------------
    steps = batch.hist_item.shape[1]
    length = batch.length
    packing = PackedSteps(torch.arange(steps, device=length.device) < length.unsqueeze(1))
    row = packing.row  # [P]
    n_users = batch.item.shape[0]  # B
    item_ids = torch.cat([batch.item, packing.pack(batch.hist_item)])  # [B + P]
    cate_ids = torch.cat([batch.cate, packing.pack(batch.hist_cate)])  # [B + P]
    embedded = torch.cat([item_table.index_select(0, item_ids), cate_table.index_select(0, cate_ids)], dim=1)
    target, history = embedded[:n_users], embedded[n_users:]  # [B, E], [P, E]
    width = target.shape[1]  # E = K

    # Attention scores: first layer on [q, k, q*k] with the folded weight.
    q_rows = target.index_select(0, row)  # [P, E]
    pairs = torch.cat([q_rows, history, q_rows * history], dim=1)  # [P, 3E]
    w_q, w_k, w_d, w_p = first.weight.split(width, dim=1)  # 4 x [A1, E]
    folded = torch.cat([w_q + w_d, w_k - w_d, w_p], dim=1)  # [A1, 3E]
    hidden = [torch.addmm(first.bias, pairs, folded.t()).sigmoid_()]  # [P, A1]
    for layer in tail[:-1]:
        hidden.append(torch.addmm(layer.bias, hidden[-1], layer.weight.t()).sigmoid_())  # [P, A_next]
    scores = torch.addmm(tail[-1].bias, hidden[-1], tail[-1].weight.t()).squeeze(1)  # [P]
    weights = packing.pack(packing.softmax(scores))  # [P]
    interest = packing.sum_rows(weights.unsqueeze(1) * history)  # [B, E]
    history_sum = packing.sum_rows(history)  # [B, E]
    features = torch.cat([target, history_sum, target * history_sum, interest], dim=1)  # [B, 4E]

    # The head: Linear -> Dice, ..., Linear.
    inputs, dice_saved = [features], []
    x = features
    for layer, dice in zip(linears[:-1], dices):
        out, saved, mean, var = dice_forward(torch.addmm(layer.bias, x, layer.weight.t()), dice.alpha, dice.eps)
        dice.running_mean.lerp_(mean, dice.momentum)
        dice.running_var.lerp_(var, dice.momentum)
        dice_saved.append(saved)
        x = out  # [B, M]
        inputs.append(x)
    logit = torch.addmm(linears[-1].bias, x, linears[-1].weight.t()).squeeze(1)  # [B]
    label = batch.label.to(logit.dtype)
    loss = F.binary_cross_entropy_with_logits(logit, label)

    # ---- backward -------------------------------------------------------
    grads: dict[nn.Parameter, Tensor] = {}
    g = ((torch.sigmoid(logit) - label) / n_users).unsqueeze(1)  # [B, 1]: dL/dlogit
    for k in reversed(range(len(linears))):
        layer = linears[k]
        if k < len(linears) - 1:  # through Dice k first
            g, grads[dices[k].alpha] = dice_backward(g, dice_saved[k], dices[k].eps)  # [B, M_k], [M_k]
        grads[layer.weight] = g.t() @ inputs[k]  # [M_out, M_in]
        grads[layer.bias] = g.sum(dim=0)
        g = g @ layer.weight  # [B, M_in]
    g_target, g_hsum, g_product, g_interest = g.split(width, dim=1)  # 4 x [B, E]
    g_target = torch.addcmul(g_target, g_product, history_sum)  # [B, E]
    g_hsum = torch.addcmul(g_hsum, g_product, target)  # [B, E]

    # Pooling and the softmax of each user's scores.
    g_interest_rows = g_interest.index_select(0, row)  # [P, E]
    weighted = weights * (g_interest_rows * history).sum(dim=1)  # [P]: w_p g_w_p
    g_scores = weighted - weights * packing.sum_rows(weighted).index_select(0, row)  # [P]

    # The attention MLP, last layer first.
    g = g_scores.unsqueeze(1)  # [P, 1]
    for k in reversed(range(len(tail))):
        layer = tail[k]
        grads[layer.weight] = g.t() @ hidden[k]
        grads[layer.bias] = g.sum(dim=0)
        g = (g @ layer.weight).mul_(hidden[k]).mul_(1 - hidden[k])  # [P, A_k]: through the sigmoid
    g_folded = g.t() @ pairs  # [A1, 3E]
    grads[first.bias] = g.sum(dim=0)
    g_fq, g_fk, g_fp = g_folded.split(width, dim=1)
    grads[first.weight] = torch.cat([g_fq, g_fk, g_fq - g_fk, g_fp], dim=1)  # [A1, 4E]
    g_pq, g_pk, g_pp = (g @ folded).split(width, dim=1)  # 3 x [P, E]

    g_target = g_target.index_add_(0, row, torch.addcmul(g_pq, g_pp, history))  # [B, E]
    g_history = torch.addcmul(g_pk, weights.unsqueeze(1), g_interest_rows)  # [P, E]
    g_history = g_history.addcmul_(g_pp, q_rows).add_(g_hsum.index_select(0, row))

    # The lookups: every looked-up row adds its gradient to its table row.
    g_embedded = torch.cat([g_target, g_history])  # [B + P, E]
    item_dim = item_table.shape[1]
    for table, ids, part in ((parts.item, item_ids, g_embedded[:, :item_dim]),
                             (parts.cate, cate_ids, g_embedded[:, item_dim:])):
        g_table = torch.zeros_like(table.weight).index_add_(0, ids, part)
        if table.padding_idx is not None:
            g_table[table.padding_idx] = 0.0
        grads[table.weight] = g_table
    return loss.detach(), grads
