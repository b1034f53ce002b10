"""Tests of the config, the full model, the baselines and the package source."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from dien_tutorial.config import DIENConfig
from dien_tutorial.model import DIEN, MODEL_NAMES, DIENOutput, build_model

PACKAGE = Path(__file__).resolve().parents[1] / "dien_tutorial"
EVOLVING = ("augru", "agru", "aigru")
PAD = 0
FIRST_REAL_ID = 2


def make_batch(config: DIENConfig, lengths: list[int], steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch that follows the data pipeline's contract: right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    length = torch.tensor(lengths, dtype=torch.int64)
    valid = torch.arange(steps) < length.unsqueeze(1)

    def ids(vocab: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(FIRST_REAL_ID, vocab, shape, generator=g)

    return {
        "item": ids(config.n_items, (batch,)),
        "cate": ids(config.n_cates, (batch,)),
        "hist_item": ids(config.n_items, (batch, steps)) * valid,
        "hist_cate": ids(config.n_cates, (batch, steps)) * valid,
        "length": length,
        "neg_hist_item": ids(config.n_items, (batch, steps)) * valid,
        "neg_hist_cate": ids(config.n_cates, (batch, steps)) * valid,
    }


def repad(batch: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    """The same users padded (or cut back) to ``steps`` history slots."""
    out = {}
    for key, value in batch.items():
        if value.dim() == 2:
            width = value.shape[1]
            if steps <= width:
                value = value[:, :steps]
            else:
                value = torch.cat([value, value.new_full((value.shape[0], steps - width), PAD)], 1)
        out[key] = value
    return out


def concat(*batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def fill_padding_row_with_noise(model: DIEN) -> None:
    """Overwrite row 0 of both tables, so only masking can hide padding."""
    with torch.no_grad():
        model.embedding.item.weight[PAD].normal_(0.0, 10.0)
        model.embedding.cate.weight[PAD].normal_(0.0, 10.0)


def tiny_model(name: str = "dien", seed: int = 0, **overrides) -> DIEN:
    torch.manual_seed(seed)
    return build_model(name, DIENConfig.tiny(**overrides))


# ---------------------------------------------------------------------- #
# Config
# ---------------------------------------------------------------------- #
def test_paper_preset_has_the_paper_widths():
    config = DIENConfig.paper(n_items=1000, n_cates=50)
    assert (config.item_dim, config.cate_dim, config.hidden) == (18, 18, 36)
    assert config.behaviour_dim == 36
    assert config.mlp_widths == (200, 80)
    assert config.attention_widths == (80, 40)
    assert config.alpha == 1.0 and config.use_aux and config.evolving == "augru"
    assert config.activation == "dice"
    assert config == DIENConfig(n_items=1000, n_cates=50)


def test_tiny_preset_accepts_overrides():
    config = DIENConfig.tiny(evolving="agru", hidden=5)
    assert config.evolving == "agru" and config.hidden == 5 and config.item_dim == 4


def test_config_round_trips_through_plain_types_and_a_safe_checkpoint():
    config = DIENConfig.tiny(aux_scorer="mlp", alpha=0.5, dropout=0.2)
    data = config.to_dict()

    def plain(value) -> bool:
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (int, float, str, bool)

    assert all(plain(v) for v in data.values())
    assert DIENConfig.from_dict(data) == config

    model = build_model("dien", config)
    buffer = io.BytesIO()
    torch.save({"config": data, "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    again = DIEN(DIENConfig.from_dict(loaded["config"]))
    again.load_state_dict(loaded["state_dict"])
    assert again.config == config


def test_int_alpha_is_stored_as_float():
    assert type(DIENConfig.tiny(alpha=2).to_dict()["alpha"]) is float


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_items", 2),
        ("n_cates", "8"),
        ("item_dim", 0),
        ("hidden", True),
        ("attention_widths", ()),
        ("mlp_widths", (200, -1)),
        ("activation", "relu"),
        ("evolving", "lstm"),
        ("use_aux", 1),
        ("alpha", -1.0),
        ("alpha", float("nan")),
        ("aux_scorer", "cosine"),
        ("dropout", 1.0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DIENConfig\.{field}\b"):
        DIENConfig.tiny(**{field: value})


def test_config_rejects_aux_without_an_extractor():
    with pytest.raises(ValueError, match=r"DIENConfig\.use_aux"):
        DIENConfig.tiny(evolving="none", use_aux=True)


def test_config_rejects_an_mlp_aux_scorer_without_widths():
    with pytest.raises(ValueError, match=r"DIENConfig\.aux_widths"):
        DIENConfig.tiny(aux_scorer="mlp", aux_widths=())


def test_from_dict_names_unknown_and_missing_fields():
    data = DIENConfig.tiny().to_dict()
    with pytest.raises(ValueError, match="hiden"):
        DIENConfig.from_dict({**data, "hiden": 3})
    del data["n_items"]
    with pytest.raises(ValueError, match=r"DIENConfig\.n_items"):
        DIENConfig.from_dict(data)


# ---------------------------------------------------------------------- #
# Model factory
# ---------------------------------------------------------------------- #
def test_build_model_picks_the_parts():
    config = DIENConfig.tiny()
    dien = build_model("dien", config)
    assert dien.extractor is not None and dien.evolving is not None and dien.aux is not None
    no_aux = build_model("dien_no_aux", config)
    assert no_aux.evolving is not None and no_aux.aux is None and not no_aux.config.use_aux
    gru_att = build_model("gru_att", config)
    assert gru_att.extractor is not None and gru_att.evolving is None and gru_att.aux is None
    din = build_model("din", config)
    assert din.extractor is None and din.evolving is None and din.aux is None
    assert din.config.evolving == "none"
    for model in (dien, no_aux, gru_att, din):
        for table in (model.embedding.item, model.embedding.cate):
            assert table.padding_idx == 0


def test_build_model_rejects_unknown_names_and_baseline_configs_for_dien():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transformer", DIENConfig.tiny())
    with pytest.raises(ValueError, match=r"DIENConfig\.evolving"):
        build_model("dien", DIENConfig.tiny(evolving="gru_att", use_aux=False))


# ---------------------------------------------------------------------- #
# Shapes
# ---------------------------------------------------------------------- #
MODEL_VARIANTS = [("dien", kind) for kind in EVOLVING] + [
    ("dien_no_aux", "augru"),
    ("gru_att", "augru"),
    ("din", "augru"),
]


@pytest.mark.parametrize(("name", "evolving"), MODEL_VARIANTS)
@pytest.mark.parametrize("lengths", [[1], [5], [50], [1, 5, 50]], ids=["B1-L1", "B1-L5", "B1-L50", "B3"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_shapes(name, evolving, lengths, training):
    model = tiny_model(name, evolving=evolving)
    model.train(training)
    batch = make_batch(model.config, lengths, steps=50)
    out = model(**batch)
    size = len(lengths)
    assert isinstance(out, DIENOutput)
    assert out.prob.shape == (size,) and out.logit.shape == (size,)
    assert out.attention.shape == (size, 50)
    assert out.aux_loss.shape == ()
    assert out.aux_row_loss.shape == (size,) and out.aux_row_pairs.shape == (size,)
    assert torch.all((out.prob > 0) & (out.prob < 1))
    torch.testing.assert_close(out.prob, torch.sigmoid(out.logit))
    expected_pairs = sum(max(n - 1, 0) for n in lengths) if name == "dien" else 0
    assert int(out.aux_row_pairs.sum()) == expected_pairs
    assert (out.aux_loss > 0).item() == (expected_pairs > 0)


def test_no_negatives_means_no_aux_loss_and_half_given_is_an_error():
    model = tiny_model("dien")
    batch = make_batch(model.config, [4, 6], steps=8)
    plain = {k: v for k, v in batch.items() if not k.startswith("neg_")}
    assert model(**plain).aux_loss.item() == 0.0
    with pytest.raises(ValueError, match="neg_hist"):
        model(**plain, neg_hist_item=batch["neg_hist_item"])


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("lengths", "shown"), [([3, 99], "from 3 to 99"), ([-4, 2], "from -4 to 2"),
                                                ([9, 0], "from 0 to 9")])
def test_lengths_outside_the_history_width_are_an_error(padded, lengths, shown):
    model = tiny_model("dien")
    batch = make_batch(model.config, [3, 2], steps=8)
    batch["length"] = torch.tensor(lengths)
    forward = model.forward_padded if padded else model
    with pytest.raises(ValueError, match=rf"model input 'length' must be in 0\.\.T = 0\.\.8 .*got values {shown}$"):
        forward(**batch)


@pytest.mark.parametrize("padded", [False, True])
def test_inputs_of_the_wrong_dtype_or_shape_are_an_error(padded):
    model = tiny_model("dien")
    batch = make_batch(model.config, [3, 2], steps=8)
    forward = model.forward_padded if padded else model
    cases = [
        ({"length": torch.tensor([2.5, 2.0])}, "model input 'length' must hold int64 or int32 integers, got dtype torch.float32"),
        ({"hist_cate": batch["hist_cate"][:, :5]},
         r"model input 'hist_cate' must have the shape of 'hist_item', \[2, 8\]; got \[2, 5\]"),
        ({"neg_hist_item": batch["neg_hist_item"][:1]},
         r"model input 'neg_hist_item' must have the shape of 'hist_item', \[2, 8\]; got \[1, 8\]"),
        ({"item": batch["item"][:1], "cate": batch["cate"][:1]},
         r"model input 'hist_item' must be \[B, T\] with B = 1 \(the batch of 'item'\); got \[2, 8\]"),
        ({"cate": batch["cate"].unsqueeze(1)}, r"'item' and 'cate' must both be \[B\]; got \[2\] and \[2, 1\]"),
        ({"length": batch["length"][:1]}, r"model input 'length' must be \[B\] with B = 2; got \[1\]"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            forward(**{**batch, **change})


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("field", "value", "table"), [
    ("item", 10**6, "n_items"), ("cate", -1, "n_cates"), ("hist_cate", 999, "n_cates"),
    ("neg_hist_item", -3, "n_items")])
def test_an_id_outside_its_table_is_an_error_naming_the_input(padded, field, value, table):
    model = tiny_model("dien")
    batch = make_batch(model.config, [3, 2], steps=8)
    batch[field] = batch[field].clone()
    batch[field].view(-1)[0] = value  # the first slot: valid for every field (the first user has 3 steps)
    size = getattr(model.config, table)
    looked_up = batch[field]
    if not padded and looked_up.dim() == 2:  # forward looks up the valid slots only, and blames only them
        looked_up = looked_up[torch.arange(8) < batch["length"].unsqueeze(1)]
    low, high = int(looked_up.min()), int(looked_up.max())
    assert low < 0 or high >= size
    forward = model.forward_padded if padded else model
    message = (f"model input '{field}' holds ids from {low} to {high}, outside the table's 0..{size - 1} "
               f"(DIENConfig.{table} = {size})")
    with pytest.raises(ValueError, match=re.escape(message)):
        forward(**batch)


# ---------------------------------------------------------------------- #
# Padding and batching do not change a user's result
# ---------------------------------------------------------------------- #
@pytest.mark.parametrize(("name", "evolving"), MODEL_VARIANTS)
def test_one_user_is_unaffected_by_padding_width_and_batch_neighbours(name, evolving):
    """Predictions are compared in eval mode: in training, Dice normalises
    with the batch's own statistics, which (by design, like batch norm)
    makes a row's output depend on its neighbours. The auxiliary loss has
    no batch statistics, so its per-user part is compared in both modes."""
    model = tiny_model(name, evolving=evolving, seed=1)
    fill_padding_row_with_noise(model)
    user = make_batch(model.config, [3], steps=3, seed=2)
    others = make_batch(model.config, [50] * 63, steps=50, seed=3)
    cases = {
        "pad 10": repad(user, 10),
        "pad 50": repad(user, 50),
        "pad 50, first of 64": concat(repad(user, 50), others),
        "pad 50, last of 64": concat(others, repad(user, 50)),
    }
    position = {"pad 10": 0, "pad 50": 0, "pad 50, first of 64": 0, "pad 50, last of 64": 63}

    model.eval()
    with torch.no_grad():
        probs = {k: model(**b).prob[position[k]] for k, b in cases.items()}
    for key, prob in probs.items():
        torch.testing.assert_close(prob, probs["pad 10"], atol=1e-5, rtol=0, msg=key)

    if name != "dien":
        return
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            outs = {k: model(**b) for k, b in cases.items()}
        alone = outs["pad 10"].aux_loss
        assert outs["pad 10"].aux_row_pairs[0] == 2
        for key, out in outs.items():
            row = position[key]
            assert out.aux_row_pairs[row] == 2
            per_pair = out.aux_row_loss[row] / out.aux_row_pairs[row]
            torch.testing.assert_close(per_pair, alone, atol=1e-5, rtol=0, msg=key)
        torch.testing.assert_close(outs["pad 50"].aux_loss, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_history_inside_the_length_matters_padding_does_not(name):
    model = tiny_model(name, seed=4)
    model.eval()
    batch = make_batch(model.config, [4, 2], steps=6, seed=5)
    with torch.no_grad():
        base = model(**batch).prob

        inside = {k: v.clone() for k, v in batch.items()}
        inside["hist_item"][0, 2] = FIRST_REAL_ID + (inside["hist_item"][0, 2] - FIRST_REAL_ID + 1) % (
            model.config.n_items - FIRST_REAL_ID
        )
        changed = model(**inside).prob
        assert not torch.isclose(changed[0], base[0], atol=1e-7, rtol=0)
        assert torch.equal(changed[1], base[1])

        padding = {k: v.clone() for k, v in batch.items()}
        padding["hist_item"][0, 5] = 7  # step 5 > length 4
        padding["hist_cate"][1, 3] = 3  # step 3 > length 2
        padding["neg_hist_item"][1, 4] = 9
        assert torch.equal(model(**padding).prob, base)


# ---------------------------------------------------------------------- #
# Edge lengths and the auxiliary loss
# ---------------------------------------------------------------------- #
@pytest.mark.parametrize("evolving", EVOLVING)
def test_lengths_zero_one_two_fifty_train_finitely_with_fifty_aux_pairs(evolving):
    model = tiny_model("dien", evolving=evolving, seed=6)
    model.train()
    batch = make_batch(model.config, [0, 1, 2, 50], steps=50, seed=7)
    out = model(**batch)
    assert int(out.aux_row_pairs.sum()) == 50
    assert out.aux_row_pairs.tolist() == [0, 0, 1, 49]
    assert torch.isfinite(out.prob).all() and torch.isfinite(out.aux_loss)
    assert torch.equal(out.attention[0], torch.zeros(50))
    loss = model.loss(out, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_aux_loss_is_exactly_zero_when_no_history_is_longer_than_one():
    model = tiny_model("dien", seed=8)
    model.train()
    out = model(**make_batch(model.config, [0, 1, 1, 0], steps=50, seed=9))
    assert out.aux_loss.item() == 0.0
    assert int(out.aux_row_pairs.sum()) == 0
    model.loss(out, torch.zeros(4)).backward()


class IdentityExtractor(nn.Module):
    """Stand-in extractor: state t is the embedding of behaviour t."""

    def forward(self, behaviours: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return behaviours


def test_with_an_identity_extractor_aux_positives_are_consecutive_behaviours():
    config = DIENConfig.tiny(hidden=8)  # = E, so embeddings can stand in for states
    torch.manual_seed(10)
    model = build_model("dien", config)
    model.extractor = IdentityExtractor()
    lengths = [4, 0, 1, 3]
    batch = make_batch(config, lengths, steps=6, seed=11)
    result = model.auxiliary_loss(
        batch["hist_item"],
        batch["hist_cate"],
        batch["length"],
        batch["neg_hist_item"],
        batch["neg_hist_cate"],
        return_pairs=True,
    )
    e = model.embedding(batch["hist_item"], batch["hist_cate"])
    neg = model.embedding(batch["neg_hist_item"], batch["neg_hist_cate"])
    states, positives, negatives = result.pairs
    expected_states, expected_pos, expected_neg = [], [], []
    for b, n in enumerate(lengths):
        for t in range(n - 1):  # (e_1, e_2), ..., (e_{L-1}, e_L)
            expected_states.append(e[b, t])
            expected_pos.append(e[b, t + 1])
            expected_neg.append(neg[b, t + 1])
    assert states.shape == (5, 8)
    assert torch.equal(states, torch.stack(expected_states))
    assert torch.equal(positives, torch.stack(expected_pos))
    assert torch.equal(negatives, torch.stack(expected_neg))
    # forward() computes the same loss.
    torch.testing.assert_close(model(**batch).aux_loss, result.loss)


def test_auxiliary_loss_method_needs_an_aux_model():
    model = tiny_model("dien_no_aux")
    batch = make_batch(model.config, [3], steps=4)
    with pytest.raises(ValueError, match="use_aux"):
        model.auxiliary_loss(
            batch["hist_item"],
            batch["hist_cate"],
            batch["length"],
            batch["neg_hist_item"],
            batch["neg_hist_cate"],
        )


def test_loss_is_click_cross_entropy_plus_alpha_times_aux():
    model = tiny_model("dien", alpha=0.3, seed=12)
    batch = make_batch(model.config, [5, 2, 7], steps=8, seed=13)
    label = torch.tensor([1, 0, 1])
    out = model(**batch)
    click = torch.nn.functional.binary_cross_entropy(out.prob, label.float())
    torch.testing.assert_close(model.loss(out, label), click + 0.3 * out.aux_loss)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_few_adam_steps_fit_a_small_batch(name):
    model = tiny_model(name, seed=14)
    model.train()
    batch = make_batch(model.config, [3, 8, 5, 1, 8, 6, 2, 7], steps=8, seed=15)
    label = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        out = model(**batch)
        loss = model.loss(out, label)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------- #
# Package source
# ---------------------------------------------------------------------- #
FORBIDDEN = {
    "eval/exec call": re.compile(r"(^|[^.\w])(eval|exec)\("),
    "pickle load": re.compile(r"pickle\.loads?\("),
    "unsafe torch.load": re.compile(r"weights_only\s*=\s*False"),
    "dynamic import": re.compile(r"__import__\("),
}


def test_package_source_has_no_code_execution_or_unsafe_loading():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, "package not found"
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    hits.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_forbidden_patterns_catch_what_they_should():
    pattern = FORBIDDEN["eval/exec call"]
    assert pattern.search("x = eval(s)") and pattern.search("exec(code)")
    assert not pattern.search("model.eval()") and not pattern.search("def evaluate(x)")
    assert FORBIDDEN["unsafe torch.load"].search("torch.load(p, weights_only = False)")
    assert dataclasses.is_dataclass(DIENConfig)
