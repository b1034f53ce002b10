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


# ---------------------------------------------------------------------- #
# Hand-written backwards and the other training fast paths
# ---------------------------------------------------------------------- #
def _packing(lengths: list[int]):
    from dien_tutorial.layers import PackedSteps

    steps = max(max(lengths), 1)
    return PackedSteps(torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None])


@pytest.mark.parametrize("mode", ["gru", "augru", "agru"])
@pytest.mark.parametrize("lengths", [[0, 1, 2, 50], [3, 3, 3], [0, 0], [5, 0, 2, 7, 1, 1, 0, 9], [1]])
def test_packed_gru_backward_equals_autograd_through_the_loop(mode, lengths):
    """PackedGRUFunction: same states and the same gradients for every input as autograd."""
    from dien_tutorial.layers import PackedGRUFunction, packed_gru, packed_gru_loop

    g = torch.Generator().manual_seed(len(lengths) * 7 + len(mode))
    packing = _packing(lengths)
    hidden, total, batch = 5, len(packing.index), len(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x, weight, bias, h0 = rand(total, 3 * hidden), rand(3 * hidden, hidden), rand(3 * hidden), rand(batch, hidden)
    scale = torch.rand(total, generator=g, dtype=torch.float64).requires_grad_() if mode != "gru" else None
    inputs = [x, weight, bias, h0] + ([scale] if scale is not None else [])
    up_states, up_final = torch.randn(total, hidden, generator=g, dtype=torch.float64), torch.randn(
        batch, hidden, generator=g, dtype=torch.float64)

    results = []
    for fn in (packed_gru, packed_gru_loop):
        states, final = fn(x, packing.sizes, weight, bias, h0, step_scale=scale, use_update_gate=mode != "agru")
        grads = torch.autograd.grad((states * up_states).sum() + (final * up_final).sum(), inputs,
                                    allow_unused=True)
        results.append((states, final, [gr if gr is not None else torch.zeros_like(i)
                                        for gr, i in zip(grads, inputs)]))
    (fast_states, fast_final, fast_grads), (states, final, grads) = results
    # The fast path really ran: its output hangs off PackedGRUFunction.
    assert packing.sizes == [] or type(fast_final.grad_fn).__name__ == PackedGRUFunction.__name__ + "Backward"
    torch.testing.assert_close(fast_states, states, atol=1e-12, rtol=0)
    torch.testing.assert_close(fast_final, final, atol=1e-12, rtol=0)
    for name, a, b in zip(["input_proj", "weight_hh", "bias_hh", "h0", "step_scale"], fast_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
    if 50 in lengths:  # the long history's gradient reaches its first step
        assert fast_grads[0].abs().sum() > 0


def _dice_reference(x, alpha, eps):
    """Dice in training mode, written for autograd (the formula of DiceFunction)."""
    centred = x - x.mean(dim=0)
    p = torch.sigmoid(centred * torch.rsqrt(centred.square().mean(dim=0) + eps))
    return x * torch.addcmul(alpha, p, 1 - alpha)


@pytest.mark.parametrize("batch,dtype,tol", [(256, torch.float32, 1e-6), (7, torch.float64, 1e-12),
                                             (1, torch.float64, 1e-12)])
def test_dice_backward_equals_autograd(batch, dtype, tol):
    from dien_tutorial.layers import Dice

    g = torch.Generator().manual_seed(batch)
    dice = Dice(30).to(dtype)
    with torch.no_grad():
        dice.alpha.uniform_(-1, 1, generator=g)
    x = (torch.randn(batch, 30, generator=g, dtype=dtype) * 3 + 1).requires_grad_()
    up = torch.randn(batch, 30, generator=g, dtype=dtype)
    dice.train()
    out = dice(x)
    ref = _dice_reference(x, dice.alpha, dice.eps)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # same operations, same numbers
    grads = torch.autograd.grad(out, [x, dice.alpha], up)
    ref_grads = torch.autograd.grad(ref, [x, dice.alpha], up)
    for a, b in zip(grads, ref_grads):
        scale = b.abs().max().clamp_min(1)
        assert (a - b).abs().max() <= tol * scale
    # Running statistics: biased variance of the batch, momentum 0.1 from (0, 1).
    expected_var = 0.9 + 0.1 * x.detach().var(dim=0, unbiased=False)
    torch.testing.assert_close(dice.running_var, expected_var, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dice_on_a_batch_of_one_is_exact(dtype):
    """One row: x equals its batch mean, so p = 1/2 exactly, and the gradient
    is the closed form g * (alpha + (1 - alpha) / 2), with nothing from the
    normalisation (whose scale 1 / sqrt(eps) = 1e4 would magnify any
    rounding)."""
    from dien_tutorial.layers import Dice

    g = torch.Generator().manual_seed(11)
    dice = Dice(30).to(dtype)
    with torch.no_grad():
        dice.alpha.uniform_(-1, 1, generator=g)
    x = (torch.randn(1, 30, generator=g, dtype=dtype) * 3 + 1).requires_grad_()
    up = torch.randn(1, 30, generator=g, dtype=dtype)
    dice.train()
    out = dice(x)
    scale = dice.alpha + 0.5 * (1 - dice.alpha)  # [A]
    assert torch.equal(out, x * scale)
    grad_x, grad_alpha = torch.autograd.grad(out, [x, dice.alpha], up)
    assert torch.equal(grad_x, up * scale)
    torch.testing.assert_close(grad_alpha, (up * x * 0.5).sum(dim=0), atol=0, rtol=1e-6 if dtype == torch.float32 else 1e-12)


def test_packed_softmax_equals_masked_softmax_with_empty_rows():
    from dien_tutorial.layers import masked_softmax

    lengths = [0, 1, 2, 50, 0, 3]
    packing = _packing(lengths)
    scores = torch.randn(len(packing.index), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    scores.requires_grad_()
    up = torch.randn(len(lengths), 50, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    fast = packing.softmax(scores)
    slow = masked_softmax(packing.unpack(scores), packing.mask)
    assert torch.equal(fast, slow)
    assert torch.equal(fast[0], torch.zeros(50)) and fast[3].sum().item() == pytest.approx(1.0)
    grad_fast, = torch.autograd.grad(fast, scores, up)
    grad_slow, = torch.autograd.grad(slow, scores, up)
    torch.testing.assert_close(grad_fast, grad_slow, atol=1e-15, rtol=0)


def test_embedding_lookup_equals_nn_embedding_and_keeps_padding_gradient_zero():
    from dien_tutorial.model import _lookup

    torch.manual_seed(0)
    table = torch.nn.Embedding(20, 4, padding_idx=0)
    up = torch.randn(3, 5, 4)
    for ids in (torch.randint(1, 20, (3, 5)), torch.tensor([[0, 3, 3, 0, 19]] * 3)):
        table.zero_grad()
        fast = _lookup(table, ids)
        fast.backward(up)
        grad_fast = table.weight.grad.clone()
        table.zero_grad()
        slow = table(ids)
        slow.backward(up)
        assert torch.equal(fast, slow)
        torch.testing.assert_close(grad_fast, table.weight.grad, atol=1e-6, rtol=0)
        assert torch.equal(grad_fast[0], torch.zeros(4))  # the padding row never learns


def test_dataset_batch_equals_items_collated():
    """The vectorised DienDataset.batch equals padding the samples one by one."""
    import numpy as np
    import pandas as pd

    from dien_tutorial.data.log import LOG_COLUMNS, validate_log
    from dien_tutorial.data.samples import build_samples, collate

    rng = np.random.default_rng(0)
    parts = []
    for user in range(40):
        n = int(rng.integers(1, 60))  # histories up to 50 after truncation, many short
        items = rng.choice(200, size=n, replace=False)
        parts.append(pd.DataFrame({"user": user, "item": items, "category": items % 7,
                                   "time": np.arange(n) * 86400, "order": np.arange(n)}))
    log = validate_log(pd.concat(parts, ignore_index=True)[list(LOG_COLUMNS)], "random log")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        samples = build_samples(log, max_len=50, seed=0)
    data = samples.dataset("train")
    index = np.random.default_rng(1).permutation(len(data))[:64]
    fast = data.batch(index)
    slow = collate([data[int(i)] for i in index])
    assert {0, 50} <= set(fast.length.tolist()) or fast.length.max() >= 40
    for name, a, b in zip(fast._fields, fast, slow):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_train_step_equals_the_autograd_reference(monkeypatch):
    """A training step with the hand-written backwards equals one with autograd everywhere."""
    from dien_tutorial import layers
    from dien_tutorial.data.samples import Batch
    from dien_tutorial.train import TrainConfig, make_optimizer, train_step

    inputs = _batch(3, [0, 1, 2, 50, 7, 0, 3, 12])
    label = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0])
    batch = Batch(user=torch.arange(8), label=label, **inputs)

    def step(name):
        torch.manual_seed(0)
        model = build_model(name, DIENConfig.tiny())
        model.train()
        opt = make_optimizer(model, TrainConfig(lr=1e-2))
        alpha = model.config.alpha if model.config.use_aux else 0.0
        losses = train_step(model, opt, batch, alpha)
        # train_step leaves the step's gradients in place. (Parameters after
        # Adam are not compared: Adam turns a gradient of 1e-9 into a step of
        # size lr, so rounding noise in near-zero gradients would dominate.)
        return losses, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for name in ("dien", "din"):
        fast_losses, fast_grads = step(name)
        with monkeypatch.context() as patch:
            def slow_gru(input_proj, step_scale, weight_hh, bias_hh, h0, sizes, use_update_gate):
                return layers.packed_gru_loop(input_proj, sizes, weight_hh, bias_hh, h0, step_scale, use_update_gate)

            def slow_dice(x, alpha, eps):
                mean = x.mean(dim=0)
                return _dice_reference(x, alpha, eps), mean.detach(), (x - mean).square().mean(dim=0).detach()

            patch.setattr(layers.PackedGRUFunction, "apply", slow_gru)
            patch.setattr(layers.DiceFunction, "apply", slow_dice)
            slow_losses, slow_grads = step(name)
        for fast, slow in zip(fast_losses, slow_losses):  # main and aux
            assert abs(fast.item() - slow.item()) < 1e-6
        assert len(fast_grads) == len(slow_grads) > 10
        for a, b in zip(fast_grads, slow_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
