"""The hand-written DIN training step against autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dien_tutorial import din_step
from dien_tutorial.config import DIENConfig
from dien_tutorial.data.samples import Batch
from dien_tutorial.model import build_model
from dien_tutorial.train import TrainConfig, make_optimizer, train_step


def din(dtype: torch.dtype = torch.float32, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("din", DIENConfig.tiny(**config)).to(dtype)
    return model.train()


def batch_of(model: torch.nn.Module, lengths: list[int], pad_to: int | None = None, seed: int = 1) -> Batch:
    """A batch following the pipeline's contract: ids from 2, right-padded with 0."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    n, steps = len(lengths), pad_to or max(lengths + [1])
    length = torch.tensor(lengths)
    valid = torch.arange(steps) < length.unsqueeze(1)

    def ids(vocab: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(2, vocab, shape, generator=g)

    return Batch(user=torch.arange(n), item=ids(config.n_items, (n,)), cate=ids(config.n_cates, (n,)),
                 label=torch.randint(0, 2, (n,), generator=g).float(),
                 hist_item=ids(config.n_items, (n, steps)) * valid, hist_cate=ids(config.n_cates, (n, steps)) * valid,
                 neg_hist_item=torch.zeros(n, steps, dtype=torch.int64),
                 neg_hist_cate=torch.zeros(n, steps, dtype=torch.int64), length=length)


def autograd_step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    out = model(item=batch.item, cate=batch.cate, hist_item=batch.hist_item, hist_cate=batch.hist_cate,
                length=batch.length)
    loss = F.binary_cross_entropy_with_logits(out.logit, batch.label.to(out.logit.dtype))
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("lengths", [[3, 0, 5, 1, 2], [0, 0, 0], [1], [0], [6], [2, 2]])
def test_loss_gradients_and_running_estimates_equal_autograd(dtype, atol, lengths):
    model = din(dtype)
    batch = batch_of(model, lengths, pad_to=max(lengths) + 3)
    reference, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    expected = autograd_step(reference, batch)
    loss = din_step.din_loss_and_gradients(by_hand, batch)
    assert loss.dtype == dtype and loss.dim() == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, expected, atol=atol, rtol=0)
    for (name, want), got in zip(reference.named_parameters(), by_hand.parameters()):
        assert got.grad is not None and got.grad.shape == want.shape, name
        torch.testing.assert_close(got.grad, want.grad, atol=atol, rtol=0, msg=name)
    for (name, want), got in zip(reference.named_buffers(), by_hand.buffers()):
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=name)  # Dice's running estimates


def test_every_parameter_gets_a_gradient_and_the_padding_row_none():
    model = din()
    batch = batch_of(model, [4, 2, 3])._replace(item=torch.tensor([0, 5, 6]))  # one target is the padding id
    din_step.din_loss_and_gradients(model, batch)
    last_bias = model.attention.rest[-1].bias
    for name, param in model.named_parameters():
        if param is not last_bias:
            assert param.grad is not None and param.grad.abs().sum().item() > 0, name
    # A constant added to every score leaves each softmax unchanged: the
    # last attention layer's bias has a zero gradient (up to rounding).
    assert last_bias.grad.abs().item() < 1e-9
    assert model.embedding.item.weight.grad[0].abs().sum().item() == 0.0
    assert model.embedding.cate.weight.grad[0].abs().sum().item() == 0.0


def test_gradients_are_replaced_not_added():
    fresh, stale = din(), din()
    batch = batch_of(fresh, [3, 1, 4])
    for p in stale.parameters():
        p.grad = torch.full_like(p, 123.0)  # gradients left from somewhere else
    din_step.din_loss_and_gradients(fresh, batch)
    din_step.din_loss_and_gradients(stale, batch)
    for (name, want), got in zip(fresh.named_parameters(), stale.parameters()):
        assert torch.equal(got.grad, want.grad), name


def test_train_step_with_the_hand_written_step_follows_autograd_for_several_steps():
    # float64: Adam divides each gradient by its own running size, so a
    # gradient that is zero up to rounding (the last attention bias, see
    # above) moves its parameter by rounding noise, which float32 would
    # make visible here.
    by_hand = din(torch.float64)
    reference = copy.deepcopy(by_hand)
    opt_hand = make_optimizer(by_hand, TrainConfig(lr=1e-2))
    opt_ref = make_optimizer(reference, TrainConfig(lr=1e-2))
    for step in range(4):
        batch = batch_of(by_hand, [3, 0, 5, 2, 1, 4], seed=step)
        main, aux = train_step(by_hand, opt_hand, batch, alpha=0.0)
        opt_ref.zero_grad(set_to_none=True)
        expected = autograd_step(reference, batch)
        opt_ref.step()
        torch.testing.assert_close(main, expected, atol=1e-12, rtol=0)
        assert aux.item() == 0.0
    for (name, want), got in zip(reference.state_dict().items(), by_hand.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0, msg=name)
    assert not torch.equal(by_hand.head.layers[0].weight, din(torch.float64).head.layers[0].weight)  # it trained


@pytest.mark.parametrize("change", ["eval", "dropout", "prelu", "frozen", "forward_hook", "param_hook"])
def test_models_it_was_not_written_for_go_through_autograd(change):
    model = din(dropout=0.5) if change == "dropout" else din(activation="prelu") if change == "prelu" else din()
    assert din_step.applies(din())
    if change == "eval":
        model.eval()
    elif change == "frozen":
        model.embedding.cate.weight.requires_grad_(False)
    elif change == "forward_hook":
        model.attention.register_forward_hook(lambda *args: None)
    elif change == "param_hook":
        model.head.layers[0].weight.register_hook(lambda grad: grad)
    assert not din_step.applies(model)
    before = copy.deepcopy(model.state_dict())
    assert din_step.din_loss_and_gradients(model, batch_of(model, [2, 3])) is None
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


@pytest.mark.parametrize("name", ["dien", "dien_no_aux", "gru_att"])
def test_the_other_models_go_through_autograd(name):
    torch.manual_seed(0)
    assert not din_step.applies(build_model(name, DIENConfig.tiny()).train())


def test_a_batch_that_breaks_the_contract_is_an_error():
    model = din()
    batch = batch_of(model, [2, 3])
    with pytest.raises(ValueError, match=r"model input 'length' must be in 0\.\.T = 0\.\.3"):
        din_step.din_loss_and_gradients(model, batch._replace(length=torch.tensor([2, 4])))


class _LinearWithItsOwnForward(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(2 * x)


@pytest.mark.parametrize("change", ["subclassed_layer", "replaced_head", "parametrized", "post_accumulate_hook",
                                    "sparse_table", "subclassed_model"])
def test_changed_layers_go_through_autograd(change):
    model = din()
    if change == "subclassed_layer":
        old = model.head.layers[0]
        new = _LinearWithItsOwnForward(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        model.head.layers[0] = new
    elif change == "replaced_head":
        model.head = torch.nn.Sequential(torch.nn.Linear(model.head.layers[0].in_features, 1), torch.nn.Flatten(0))
    elif change == "parametrized":
        torch.nn.utils.parametrizations.weight_norm(model.head.layers[0])
    elif change == "post_accumulate_hook":
        model.attention.first.weight.register_post_accumulate_grad_hook(lambda p: None)
    elif change == "sparse_table":
        model.embedding.item.sparse = True
    else:
        model.__class__ = type("MyDIN", (type(model),), {})
    assert not din_step.applies(model)
    assert din_step.din_loss_and_gradients(model, batch_of(model, [2, 3])) is None


def test_train_step_of_a_changed_din_equals_autograd():
    model = din()
    old = model.head.layers[0]
    new = _LinearWithItsOwnForward(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    model.head.layers[0] = new
    reference = copy.deepcopy(model)
    batch = batch_of(model, [3, 1, 4])
    train_step(model, make_optimizer(model, TrainConfig()), batch, alpha=0.0)
    opt = make_optimizer(reference, TrainConfig())
    autograd_step(reference, batch)
    opt.step()
    for (name, want), got in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)


def test_an_id_outside_its_table_names_the_input_and_padding_is_not_blamed():
    model = din()
    batch = batch_of(model, [2, 1], pad_to=4)
    hist_item = batch.hist_item.clone()
    hist_item[0, 3] = 10**6  # padding: never looked up
    hist_cate = batch.hist_cate.clone()
    hist_cate[1, 0] = 99  # a valid step
    with pytest.raises(ValueError, match=r"model input 'hist_cate' holds ids from \d+ to 99, outside the "
                                         rf"table's 0\.\.{model.config.n_cates - 1}"):
        din_step.din_loss_and_gradients(model, batch._replace(hist_item=hist_item, hist_cate=hist_cate))


def test_an_empty_training_batch_is_an_error():
    model = din()
    with pytest.raises(ValueError, match="a training batch needs at least one sample"):
        din_step.din_loss_and_gradients(model, batch_of(model, [2])._replace(
            user=torch.zeros(0, dtype=torch.int64), item=torch.zeros(0, dtype=torch.int64),
            cate=torch.zeros(0, dtype=torch.int64), label=torch.zeros(0),
            hist_item=torch.zeros(0, 2, dtype=torch.int64), hist_cate=torch.zeros(0, 2, dtype=torch.int64),
            length=torch.zeros(0, dtype=torch.int64)))
    model.head.layers[2].register_forward_hook(lambda *args: None)  # the autograd path: Dice refuses it too
    with pytest.raises(ValueError, match="Dice in training mode needs a batch of at least one row"):
        model(item=torch.zeros(0, dtype=torch.int64), cate=torch.zeros(0, dtype=torch.int64),
              hist_item=torch.zeros(0, 2, dtype=torch.int64), hist_cate=torch.zeros(0, 2, dtype=torch.int64),
              length=torch.zeros(0, dtype=torch.int64))
