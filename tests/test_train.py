"""Training and checkpoints: bad settings, diverging runs, damaged files and resuming."""

from __future__ import annotations

import re

import pytest
import torch

from dien_tutorial.config import DIENConfig
from dien_tutorial.data.samples import build_samples
from dien_tutorial.data.simulate import SimulationConfig, simulate
from dien_tutorial.model import build_model
from dien_tutorial.train import (
    TrainConfig,
    TrainingDiverged,
    evaluate,
    fit,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def samples():
    """About 4,200 training and 600 validation samples of the tiny simulator (17 batches of 256)."""
    return build_samples(simulate(SimulationConfig.tiny(seed=5)).log, max_len=20, seed=5)


def _config(samples, **overrides) -> DIENConfig:
    return DIENConfig.tiny(n_items=len(samples.item_vocab), n_cates=len(samples.cate_vocab), **overrides)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _clone(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------- #
# TrainConfig
# ---------------------------------------------------------------------- #
@pytest.mark.parametrize("field, value, message", [
    ("lr", float("inf"), "TrainConfig.lr must be a finite number > 0, got inf"),
    ("lr", float("nan"), "TrainConfig.lr must be a finite number > 0, got nan"),
    ("lr", 0.0, "TrainConfig.lr must be a finite number > 0, got 0.0"),
    ("lr", "0.1", "TrainConfig.lr must be a finite number > 0, got '0.1'"),
    ("weight_decay", float("inf"), "TrainConfig.weight_decay must be a finite number >= 0, got inf"),
    ("weight_decay", -1e-4, "TrainConfig.weight_decay must be a finite number >= 0, got -0.0001"),
    ("max_grad_norm", float("nan"), "TrainConfig.max_grad_norm must be a finite number > 0, got nan"),
    ("max_grad_norm", 0.0, "TrainConfig.max_grad_norm must be a finite number > 0, got 0.0"),
])
def test_train_config_refuses_non_finite_or_out_of_range_numbers_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{field: value})


def test_train_config_accepts_finite_values():
    config = TrainConfig(lr=1, weight_decay=0.0, max_grad_norm=5.0)
    assert (config.lr, config.weight_decay, config.max_grad_norm) == (1, 0.0, 5.0)


# ---------------------------------------------------------------------- #
# A training run that diverges
# ---------------------------------------------------------------------- #
def test_fit_that_diverges_names_epoch_step_and_lr_and_writes_no_checkpoint(samples, tmp_path):
    torch.manual_seed(0)
    model = build_model("dien", _config(samples))
    initial = _clone(model)
    with pytest.raises(TrainingDiverged) as caught:
        fit(model, samples.dataset("train"), samples.dataset("valid"),
            TrainConfig(epochs=2, lr=1e4, progress=False), checkpoint=tmp_path / "model.pt", log=None)
    text = str(caught.value)
    assert text.startswith("training diverged in epoch 0, step 3 of 17: the training loss became NaN")
    assert "Try a smaller learning rate than lr = 10000 (e.g. 1000)" in text
    assert isinstance(caught.value, ValueError)  # the command line reports it in one line
    assert list(tmp_path.iterdir()) == []  # neither model.pt nor model.pt.last
    assert _same_weights(model.state_dict(), initial)  # back to the best (here: initial) weights


def test_fit_sees_weights_broken_by_the_last_step_of_an_epoch(samples, monkeypatch):
    """The loss of a step is computed before its update: the last update is checked on the weights."""
    import dien_tutorial.train as train

    real_step = train.train_step
    steps = []

    def step_then_break_a_weight(model, opt, batch, alpha, max_grad_norm=None):
        out = real_step(model, opt, batch, alpha, max_grad_norm)
        steps.append(1)
        if len(steps) == 17:  # the epoch's last step
            with torch.no_grad():
                model.embedding.item.weight[2, 1] = float("inf")
        return out

    monkeypatch.setattr(train, "train_step", step_then_break_a_weight)
    model = build_model("din", _config(samples))
    with pytest.raises(TrainingDiverged, match=re.escape(
            "training diverged in epoch 0, after its last step (17): the weight 'embedding.item.weight' "
            "holds NaN or inf. Try a smaller learning rate than lr = 0.001")):
        fit(model, samples.dataset("train"), samples.dataset("valid"), TrainConfig(epochs=1, progress=False),
            model_name="din", log=None)
    assert bool(torch.isfinite(model.embedding.item.weight).all())


def test_evaluate_refuses_nan_predictions_instead_of_failing_in_scikit_learn(samples):
    model = build_model("din", _config(samples))
    with torch.no_grad():
        model.head.layers[0].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the model predicts 600 NaN or infinite click probabilities of 600: "
                                         r"its weights are not finite"):
        evaluate(model, samples.dataset("valid"))


# ---------------------------------------------------------------------- #
# Damaged checkpoints
# ---------------------------------------------------------------------- #
def _tiny_dien() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("dien", DIENConfig.tiny())


def _save_raw(path, model, **fields):
    """A checkpoint dict as save_checkpoint writes it, with some fields replaced."""
    state = {"format": 1, "model_name": "dien", "model_config": model.config.to_dict(),
             "model_state": _clone(model), "optimizer_state": None, "extra": {}}
    state.update(fields)
    torch.save(state, path)
    return path


def test_a_good_checkpoint_still_loads(tmp_path):
    model = _tiny_dien()
    path = save_checkpoint(tmp_path / "model.pt", model, "dien", model.config.to_dict())
    loaded, state = model_from_checkpoint(path)
    assert _same_weights(loaded.state_dict(), model.state_dict()) and not loaded.training
    assert state["model_name"] == "dien"


def test_checkpoint_with_a_nan_weight_is_refused_naming_file_and_tensor(tmp_path):
    model = _tiny_dien()
    weights = _clone(model)
    weights["embedding.item.weight"][5, 0] = float("nan")
    path = _save_raw(tmp_path / "model.pt", model, model_state=weights)
    message = (f"{path}: model_state['embedding.item.weight'] holds 1 NaN or infinite value(s) of "
               f"{weights['embedding.item.weight'].numel():,}: the training diverged or the file is damaged")
    with pytest.raises(ValueError, match=re.escape(message)):
        model_from_checkpoint(path)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_checkpoint(path)  # the one reading function: fit's resume gets the check too


def test_checkpoint_with_a_negative_running_variance_is_refused_naming_file_and_buffer(tmp_path):
    model = _tiny_dien()
    weights = _clone(model)
    key = next(k for k in weights if k.endswith("running_var"))
    weights[key][1] = -1.0
    path = _save_raw(tmp_path / "model.pt", model, model_state=weights)
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: model_state[{key!r}] holds 1 negative value(s) of {weights[key].numel()} (smallest -1): "
            "a running variance cannot be negative")):
        model_from_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    ({"model_config": "item_dim"},
     "the field 'model_config' is not a valid config: DIENConfig.item_dim must be a positive int, got '4'"),
    ({"model_name": "din"},
     "the weights do not fit model 'din': model_state has 9 weight(s) model 'din' does not have, "
     "first 'extractor.gru.weight_ih_l0'"),
    ({"model_name": "foo"},
     "the field 'model_name' does not fit: unknown model 'foo'"),
], ids=["config-invalid", "weights-of-another-model", "unknown-name"])
def test_other_checkpoint_errors_name_the_file(change, message, tmp_path):
    model = _tiny_dien()
    fields = dict(change)
    if fields.get("model_config") == "item_dim":
        fields["model_config"] = {**model.config.to_dict(), "item_dim": "4"}
    path = _save_raw(tmp_path / "model.pt", model, **fields)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        model_from_checkpoint(path)


def test_checkpoint_with_an_absurd_vocabulary_names_file_and_field_without_allocating(tmp_path, monkeypatch):
    model = _tiny_dien()
    path = _save_raw(tmp_path / "model.pt", model, model_config={**model.config.to_dict(), "n_items": 2**40})
    import dien_tutorial.model

    real_build = dien_tutorial.model.build_model

    def build_on_meta_only(name, cfg):
        assert torch.empty(0).device.type == "meta", "a model was built on a real device before the check"
        return real_build(name, cfg)

    monkeypatch.setattr(dien_tutorial.model, "build_model", build_on_meta_only)
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: the weights do not fit the config: model_state['embedding.item.weight'] has shape "
            f"[{model.config.n_items:,}, 4], but model_config asks for [1,099,511,627,776, 4]; axis 0 follows "
            "model_config's n_items = 1,099,511,627,776")):
        model_from_checkpoint(path)


# ---------------------------------------------------------------------- #
# Resuming
# ---------------------------------------------------------------------- #
def _one_epoch(samples, folder, **config):
    """Train one epoch of an AUGRU DIEN into ``folder/model.pt`` (and ``model.pt.last``)."""
    torch.manual_seed(0)
    model = build_model("dien", _config(samples, evolving="augru", **config))
    fit(model, samples.dataset("train"), samples.dataset("valid"), TrainConfig(epochs=1, progress=False),
        checkpoint=folder / "model.pt", log=None)
    return folder / "model.pt"


def _resume(samples, ckpt, model, model_name="dien"):
    return fit(model, samples.dataset("train"), samples.dataset("valid"),
               TrainConfig(epochs=2, patience=5, progress=False), checkpoint=ckpt, model_name=model_name,
               resume=True, log=None)


def test_resume_with_the_same_model_continues_at_the_next_epoch(samples, tmp_path):
    ckpt = _one_epoch(samples, tmp_path)
    model = build_model("dien", _config(samples, evolving="augru"))
    history = _resume(samples, ckpt, model)
    assert [e["epoch"] for e in history.epochs] == [0, 1]
    assert torch.load(f"{ckpt}.last", weights_only=True)["extra"]["epoch"] == 1


def test_resume_from_another_variant_is_refused_naming_file_and_field(samples, tmp_path):
    ckpt = _one_epoch(samples, tmp_path)
    before = (tmp_path / "model.pt.last").read_bytes()
    model = build_model("dien", _config(samples, evolving="agru"))  # same weight shapes as AUGRU
    initial = _clone(model)
    with pytest.raises(ValueError, match=re.escape(
            f"{ckpt}.last: cannot resume: the checkpoint was written for another configuration: "
            "model_config.evolving is 'augru' there, 'agru' here")):
        _resume(samples, ckpt, model)
    assert _same_weights(model.state_dict(), initial)  # nothing was loaded
    assert (tmp_path / "model.pt.last").read_bytes() == before  # nor overwritten


def test_resume_from_a_config_written_with_tuples_continues(samples, tmp_path):
    ckpt = _one_epoch(samples, tmp_path)
    state = torch.load(f"{ckpt}.last", weights_only=True)
    config = state["model_config"]
    state["model_config"] = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    assert any(isinstance(v, tuple) for v in state["model_config"].values())  # e.g. attention_widths
    torch.save(state, f"{ckpt}.last")
    model = build_model("dien", _config(samples, evolving="augru"))
    history = _resume(samples, ckpt, model)
    assert [e["epoch"] for e in history.epochs] == [0, 1]


def test_resume_under_another_model_name_is_refused(samples, tmp_path):
    ckpt = _one_epoch(samples, tmp_path)
    model = build_model("dien", _config(samples, evolving="augru"))
    with pytest.raises(ValueError, match=re.escape(
            f"{ckpt}.last: cannot resume: the checkpoint was written for model_name 'dien', "
            "this run trains 'dien_no_aux'")):
        _resume(samples, ckpt, model, model_name="dien_no_aux")


@pytest.mark.parametrize("extra, message", [
    ({}, "the field extra['epoch'] (the last finished epoch) is missing"),
    ({"epoch": "0"}, "the field extra['epoch'] (the last finished epoch) must be an int >= 0, got '0'"),
    (None, "the field 'extra' is missing or not a dict (got NoneType)"),
], ids=["no-epoch", "epoch-str", "no-extra"])
def test_resume_from_a_last_file_without_its_epoch_names_file_and_field(extra, message, samples, tmp_path):
    ckpt = _one_epoch(samples, tmp_path)
    state = torch.load(f"{ckpt}.last", weights_only=True)
    if extra is None:
        del state["extra"]
    else:
        state["extra"] = extra
    torch.save(state, f"{ckpt}.last")
    model = build_model("dien", _config(samples, evolving="augru"))
    with pytest.raises(ValueError, match=re.escape(f"{ckpt}.last: cannot resume: {message}")):
        _resume(samples, ckpt, model)


def test_resume_from_weights_of_another_shape_names_the_file(samples, tmp_path):
    ckpt = _one_epoch(samples, tmp_path)
    state = torch.load(f"{ckpt}.last", weights_only=True)
    state["model_state"]["attention.first.bias"] = torch.zeros(3)
    torch.save(state, f"{ckpt}.last")
    model = build_model("dien", _config(samples, evolving="augru"))
    want = tuple(model.state_dict()["attention.first.bias"].shape)
    with pytest.raises(ValueError, match=re.escape(
            f"{ckpt}.last: the weights do not fit the config: model_state['attention.first.bias'] has shape [3], "
            f"but model_config asks for [{want[0]}]")):
        _resume(samples, ckpt, model)
