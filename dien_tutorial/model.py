"""DIEN and its baselines, assembled from :mod:`dien_tutorial.layers`.

Read top to bottom: the output record, the embedding block, then the full
model, then :func:`build_model`, which picks DIEN or a baseline by name.

Shape legend:

- ``B``: batch size (users).
- ``T``: history steps after right-padding; step ``t`` is valid iff
  ``t < length``.
- ``E``: width of one embedded behaviour, item embedding ++ category
  embedding (``item_dim + cate_dim``).
- ``H``: hidden width of the GRUs.
- ``K``: width of the attention keys: ``H`` when a GRU extractor runs,
  ``E`` for DIN.
- ``D``: width of the prediction head's input, ``3E + K``.
- ``P``: number of valid history steps in the batch; :meth:`DIEN.forward`
  works on these only, packed (:class:`~dien_tutorial.layers.PackedSteps`),
  and :meth:`DIEN.forward_padded` computes the same on ``[B, T, ...]``.

Inputs follow the data pipeline's batch contract: int64 ids with 0 =
padding, 1 = unknown, real ids from 2; histories right-padded to ``T``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dien_tutorial.config import DIEN_EVOLVING_KINDS, DIENConfig
from dien_tutorial.layers import (
    MLP,
    AttentionUnit,
    AuxiliaryLoss,
    AuxLossResult,
    InterestEvolving,
    InterestExtractor,
    PackedSteps,
)

MODEL_NAMES = ("dien", "din", "gru_att", "dien_no_aux")


class DIENOutput(NamedTuple):
    """What :meth:`DIEN.forward` returns.

    Attributes:
        prob: click probability ``[B]``.
        logit: click logit ``[B]``.
        attention: attention weights ``[B, T]`` (0 on padding).
        aux_loss: scalar auxiliary loss, NOT multiplied by ``alpha``; 0 when
            it was not computed.
        aux_row_loss: ``[B]``, each user's summed auxiliary pair losses
            (zeros when not computed).
        aux_row_pairs: ``[B]`` int64, each user's number of auxiliary pairs
            (zeros when not computed).
    """

    prob: Tensor
    logit: Tensor
    attention: Tensor
    aux_loss: Tensor
    aux_row_loss: Tensor
    aux_row_pairs: Tensor


EMBEDDING_INIT_STD = 0.01  # see BehaviourEmbedding


class BehaviourEmbedding(nn.Module):
    """Item and category tables; a behaviour is their concatenation.

    Row 0 of each table is padding (``padding_idx=0``: starts at zero and
    never receives a gradient). The model still masks padded steps itself
    and never relies on that row being zero.

    Initial scale: entries start from a normal distribution with standard
    deviation ``EMBEDDING_INIT_STD`` (0.01). The paper does not say how it
    initialises. The authors' code leaves it to ``tf.get_variable``'s
    default, Glorot uniform, whose scale depends on the table's size (about
    0.013 for the 12k items of Amazon Toys, 0.2 for its 26 categories);
    CTR libraries such as torch-rechub use 1e-4. PyTorch's own default
    (standard normal, scale 1) makes the early attention scores and dot
    products large and trained much more slowly in our measurements. One
    small scale for every table keeps item and category on the same footing.

    Args:
        config: supplies vocabulary sizes and widths.
    """

    def __init__(self, config: DIENConfig) -> None:
        super().__init__()
        self.item = nn.Embedding(config.n_items, config.item_dim, padding_idx=0)
        self.cate = nn.Embedding(config.n_cates, config.cate_dim, padding_idx=0)
        for table in (self.item, self.cate):
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
            with torch.no_grad():
                table.weight[0].zero_()  # padding row, as nn.Embedding leaves it

    def forward(self, item: Tensor, cate: Tensor) -> Tensor:
        """Embed behaviours.

        Args:
            item: item ids ``[...]``.
            cate: category ids ``[...]``, same shape.

        Returns:
            ``[..., E]``.
        """
        return torch.cat([_lookup(self.item, item), _lookup(self.cate, cate)], dim=-1)  # [..., E]


def _lookup(table: nn.Embedding, ids: Tensor) -> Tensor:
    """``table(ids)``, with a cheaper backward on CPU.

    ``nn.Embedding``'s backward (``embedding_dense_backward``) took about
    2.5 times as long as that of ``index_select``, which selects the same
    rows and whose gradient is the same sum over repeated ids. The one
    difference is the padding row, which ``nn.Embedding`` never lets a
    gradient reach: ids holding the padding index take ``nn.Embedding``
    itself. :meth:`DIEN.forward` embeds valid steps only, so the check
    passes there. ONNX export (tracing) keeps ``nn.Embedding``: a traced
    graph cannot branch on the data.

    Args:
        table: an embedding table with ``padding_idx``.
        ids: ``[...]`` int64.

    Returns:
        ``[..., d]``.
    """
    if torch.jit.is_tracing() or bool((ids == table.padding_idx).any()):
        return table(ids)
    return table.weight.index_select(0, ids.reshape(-1)).view(*ids.shape, table.embedding_dim)


def check_inputs(item: Tensor, cate: Tensor, hist_item: Tensor, hist_cate: Tensor,
                 length: Tensor, neg_hist_item: Tensor | None, neg_hist_cate: Tensor | None) -> None:
    """Check a batch against the model's input contract; raise naming the argument.

    Shapes and dtypes are checked in Python, for free; the lengths' range
    costs one reduction. Ids are checked only when a lookup fails (see
    :func:`id_range_error`): the lookup itself is the cheapest range check.

    Raises:
        ValueError: a shape, dtype or length that breaks the contract.
    """
    if (neg_hist_item is None) != (neg_hist_cate is None):
        raise ValueError("pass both neg_hist_item and neg_hist_cate, or neither")
    ids = {"item": item, "cate": cate, "hist_item": hist_item, "hist_cate": hist_cate, "length": length}
    if neg_hist_item is not None:
        ids.update(neg_hist_item=neg_hist_item, neg_hist_cate=neg_hist_cate)
    for name, t in ids.items():
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"model input '{name}' must hold int64 or int32 integers, got dtype {t.dtype}")
    if item.dim() != 1 or cate.shape != item.shape:
        raise ValueError(f"model inputs 'item' and 'cate' must both be [B]; got {list(item.shape)} and "
                         f"{list(cate.shape)}")
    batch = item.shape[0]
    if hist_item.dim() != 2 or hist_item.shape[0] != batch:
        raise ValueError(f"model input 'hist_item' must be [B, T] with B = {batch} (the batch of 'item'); "
                         f"got {list(hist_item.shape)}")
    for name in ("hist_cate", "neg_hist_item", "neg_hist_cate"):
        if name in ids and ids[name].shape != hist_item.shape:
            raise ValueError(f"model input '{name}' must have the shape of 'hist_item', "
                             f"{list(hist_item.shape)}; got {list(ids[name].shape)}")
    if length.shape != (batch,):
        raise ValueError(f"model input 'length' must be [B] with B = {batch}; got {list(length.shape)}")
    if batch:
        low, high = (int(v) for v in torch.aminmax(length))
        if low < 0 or high > hist_item.shape[1]:
            raise ValueError(f"model input 'length' must be in 0..T = 0..{hist_item.shape[1]} (the width of "
                             f"'hist_item'); got values from {low} to {high}")


def id_range_error(config: DIENConfig, valid: Tensor | None = None, **ids: Tensor | None) -> ValueError | None:
    """The error to raise when a lookup failed: the first argument with an id outside its table.

    Args:
        config: gives the table sizes ``n_items`` and ``n_cates``.
        valid: ``[B, T]``, the history slots that were looked up; None for
            all of them. Padding that was never looked up is not blamed.
        ids: the model's id arguments by name (``item``, ``hist_cate``, ...);
            None entries are skipped.

    Returns:
        A ValueError naming the argument and the allowed range, or None
        if every id is in range (the failure had another cause).
    """
    for name, t in ids.items():
        if t is not None and valid is not None and t.dim() == 2:
            t = t[valid]  # [P]: the looked-up slots only
        if t is None or t.numel() == 0:
            continue
        size, field = (config.n_cates, "n_cates") if name.endswith("cate") else (config.n_items, "n_items")
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= size:
            return ValueError(f"model input '{name}' holds ids from {low} to {high}, outside the table's "
                              f"0..{size - 1} (DIENConfig.{field} = {size})")
    return None


class DIEN(nn.Module):
    """Deep Interest Evolution Network, or one of its baselines.

    ``config.evolving`` selects the model:

    - ``"augru"``, ``"agru"``, ``"aigru"``: DIEN. Embed the history, run the
      interest extractor GRU, attend from the target item over its states,
      and let the interest evolving GRU (steered by attention) produce the
      final interest.
    - ``"gru_att"``: the extractor GRU, then attention pooling of its states
      (no evolving GRU).
    - ``"none"``: DIN, attention pooling of the embeddings (no GRU).

    ``config.use_aux`` adds the auxiliary loss on the extractor states.

    The head sees ``[e_target, sum_t e_t, e_target * sum_t e_t, interest]``.
    The paper lists target ad, user profile, context and the final interest;
    our batches carry no profile or context, and we follow the authors' code
    in adding the sum of the history embeddings and its product with the
    target (the code also adds a user-id embedding, which the batch contract
    does not have).

    Args:
        config: a validated :class:`DIENConfig`.
    """

    def __init__(self, config: DIENConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        emb = config.behaviour_dim  # E
        key_dim = config.hidden if config.has_extractor else emb  # K

        self.embedding = BehaviourEmbedding(config)
        self.extractor = InterestExtractor(emb, config.hidden) if config.has_extractor else None
        self.attention = AttentionUnit(emb, key_dim, config.attention_widths)
        self.evolving = (
            InterestEvolving(config.hidden, config.evolving)
            if config.evolving in DIEN_EVOLVING_KINDS
            else None
        )
        self.aux = (
            AuxiliaryLoss(config.hidden, emb, config.aux_scorer, config.aux_widths)
            if config.use_aux
            else None
        )
        self.head = MLP(3 * emb + key_dim, config.mlp_widths, config.activation, config.dropout)

    def embed_history(self, hist_item: Tensor, hist_cate: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        """Embed the history and build its mask.

        Args:
            hist_item: ``[B, T]``.
            hist_cate: ``[B, T]``.
            length: ``[B]``.

        Returns:
            ``(history [B, T, E], mask [B, T])``; padded steps of ``history``
            are zero whatever the padding row of the tables holds, so no
            later sum can pick it up.
        """
        steps = hist_item.shape[1]
        mask = torch.arange(steps, device=length.device) < length.unsqueeze(1)  # [B, T]
        history = self.embedding(hist_item, hist_cate)  # [B, T, E]
        return history.masked_fill(~mask.unsqueeze(-1), 0.0), mask  # [B, T, E]

    def auxiliary_loss(
        self,
        hist_item: Tensor,
        hist_cate: Tensor,
        length: Tensor,
        neg_hist_item: Tensor,
        neg_hist_cate: Tensor,
        return_pairs: bool = False,
    ) -> AuxLossResult:
        """The auxiliary loss alone, optionally with the pairs it scored.

        Runs the same embedding, extractor and auxiliary network as
        :meth:`forward`; useful to inspect which (state, next behaviour)
        pairs are supervised.

        Args:
            hist_item: ``[B, T]``.
            hist_cate: ``[B, T]``.
            length: ``[B]``.
            neg_hist_item: ``[B, T]``.
            neg_hist_cate: ``[B, T]``.
            return_pairs: fill :attr:`AuxLossResult.pairs`.

        Returns:
            An :class:`~dien_tutorial.layers.AuxLossResult`.

        Raises:
            ValueError: the model has no auxiliary loss (``use_aux`` False).
        """
        if self.aux is None or self.extractor is None:
            raise ValueError("this model was built with DIENConfig.use_aux=False")
        history, mask = self.embed_history(hist_item, hist_cate, length)  # [B, T, E], [B, T]
        states = self.extractor(history, mask)  # [B, T, H]
        negatives = self.embedding(neg_hist_item, neg_hist_cate)  # [B, T, E]
        return self.aux(states, history, negatives, mask, return_pairs=return_pairs)

    def forward(
        self,
        item: Tensor,
        cate: Tensor,
        hist_item: Tensor,
        hist_cate: Tensor,
        length: Tensor,
        neg_hist_item: Tensor | None = None,
        neg_hist_cate: Tensor | None = None,
    ) -> DIENOutput:
        """Predict clicks and, when possible, compute the auxiliary loss.

        The auxiliary loss is computed whenever ``config.use_aux`` is set and
        the negatives are given, in training and in eval mode alike (it is a
        useful validation number); pass no negatives to skip it.

        Only the valid history steps are embedded and processed, packed once
        here and handed packed to every layer; :meth:`forward_padded` is the
        same computation on padded tensors, easier to read and slower.

        Args:
            item: target item ids ``[B]``.
            cate: target category ids ``[B]``.
            hist_item: clicked item ids ``[B, T]``, right-padded with 0.
            hist_cate: their categories ``[B, T]``.
            length: true history lengths ``[B]``, each in ``0..T``.
            neg_hist_item: a sampled non-clicked item per step ``[B, T]``.
            neg_hist_cate: its category ``[B, T]``.

        Returns:
            A :class:`DIENOutput`.

        Raises:
            ValueError: an input breaks the contract above (an id dtype that
                is not an integer, a shape, a length outside ``0..T``, an id
                outside its table), naming the argument.
        """
        if torch.jit.is_tracing():
            # ONNX export traces the padded version, which has no
            # data-dependent loop lengths.
            return self.forward_padded(item, cate, hist_item, hist_cate, length, neg_hist_item, neg_hist_cate)
        check_inputs(item, cate, hist_item, hist_cate, length, neg_hist_item, neg_hist_cate)
        steps = hist_item.shape[1]
        mask = torch.arange(steps, device=length.device) < length.unsqueeze(1)  # [B, T]
        # Only the valid steps are embedded and processed: P rows, not B * T.
        packing = PackedSteps(mask)
        with_aux = self.aux is not None and neg_hist_item is not None and neg_hist_cate is not None
        ids = [(item, cate), (packing.pack(hist_item), packing.pack(hist_cate))]
        if with_aux:
            ids.append((packing.pack(neg_hist_item), packing.pack(neg_hist_cate)))
        # One lookup per table for all the ids of the batch: the backward of
        # a lookup writes a gradient the size of the whole table.
        try:
            embedded = self.embedding(torch.cat([i for i, _ in ids]), torch.cat([c for _, c in ids]))
        except IndexError:
            error = id_range_error(self.config, mask, item=item, cate=cate, hist_item=hist_item,
                                   hist_cate=hist_cate, neg_hist_item=neg_hist_item if with_aux else None,
                                   neg_hist_cate=neg_hist_cate if with_aux else None)
            if error is None:
                raise
            raise error from None
        target, history, *rest = embedded.split([len(i) for i, _ in ids])  # [B, E], [P, E], ([P, E])
        negatives = rest[0] if with_aux else None

        keys = self.extractor(history, packing) if self.extractor is not None else history  # [P, K]
        attention = self.attention(target, keys, packing)  # [B, T]
        if self.evolving is not None:
            interest = self.evolving(keys, attention, packing)  # [B, H]
        else:
            interest = packing.sum_rows(packing.pack(attention).unsqueeze(-1) * keys)  # [B, K]

        history_sum = packing.sum_rows(history)  # [B, E]
        return self._finish(target, history_sum, interest, attention, keys, history, negatives, packing)

    def forward_padded(
        self,
        item: Tensor,
        cate: Tensor,
        hist_item: Tensor,
        hist_cate: Tensor,
        length: Tensor,
        neg_hist_item: Tensor | None = None,
        neg_hist_cate: Tensor | None = None,
    ) -> DIENOutput:
        """:meth:`forward` on padded ``[B, T, ...]`` tensors: same arguments, same result.

        The textbook form of the model, every history tensor ``[B, T, ...]``
        with its mask. :meth:`forward` computes the same on the packed valid
        steps (:class:`~dien_tutorial.layers.PackedSteps`), several times
        faster when most of the ``B * T`` slots are padding. ONNX export
        traces this version.
        """
        if not torch.jit.is_tracing():
            check_inputs(item, cate, hist_item, hist_cate, length, neg_hist_item, neg_hist_cate)
        with_aux = self.aux is not None and neg_hist_item is not None and neg_hist_cate is not None
        try:
            target = self.embedding(item, cate)  # [B, E]
            history, mask = self.embed_history(hist_item, hist_cate, length)  # [B, T, E], [B, T]
            negatives = self.embedding(neg_hist_item, neg_hist_cate) if with_aux else None  # [B, T, E]
        except IndexError:
            error = id_range_error(self.config, item=item, cate=cate, hist_item=hist_item, hist_cate=hist_cate,
                                   neg_hist_item=neg_hist_item, neg_hist_cate=neg_hist_cate)
            if error is None:
                raise
            raise error from None

        keys = self.extractor(history, mask) if self.extractor is not None else history  # [B, T, K]
        attention = self.attention(target, keys, mask)  # [B, T]
        if self.evolving is not None:
            interest = self.evolving(keys, attention, mask)  # [B, H]
        else:
            interest = (attention.unsqueeze(-1) * keys).sum(dim=1)  # [B, K]

        history_sum = history.sum(dim=1)  # [B, E]
        return self._finish(target, history_sum, interest, attention, keys, history, negatives, mask)

    def _finish(
        self,
        target: Tensor,
        history_sum: Tensor,
        interest: Tensor,
        attention: Tensor,
        keys: Tensor,
        history: Tensor,
        negatives: Tensor | None,
        steps: Tensor | PackedSteps,
    ) -> DIENOutput:
        """The head and the auxiliary loss, shared by both layouts."""
        features = torch.cat([target, history_sum, target * history_sum, interest], dim=-1)  # [B, D]
        logit = self.head(features)  # [B]

        batch = target.shape[0]
        if self.aux is not None and negatives is not None:
            aux = self.aux(keys, history, negatives, steps)
            aux_loss, aux_row_loss, aux_row_pairs = aux.loss, aux.row_loss, aux.row_pairs
        else:
            aux_loss = logit.new_zeros(())  # []
            aux_row_loss = logit.new_zeros(batch)  # [B]
            aux_row_pairs = torch.zeros(batch, dtype=torch.int64, device=logit.device)  # [B]

        return DIENOutput(torch.sigmoid(logit), logit, attention, aux_loss, aux_row_loss, aux_row_pairs)

    def loss(self, output: DIENOutput, label: Tensor) -> Tensor:
        """Training objective: click cross-entropy + ``alpha`` * auxiliary loss.

        Args:
            output: this model's output for the batch.
            label: clicks ``[B]`` (0 or 1, any numeric dtype).

        Returns:
            Scalar loss.
        """
        click = F.binary_cross_entropy_with_logits(output.logit, label.to(output.logit.dtype))
        return click + self.config.alpha * output.aux_loss


def build_model(name: str, config: DIENConfig) -> DIEN:
    """DIEN or a baseline, from the same config.

    Args:
        name: ``"dien"`` (evolving layer and auxiliary loss), ``"dien_no_aux"``
            (no auxiliary loss), ``"gru_att"`` (extractor GRU + attention
            pooling) or ``"din"`` (attention pooling over embeddings). For the
            two DIEN names the config's ``evolving`` picks the variant and
            must be ``"augru"``, ``"agru"`` or ``"aigru"``.
        config: widths and switches; ``evolving`` and ``use_aux`` are set
            from ``name``.

    Returns:
        A freshly initialised :class:`DIEN` whose ``config`` records the
        choices.

    Raises:
        ValueError: unknown name, or a DIEN name with a baseline ``evolving``.
    """
    if name in ("dien", "dien_no_aux"):
        if config.evolving not in DIEN_EVOLVING_KINDS:
            raise ValueError(
                f"DIENConfig.evolving must be one of {DIEN_EVOLVING_KINDS} for model "
                f"{name!r}, got {config.evolving!r}"
            )
        config = dataclasses.replace(config, use_aux=name == "dien")
    elif name == "gru_att":
        config = dataclasses.replace(config, evolving="gru_att", use_aux=False)
    elif name == "din":
        config = dataclasses.replace(config, evolving="none", use_aux=False)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return DIEN(config)
