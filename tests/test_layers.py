"""Tests of dien_tutorial.layers: every block checked against real numbers."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dien_tutorial.layers import (
    MLP,
    AttentionUnit,
    AuxiliaryLoss,
    Dice,
    GRUCell,
    InterestEvolving,
    InterestExtractor,
    evolve_interest,
    make_activation,
    masked_softmax,
)


def lengths_to_mask(length: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.arange(steps) < length.unsqueeze(1)


def random_cell(input_size: int, hidden: int, seed: int) -> GRUCell:
    """A cell with weights far from the default init, so bugs show."""
    torch.manual_seed(seed)
    cell = GRUCell(input_size, hidden)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_(0.0, 0.7)
    return cell


def run_evolving(cell: GRUCell, x: torch.Tensor, scale: torch.Tensor, h0: torch.Tensor, use_gate: bool):
    return evolve_interest(cell.input_projection(x), scale, cell.weight_hh, cell.bias_hh, h0, use_gate)


# ---------------------------------------------------------------------- #
# GRU cell
# ---------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gru_cell_matches_torch_gru_over_a_sequence(seed):
    cell = random_cell(input_size=6, hidden=5, seed=seed)
    gru = nn.GRU(6, 5, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, name + "_l0").copy_(getattr(cell, name))
    x = torch.randn(4, 9, 6)
    h0 = torch.randn(4, 5)

    expected, last = gru(x, h0.unsqueeze(0))
    h = h0
    states = []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h)
        states.append(h)
    torch.testing.assert_close(torch.stack(states, 1), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, last[0], atol=1e-6, rtol=0)


def test_gru_cell_weights_copy_both_ways():
    gru = nn.GRU(3, 4, batch_first=True)
    cell = GRUCell(3, 4)
    cell.copy_from_torch(gru)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        assert torch.equal(getattr(cell, name), getattr(gru, name + "_l0"))
    back = cell.to_torch_gru()
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert torch.equal(getattr(back, name), getattr(gru, name))
    # nn.GRUCell uses the same names without the suffix.
    torch_cell = nn.GRUCell(3, 4)
    cell.copy_from_torch(torch_cell)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    torch.testing.assert_close(cell(x, h), torch_cell(x, h), atol=1e-6, rtol=0)


def test_gru_cell_rejects_a_two_layer_gru():
    with pytest.raises(ValueError, match="1-layer"):
        GRUCell(3, 4).copy_from_torch(nn.GRU(3, 4, num_layers=2))


def test_gru_cell_z_is_the_keep_gate():
    """Saturating z at 1 keeps the state: PyTorch's z keeps, it does not write."""
    cell = GRUCell(2, 3)
    with torch.no_grad():
        cell.bias_ih[3:6].fill_(50.0)  # rows 3..5 are z
    h = torch.randn(1, 3)
    torch.testing.assert_close(cell(torch.randn(1, 2), h), h)


# ---------------------------------------------------------------------- #
# Interest evolving recurrence
# ---------------------------------------------------------------------- #
def test_augru_attention_zero_keeps_the_state_exactly():
    cell = random_cell(4, 4, seed=3)
    x, h0 = torch.randn(5, 1, 4), torch.randn(5, 4)
    h = run_evolving(cell, x, torch.zeros(5, 1), h0, use_gate=True)
    assert torch.equal(h, h0)


def test_augru_attention_one_is_a_gru_step():
    cell = random_cell(4, 4, seed=4)
    x, h0 = torch.randn(5, 1, 4), torch.randn(5, 4)
    h = run_evolving(cell, x, torch.ones(5, 1), h0, use_gate=True)
    torch.testing.assert_close(h, cell(x[:, 0], h0), atol=1e-6, rtol=0)


def test_agru_attention_replaces_the_update_gate():
    cell = random_cell(4, 4, seed=5)
    x, h0 = torch.randn(5, 1, 4), torch.randn(5, 4)
    assert torch.equal(run_evolving(cell, x, torch.zeros(5, 1), h0, use_gate=False), h0)
    # Attention 1 writes the whole candidate n, whatever z says.
    gi = cell.input_projection(x[:, 0])
    gh = F.linear(h0, cell.weight_hh, cell.bias_hh)
    r = torch.sigmoid(gi[:, :4] + gh[:, :4])
    n = torch.tanh(gi[:, 8:] + r * gh[:, 8:])
    torch.testing.assert_close(run_evolving(cell, x, torch.ones(5, 1), h0, use_gate=False), n)
    # And a = 0.25 moves a quarter of the way from h0 to n.
    half = run_evolving(cell, x, torch.full((5, 1), 0.25), h0, use_gate=False)
    torch.testing.assert_close(half, 0.75 * h0 + 0.25 * n, atol=1e-6, rtol=0)


def _hand_checkable_cell() -> GRUCell:
    """H = 1, all weights 0: r = z = sigmoid(0) = 0.5, n = tanh(0) = 0."""
    cell = GRUCell(1, 1)
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()
    return cell


def _augru_step_as_in_authors_code(cell: GRUCell, x, h, a):
    """The authors' VecAttGRUCell: attention scales the KEEP gate,
    keep' = (1 - a) * keep; h' = keep' * h + (1 - keep') * n."""
    gi = cell.input_projection(x)
    gh = F.linear(h, cell.weight_hh, cell.bias_hh)
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    keep = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    keep = (1 - a) * keep
    return keep * h + (1 - keep) * n


def test_augru_paper_convention_differs_from_the_authors_code():
    """With h = 1, z = 0.5, n = 0 a plain GRU step gives 0.5.

    Paper (u' = a * u, u = 1 - z): a = 0 -> 1.0 (unchanged), a = 0.5 ->
    0.75, a = 1 -> 0.5 (plain step).
    Code (keep' = (1 - a) * z): a = 0 -> 0.5 (plain step), a = 0.5 -> 0.25,
    a = 1 -> 0.0 (state replaced by the candidate).
    """
    cell = _hand_checkable_cell()
    x, h0 = torch.zeros(3, 1, 1), torch.ones(3, 1)
    attention = torch.tensor([[0.0], [0.5], [1.0]])
    paper = run_evolving(cell, x, attention, h0, use_gate=True)
    code = _augru_step_as_in_authors_code(cell, x[:, 0], h0, attention)
    torch.testing.assert_close(paper, torch.tensor([[1.0], [0.75], [0.5]]))
    torch.testing.assert_close(code, torch.tensor([[0.5], [0.25], [0.0]]))
    plain = cell(x[:, 0], h0)
    torch.testing.assert_close(plain, torch.full((3, 1), 0.5))


@pytest.mark.parametrize("kind", ["augru", "agru", "aigru"])
def test_evolving_final_state_is_the_state_at_the_true_last_step(kind):
    torch.manual_seed(6)
    layer = InterestEvolving(4, kind)
    length = torch.tensor([0, 1, 3, 6])
    steps = 6
    mask = lengths_to_mask(length, steps)
    states = torch.randn(4, steps, 4)
    attention = masked_softmax(torch.randn(4, steps), mask)
    final = layer(states, attention, mask)
    assert torch.equal(final[0], torch.zeros(4)), "empty history -> initial zero state"
    for row, n in enumerate(length.tolist()):
        if n == 0:
            continue
        # The same user without any padding.
        alone = layer(states[row : row + 1, :n], attention[row : row + 1, :n], mask[row : row + 1, :n])
        torch.testing.assert_close(final[row], alone[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["augru", "agru", "aigru"])
def test_evolving_ignores_whatever_sits_in_padded_steps(kind):
    torch.manual_seed(7)
    layer = InterestEvolving(4, kind)
    length = torch.tensor([2, 5])
    mask = lengths_to_mask(length, 5)
    states = torch.randn(2, 5, 4)
    # Attention that is NOT zero on padding, to show the mask alone suffices.
    attention = torch.rand(2, 5)
    noisy = states.clone()
    noisy[~mask] = 1e3 * torch.randn(int((~mask).sum()), 4)
    noisy_attention = torch.where(mask, attention, torch.rand(2, 5))
    assert torch.equal(layer(states, attention, mask), layer(noisy, noisy_attention, mask))


def test_aigru_is_a_plain_gru_on_attention_scaled_inputs():
    torch.manual_seed(8)
    layer = InterestEvolving(3, "aigru")
    states = torch.randn(2, 4, 3)
    attention = torch.rand(2, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    gru = layer.cell.to_torch_gru()
    _, expected = gru(states * attention.unsqueeze(-1))
    torch.testing.assert_close(layer(states, attention, mask), expected[0], atol=1e-6, rtol=0)


def test_evolving_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        InterestEvolving(3, "lstm")


@pytest.mark.parametrize("use_gate", [True, False])
def test_recurrence_compiles_with_torchscript_and_agrees(use_gate):
    cell = random_cell(4, 4, seed=9)
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export; the scripted
        # loop is still what exports as an ONNX Loop with a dynamic length.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(evolve_interest)
    assert "prim::Loop" in str(scripted.graph)
    for steps in (1, 7, 13):  # one compiled function, any length
        x = torch.randn(3, steps, 4)
        scale = torch.rand(3, steps)
        h0 = torch.randn(3, 4)
        args = (cell.input_projection(x), scale, cell.weight_hh, cell.bias_hh, h0, use_gate)
        assert torch.equal(scripted(*args), evolve_interest(*args))


# ---------------------------------------------------------------------- #
# Interest extractor
# ---------------------------------------------------------------------- #
def test_extractor_states_ignore_padding_and_are_zero_there():
    torch.manual_seed(10)
    extractor = InterestExtractor(5, 3)
    length = torch.tensor([0, 2, 4])
    mask = lengths_to_mask(length, 4)
    x = torch.randn(3, 4, 5)
    noisy = x.clone()
    noisy[~mask] = 100 * torch.randn(int((~mask).sum()), 5)
    states = extractor(x, mask)
    assert torch.equal(states, extractor(noisy, mask))
    assert torch.equal(states[~mask], torch.zeros(int((~mask).sum()), 3))
    # Valid states equal the GRU run on the unpadded history.
    unpadded, _ = extractor.gru(x[1:2, :2])
    torch.testing.assert_close(states[1, :2], unpadded[0], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- #
# Attention
# ---------------------------------------------------------------------- #
def test_masked_softmax_zero_on_padding_one_on_valid_and_safe_when_empty():
    scores = torch.randn(4, 6, requires_grad=True)
    length = torch.tensor([0, 1, 4, 6])
    mask = lengths_to_mask(length, 6)
    weights = masked_softmax(scores, mask)
    assert torch.all(weights[~mask] == 0.0)
    torch.testing.assert_close(weights[1:].sum(1), torch.ones(3))
    assert torch.equal(weights[0], torch.zeros(6))
    assert weights[1, 0] == 1.0
    # Softmax over the valid part only.
    torch.testing.assert_close(weights[2, :4], torch.softmax(scores[2, :4], 0))
    (weights * torch.randn(4, 6)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[0], torch.zeros(6))


def _attention_by_concatenation(unit: AttentionUnit, query, keys):
    """The textbook form: MLP on [q, k, q - k, q * k] per step."""
    q = unit.query_proj(query).unsqueeze(1).expand_as(keys)
    hidden = unit.first(torch.cat([q, keys, q - keys, q * keys], dim=-1))
    return unit.rest(hidden).squeeze(-1)


@pytest.mark.parametrize("query_dim", [6, 4])  # projected, and not
def test_attention_split_first_layer_equals_the_concatenation(query_dim):
    torch.manual_seed(11)
    unit = AttentionUnit(query_dim, 6 if query_dim == 6 else 5, widths=(7, 3))
    key_dim = unit.key_dim
    query, keys = torch.randn(3, query_dim), torch.randn(3, 8, key_dim)
    torch.testing.assert_close(
        unit.scores(query, keys), _attention_by_concatenation(unit, query, keys), atol=1e-5, rtol=1e-5
    )
    assert isinstance(unit.query_proj, nn.Identity) == (query_dim == key_dim)


def test_attention_weights_zero_on_padding_and_sum_to_one():
    torch.manual_seed(12)
    unit = AttentionUnit(4, 4, widths=(8, 4))
    length = torch.tensor([0, 1, 3, 10])
    mask = lengths_to_mask(length, 10)
    keys = torch.randn(4, 10, 4)
    weights = unit(torch.randn(4, 4), keys, mask)
    assert weights.shape == (4, 10)
    assert torch.all(weights[~mask] == 0.0)
    torch.testing.assert_close(weights[1:].sum(1), torch.ones(3))
    assert torch.equal(weights[0], torch.zeros(10))


# ---------------------------------------------------------------------- #
# Auxiliary loss
# ---------------------------------------------------------------------- #
def _identity_inner_aux(width: int) -> AuxiliaryLoss:
    aux = AuxiliaryLoss(width, width, "inner", widths=())
    with torch.no_grad():
        aux.project.weight.copy_(torch.eye(width))
    return aux


def test_aux_loss_equals_the_paper_formula_by_hand():
    """W = I gives the paper's -log s(h_t . e_{t+1}) - log(1 - s(h_t . n_{t+1}))."""
    torch.manual_seed(13)
    aux = _identity_inner_aux(3)
    length = torch.tensor([3, 1, 2])
    mask = lengths_to_mask(length, 4)
    states, clicked, negatives = torch.randn(3, 4, 3), torch.randn(3, 4, 3), torch.randn(3, 4, 3)
    result = aux(states, clicked, negatives, mask)

    terms = {0: [], 1: [], 2: []}
    for b, n in enumerate(length.tolist()):
        for t in range(n - 1):
            pos = torch.dot(states[b, t], clicked[b, t + 1])
            neg = torch.dot(states[b, t], negatives[b, t + 1])
            terms[b].append(-math.log(torch.sigmoid(pos)) - math.log(1 - torch.sigmoid(neg)))
    all_terms = [v for row in terms.values() for v in row]
    assert result.row_pairs.tolist() == [2, 0, 1]
    torch.testing.assert_close(result.loss, torch.tensor(sum(all_terms) / 3))
    torch.testing.assert_close(result.row_loss, torch.tensor([sum(terms[b]) for b in range(3)]))


@pytest.mark.parametrize("scorer", ["inner", "mlp"])
def test_aux_loss_counts_pairs_and_is_zero_without_any(scorer):
    torch.manual_seed(14)
    aux = AuxiliaryLoss(4, 6, scorer, widths=(5, 3))
    steps = 50
    length = torch.tensor([0, 1, 2, 50])
    states = torch.randn(4, steps, 4, requires_grad=True)
    clicked, negatives = torch.randn(4, steps, 6), torch.randn(4, steps, 6)
    result = aux(states, clicked, negatives, lengths_to_mask(length, steps))
    assert int(result.row_pairs.sum()) == 50
    assert result.loss.shape == () and torch.isfinite(result.loss)

    short = torch.tensor([0, 1, 1, 0])
    empty = aux(states, clicked, negatives, lengths_to_mask(short, steps))
    assert empty.loss.item() == 0.0
    empty.loss.backward()
    assert torch.equal(states.grad, torch.zeros_like(states))


def test_aux_loss_pairs_are_state_t_with_behaviour_t_plus_1():
    torch.manual_seed(15)
    aux = _identity_inner_aux(2)
    length = torch.tensor([3, 0, 2])
    e = torch.randn(3, 4, 2)
    neg = torch.randn(3, 4, 2)
    result = aux(e, e, neg, lengths_to_mask(length, 4), return_pairs=True)
    states, positives, negatives = result.pairs
    torch.testing.assert_close(states, torch.stack([e[0, 0], e[0, 1], e[2, 0]]), rtol=0, atol=0)
    torch.testing.assert_close(positives, torch.stack([e[0, 1], e[0, 2], e[2, 1]]), rtol=0, atol=0)
    torch.testing.assert_close(negatives, torch.stack([neg[0, 1], neg[0, 2], neg[2, 1]]), rtol=0, atol=0)


def test_aux_loss_ignores_padding_contents():
    torch.manual_seed(16)
    aux = AuxiliaryLoss(3, 3, "mlp", widths=(4,))
    length = torch.tensor([2, 4])
    mask = lengths_to_mask(length, 4)
    x = torch.randn(3, 2, 4, 3)
    noisy = x.clone()
    noisy[:, ~mask] = float("inf")
    clean = aux(x[0], x[1], x[2], mask)
    dirty = aux(noisy[0], noisy[1], noisy[2], mask)
    assert torch.equal(clean.loss, dirty.loss)
    assert torch.equal(clean.row_loss, dirty.row_loss)


def test_aux_loss_rejects_an_unknown_scorer():
    with pytest.raises(ValueError, match="scorer"):
        AuxiliaryLoss(3, 3, "cosine", widths=())


# ---------------------------------------------------------------------- #
# Dice and the head
# ---------------------------------------------------------------------- #
def test_dice_matches_its_formula_in_training():
    torch.manual_seed(17)
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.5, -0.2]))
    x = torch.randn(6, 3)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + dice.eps))
    torch.testing.assert_close(dice(x), p * x + (1 - p) * dice.alpha * x)
    torch.testing.assert_close(dice.running_mean, dice.momentum * mean)
    torch.testing.assert_close(dice.running_var, (1 - dice.momentum) + dice.momentum * var)


def test_dice_works_for_a_batch_of_one_in_training_and_eval():
    dice = Dice(4)
    x = torch.randn(1, 4, requires_grad=True)
    out = dice(x)  # training: p = 0.5 since x equals its own batch mean
    torch.testing.assert_close(out, 0.5 * x)  # alpha starts at 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    dice.eval()
    assert torch.isfinite(dice(x)).all()


def test_dice_in_eval_mode_treats_rows_independently():
    torch.manual_seed(18)
    dice = Dice(3)
    dice(torch.randn(32, 3) * 2 + 1)  # move the running statistics
    dice.eval()
    x = torch.randn(5, 3)
    torch.testing.assert_close(dice(x)[2:3], dice(x[2:3]), atol=0, rtol=0)


@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_mlp_head_gives_one_logit_per_row_even_for_one_row(activation):
    head = MLP(7, (5, 3), activation, dropout=0.1)
    assert head(torch.randn(1, 7)).shape == (1,)
    assert head(torch.randn(4, 7)).shape == (4,)
    head.eval()
    assert head(torch.randn(1, 7)).shape == (1,)
    widths = [m.out_features for m in head.modules() if isinstance(m, nn.Linear)]
    assert widths == [5, 3, 1]


def test_mlp_without_hidden_layers_is_logistic_regression():
    head = MLP(7, (), "dice", dropout=0.0)
    assert [type(m) for m in head.layers] == [nn.Linear]


def test_make_activation_rejects_unknown_names():
    assert isinstance(make_activation("prelu", 3), nn.PReLU)
    with pytest.raises(ValueError, match="activation"):
        make_activation("relu6", 3)
