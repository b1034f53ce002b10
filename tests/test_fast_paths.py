"""The fast paths (packed forward pass, vectorised GAUC) equal the plain ones."""

from __future__ import annotations

import pytest
import torch

from dien_tutorial.config import DIENConfig
from dien_tutorial.model import MODEL_NAMES, build_model


def _batch(seed: int, lengths: list[int], n_items: int = 64, n_cates: int = 8):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(max(lengths), 1)
    length = torch.tensor(lengths)
    mask = torch.arange(T)[None, :] < length[:, None]

    def ids(n, shape):
        return torch.randint(2, n, shape, generator=g)

    return dict(
        item=ids(n_items, (B,)), cate=ids(n_cates, (B,)),
        hist_item=ids(n_items, (B, T)) * mask, hist_cate=ids(n_cates, (B, T)) * mask,
        length=length,
        neg_hist_item=ids(n_items, (B, T)) * mask, neg_hist_cate=ids(n_cates, (B, T)) * mask,
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("evolving", ["augru", "agru", "aigru"])
def test_forward_equals_forward_padded_with_gradients(name, evolving):
    torch.manual_seed(0)
    model = build_model(name, DIENConfig.tiny(evolving=evolving))
    model.train()
    inputs = _batch(1, [0, 1, 2, 5, 9, 3])
    fast = model(**inputs)
    loss_fast = model.loss(fast, torch.tensor([1.0, 0, 1, 0, 1, 0]))
    grads_fast = torch.autograd.grad(loss_fast, list(model.parameters()), allow_unused=True)
    slow = model.forward_padded(**inputs)
    loss_slow = model.loss(slow, torch.tensor([1.0, 0, 1, 0, 1, 0]))
    grads_slow = torch.autograd.grad(loss_slow, list(model.parameters()), allow_unused=True)

    torch.testing.assert_close(fast.prob, slow.prob, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast.attention, slow.attention, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast.aux_loss, slow.aux_loss, atol=1e-6, rtol=0)
    for a, b in zip(grads_fast, grads_slow):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gauc_equals_sklearn_user_by_user_with_ties():
    """The vectorised GAUC equals sklearn's AUC per user, weighted by impressions."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from dien_tutorial.train import gauc

    rng = np.random.default_rng(3)
    n = 5000
    user = rng.integers(0, 400, n)
    label = (rng.random(n) < 0.3).astype(np.float32)
    score = np.round(rng.random(n), 1)  # many ties
    total = weight = used = 0
    for u in np.unique(user):
        m = user == u
        if label[m].min() == label[m].max():
            continue
        total += roc_auc_score(label[m], score[m]) * m.sum()
        weight += m.sum()
        used += 1
    value, n_used = gauc(user, label, score)
    assert n_used == used
    assert abs(value - total / weight) < 1e-12
    assert np.isnan(gauc(np.array([1, 1]), np.array([1.0, 1.0]), np.array([0.2, 0.3]))[0])
