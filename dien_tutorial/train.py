"""Training and evaluation: ``fit``, ``evaluate``, metrics and checkpoints.

The loss of one batch is

    total = main + alpha * aux

where ``main`` is the binary cross-entropy of the click prediction and
``aux`` the auxiliary loss of the interest extractor (0 for models without
it). Each term is logged on its own, and the logged total is exactly that
sum of the logged terms.

Metrics come from scikit-learn: AUC, logloss, and GAUC, the AUC of each
user's impressions weighted by the number of impressions, as in the DIN
paper. Users whose impressions are all of one label have no AUC and are left
out of GAUC (and counted).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score
from tqdm.auto import tqdm

from dien_tutorial import din_step
from dien_tutorial.data.samples import Batch, DienDataset


@dataclass
class TrainConfig:
    """How to train (the model's shape lives in ``DIENConfig``)."""

    epochs: int = 5  # upper bound; early stopping usually ends sooner
    batch_size: int = 256
    eval_batch_size: int = 4096
    lr: float = 1e-3  # Adam
    weight_decay: float = 0.0
    patience: int = 1  # epochs without a better validation AUC before stopping
    seed: int = 0  # model initialisation and shuffling
    progress: bool = True  # tqdm bar per epoch
    max_grad_norm: float | None = None  # clip gradients if set

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        # ``not x > 0`` is False for inf, so finiteness is checked on its own:
        # an infinite learning rate turns every weight into NaN at the first step.
        _check_number("lr", self.lr, minimum=0.0, inclusive=False)
        _check_number("weight_decay", self.weight_decay, minimum=0.0, inclusive=True)
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, minimum=0.0, inclusive=False)
        if self.patience < 0:
            raise ValueError(f"TrainConfig.patience must be >= 0, got {self.patience}")


def _check_number(name: str, value: object, minimum: float, inclusive: bool) -> None:
    """Raise a ValueError naming ``TrainConfig.<name>`` unless ``value`` is finite and above ``minimum``."""
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"TrainConfig.{name} must be a finite number {bound}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        raise ValueError(f"TrainConfig.{name} must be a finite number {bound}, got {value!r}")


class TrainingDiverged(ValueError):
    """The training loss or the weights stopped being finite (NaN or inf)."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and PyTorch's generators."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def gauc(user: np.ndarray, label: np.ndarray, score: np.ndarray) -> tuple[float, int]:
    """Group AUC: per-user AUC weighted by the user's number of impressions.

    Each user's AUC is the Mann-Whitney statistic of their impressions,
    computed for all users at once from ranks within the user (ties count
    one half, as in ``sklearn.metrics.roc_auc_score``, which a test checks
    user by user).

    Returns:
        ``(gauc, users_used)``; users whose labels are all equal are skipped.
        ``gauc`` is NaN when no user has both labels.
    """
    frame = pd.DataFrame({"user": np.asarray(user), "label": np.asarray(label) > 0.5,
                          "score": np.asarray(score, dtype=np.float64)})
    # Rank of each score among the same user's scores; ties get the mean rank.
    frame["rank"] = frame.groupby("user", sort=False)["score"].rank(method="average")
    frame["pos_rank"] = frame["rank"].where(frame["label"], 0.0)
    per_user = frame.groupby("user", sort=False).agg(
        n=("label", "size"), pos=("label", "sum"), pos_rank=("pos_rank", "sum"))
    neg = per_user["n"] - per_user["pos"]
    both = (per_user["pos"] > 0) & (neg > 0)
    p, q = per_user["pos"][both], neg[both]
    auc = (per_user["pos_rank"][both] - p * (p + 1) / 2) / (p * q)
    weight = per_user["n"][both]
    used = int(both.sum())
    return (float((auc * weight).sum() / weight.sum()) if used else float("nan")), used


def metrics(user: np.ndarray, label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """AUC, GAUC and logloss of predicted click probabilities."""
    g, used = gauc(user, label, prob)
    return {
        "auc": float(roc_auc_score(label, prob)),
        "gauc": float(g),
        "logloss": float(log_loss(label, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "samples": int(len(label)),
        "gauc_users": int(used),
    }


def model_inputs(batch: Batch, with_negatives: bool) -> dict[str, torch.Tensor]:
    """The model's keyword arguments from a batch."""
    kw = {
        "item": batch.item,
        "cate": batch.cate,
        "hist_item": batch.hist_item,
        "hist_cate": batch.hist_cate,
        "length": batch.length,
    }
    if with_negatives:
        kw["neg_hist_item"] = batch.neg_hist_item
        kw["neg_hist_cate"] = batch.neg_hist_cate
    return kw


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: DienDataset, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities for every sample of ``dataset``, in order: [N]."""
    was_training = model.training
    model.eval()
    out = [model(**model_inputs(b, False)).prob for b in dataset.batches(batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def evaluate(model: torch.nn.Module, dataset: DienDataset, batch_size: int = 4096) -> dict[str, float]:
    """AUC, GAUC and logloss of ``model`` on one split.

    Raises:
        ValueError: the model predicts NaN or infinite probabilities (its
            weights are not finite), which no metric can score.
    """
    prob = predict(model, dataset, batch_size)
    bad = int((~np.isfinite(prob)).sum())
    if bad:
        raise ValueError(f"the model predicts {bad:,} NaN or infinite click probabilities of {len(prob):,}: "
                         "its weights are not finite, or so large that their products overflow "
                         "(did the training diverge?)")
    return metrics(dataset.data.user, dataset.data.label, prob)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask (usually 0o644)."""
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temp file in the same folder, then a rename.

    A crash or an error leaves either the old file or the new one, never a
    half-written file. ``write`` gets the open binary temp file. The file
    ends with the usual mode of a new file (``tempfile.mkstemp`` alone
    would leave it readable by its owner only).
    """
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_text(data) -> str:
    """Strict JSON of ``data``: a NaN or infinite float (a metric that does not exist) becomes ``null``.

    ``json.dumps`` would write ``NaN``, which strict JSON parsers refuse.
    """
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, default=str, allow_nan=False) + "\n"


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_name: str,
                    model_config: dict, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None) -> Path:
    """Write a checkpoint atomically: a temp file in the same folder, then rename.

    The file holds only tensors and plain Python values, so it loads with
    ``torch.load(path, weights_only=True)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": 1,
        "model_name": model_name,
        "model_config": model_config,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    write_atomically(path, lambda fh: torch.save(state, fh))
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (safely: weights only).

    Besides reading, it refuses weights that no trained model can hold, so
    that no caller builds a model that predicts NaN: a floating tensor of
    ``model_state`` with a NaN or infinite value, and a negative value in a
    buffer whose name ends in ``running_var`` (Dice's running variance).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable file, a missing field, or damaged weights;
            the message starts with the path and names the field or tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or not written by save_checkpoint
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from err
    for key in ("model_name", "model_config", "model_state"):
        if not isinstance(state, dict) or key not in state:
            raise ValueError(f"{path}: checkpoint lacks the field '{key}'")
    if isinstance(state["model_state"], dict):
        check_weights_are_sane(path, state["model_state"])
    return state


def check_weights_are_sane(path: str | Path, weights: dict) -> None:
    """Refuse non-finite weights and negative running variances.

    Values of ``weights`` that are not tensors are skipped (the callers that
    build a model report them).

    Raises:
        ValueError: ``"<path>: model_state['<name>'] ..."``.
    """
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            continue
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{path}: model_state[{key!r}] holds {bad:,} NaN or infinite value(s) of "
                             f"{value.numel():,}: the training diverged or the file is damaged, and such a "
                             "model cannot be used (its outputs would not be finite)")
        if str(key).endswith("running_var") and value.is_floating_point() and bool((value < 0).any()):
            bad = int((value < 0).sum())
            raise ValueError(f"{path}: model_state[{key!r}] holds {bad:,} negative value(s) of "
                             f"{value.numel():,} (smallest {float(value.min()):g}): a running variance cannot "
                             "be negative, so the file is damaged (the model would predict NaN)")


def _shape_text(shape) -> str:
    """``[1,024, 18]``: a shape with thousands separators."""
    return "[" + ", ".join(f"{d:,}" for d in shape) + "]"


def _fields_of_size(config, size: int) -> list[str]:
    """The config's integer fields whose value (or three times it, a GRU's gates) is ``size``."""
    if not dataclasses.is_dataclass(config):
        return []
    names = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, int) and not isinstance(value, bool):
            if value == size:
                names.append(f"{item.name} = {value:,}")
            elif 3 * value == size:
                names.append(f"3 x {item.name} = 3 x {value:,}")
    return names


def check_weights_fit(path: str | Path, weights: dict, expected: dict, model_name: str,
                      config=None) -> None:
    """Check that ``weights`` has exactly the names and shapes of ``expected``.

    ``expected`` is the ``state_dict()`` of the model the weights are for;
    it may live on PyTorch's ``meta`` device (shapes without memory).
    ``config`` (a :class:`~dien_tutorial.config.DIENConfig`), if given, lets
    a shape mismatch name the config field an axis follows.

    Raises:
        ValueError: ``"<path>: the weights do not fit ..."``, naming the first
            missing, unexpected or misshapen tensor.
    """
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} weight(s) of model {model_name!r}, first {missing[0]!r}")
        if unexpected:
            parts.append(f"has {len(unexpected)} weight(s) model {model_name!r} does not have, "
                         f"first {unexpected[0]!r}")
        raise ValueError(f"{path}: the weights do not fit model {model_name!r}: model_state "
                         + " and ".join(parts) + " (was the checkpoint written for another model?)")
    for key, want in expected.items():
        got = weights[key]
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"{path}: model_state[{key!r}] is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) == tuple(want.shape):
            continue
        detail = ""
        if config is not None and got.dim() == want.dim():
            axis = next(i for i, (g, w) in enumerate(zip(got.shape, want.shape)) if g != w)
            fields = _fields_of_size(config, int(want.shape[axis]))
            if fields:
                detail = f"; axis {axis} follows model_config's {' or '.join(fields)}"
        raise ValueError(f"{path}: the weights do not fit the config: model_state[{key!r}] has shape "
                         f"{_shape_text(got.shape)}, but model_config asks for {_shape_text(want.shape)}"
                         f"{detail}")


def model_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model saved in a checkpoint, after checking every field of the file.

    Nothing is built before the file is known to describe a model:

    - ``model_name`` is a string, ``model_config`` a dict that
      :meth:`DIENConfig.from_dict` accepts, ``model_state`` a dict of
      tensors, each finite, and no running variance negative
      (:func:`load_checkpoint`);
    - every tensor of ``model_state`` has the name and shape the config
      asks for. The expected shapes come from the model built on PyTorch's
      ``meta`` device, which allocates no memory. Since the file's own
      tensors are already in memory, this is also the bound on the sizes of
      the config: a vocabulary the stored tables do not have
      (``n_items = 2**40``, a 17.6 TB table) is reported, naming the field,
      and never allocated.

    Returns:
        ``(model, state)``: the model in eval mode, and the checkpoint's dict.

    Raises:
        FileNotFoundError: no checkpoint file.
        ValueError: an unreadable file, or a field that is missing, of the
            wrong type, non-finite or disagrees with the config; the message
            starts with the path and names the field.
    """
    from dien_tutorial.config import DIENConfig
    from dien_tutorial.model import build_model

    path = Path(path)
    state = load_checkpoint(path)  # the three fields exist; weights finite, running variances >= 0
    name, config_dict, weights = state["model_name"], state["model_config"], state["model_state"]
    if not isinstance(name, str):
        raise ValueError(f"{path}: the field 'model_name' must be a string such as 'dien', "
                         f"got a {type(name).__name__}")
    if not isinstance(config_dict, dict):
        raise ValueError(f"{path}: the field 'model_config' must be a dict of DIENConfig fields, "
                         f"got {type(config_dict).__name__}")
    if not isinstance(weights, dict) or not weights:
        got = "an empty dict" if isinstance(weights, dict) else type(weights).__name__
        raise ValueError(f"{path}: the field 'model_state' must be a dict of weight tensors, got {got}")
    try:
        config = DIENConfig.from_dict(config_dict)
    except (ValueError, TypeError) as err:  # TypeError: a key that is not a string
        raise ValueError(f"{path}: the field 'model_config' is not a valid config: {err}") from err
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: model_state[{key!r}] is a {type(value).__name__}, not a tensor")
    try:
        with torch.device("meta"):  # shapes only: no memory, however large the config
            expected = build_model(name, config).state_dict()
    except ValueError as err:  # an unknown name, or a DIEN name with a baseline 'evolving'
        raise ValueError(f"{path}: the field 'model_name' does not fit: {err}") from err
    check_weights_fit(path, weights, expected, name, config)

    model = build_model(name, config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # a safety net: names and shapes were checked above
        raise ValueError(f"{path}: the weights do not fit model {name!r} ({err})") from err
    model.eval()
    return model, state


# ---------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------


@dataclass
class History:
    """What ``fit`` did, epoch by epoch."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_auc: float = float("-inf")
    train_samples_per_s: float = 0.0
    stopped_early: bool = False


def _uses_aux(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "use_aux", False))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam over all parameters, as ``fit`` uses it.

    On CPU and CUDA it is PyTorch's fused Adam: one kernel updates every
    parameter, where the default runs a dozen small operations per
    parameter tensor (about 1 ms per step for DIEN's 25 tensors on CPU,
    against 0.3 ms fused). The update is the same.
    """
    params = list(model.parameters())
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch, alpha: float,
               max_grad_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on one batch.

    Args:
        model: a model from :func:`dien_tutorial.model.build_model`.
        opt: its optimizer.
        batch: the training batch.
        alpha: weight of the auxiliary loss; 0 skips it (no negatives are
            embedded).
        max_grad_norm: clip the gradient norm to this if set.

    Returns:
        ``(main, aux)``, the detached loss terms (``aux`` is 0 when
        ``alpha`` is 0).

    DIN's step is computed without autograd, by
    :func:`dien_tutorial.din_step.din_loss_and_gradients`: the same loss
    and gradients with the chain rule written out, in about 70% of the
    time (see that module). Every other model, and DIN with dropout,
    PReLU, hooks or frozen parameters, goes through ``loss.backward()``.
    """
    main = din_step.din_loss_and_gradients(model, batch) if alpha == 0 else None
    if main is not None:
        aux = torch.zeros(())
    else:
        out = model(**model_inputs(batch, alpha > 0))
        main = F.binary_cross_entropy_with_logits(out.logit, batch.label)
        if alpha > 0:
            aux = out.aux_loss
            loss = main + alpha * aux
        else:  # main + 0 * 0 is main: skip the two operations and their backward
            aux = torch.zeros(())
            loss = main
        opt.zero_grad(set_to_none=True)
        loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return main.detach(), aux.detach()


def _normalised(config: dict) -> dict:
    """A config dict as :meth:`DIENConfig.to_dict` writes it (tuples and lists alike), if it is one."""
    from dien_tutorial.config import DIENConfig

    try:
        return DIENConfig.from_dict(config).to_dict()
    except (ValueError, TypeError):  # not a valid config: compare it as it is, field by field
        return config


def _config_differences(stored: dict, current: dict) -> list[str]:
    """``"evolving is 'augru' there, 'agru' here"`` for every field in which two config dicts differ."""
    absent = object()
    out = []
    for key in sorted(set(stored) | set(current), key=str):
        there, here = stored.get(key, absent), current.get(key, absent)
        if there != here:
            there_text = "absent" if there is absent else repr(there)
            here_text = "absent" if here is absent else repr(here)
            out.append(f"model_config.{key} is {there_text} there, {here_text} here")
    return out


def _state_to_resume(path: Path, model: torch.nn.Module, model_name: str, model_config: dict) -> dict:
    """Read a checkpoint of ``fit`` and check that it belongs to ``model``.

    The stored ``model_name`` and ``model_config`` must equal the current
    ones, and every weight must have the name and shape of the model's: a
    checkpoint of another variant (an AUGRU run resumed as AGRU, whose
    weights have the same shapes) would otherwise load without a word.

    Raises:
        ValueError: ``"<path>: cannot resume ..."`` naming the differing
            field(s), or a weight that does not fit.
    """
    state = load_checkpoint(path)
    if state["model_name"] != model_name:
        raise ValueError(f"{path}: cannot resume: the checkpoint was written for model_name "
                         f"{state['model_name']!r}, this run trains {model_name!r}")
    stored = state["model_config"]
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: the field 'model_config' must be a dict of DIENConfig fields, "
                         f"got {type(stored).__name__}")
    differences = _config_differences(_normalised(stored), _normalised(model_config))
    if differences:
        raise ValueError(f"{path}: cannot resume: the checkpoint was written for another configuration: "
                         + "; ".join(differences)
                         + " (resume with the same model and config, or train into another checkpoint path)")
    weights = state["model_state"]
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: the field 'model_state' must be a dict of weight tensors, "
                         f"got {type(weights).__name__}")
    check_weights_fit(path, weights, model.state_dict(), model_name, getattr(model, "config", None))
    return state


def _resume_position(path: Path, state: dict) -> tuple[int, list, int, float]:
    """``(last finished epoch, history, best epoch, best valid AUC)`` from the ``extra`` of a ``.last`` file.

    Raises:
        ValueError: ``"<path>: ..."`` naming a missing or malformed field.
    """
    extra = state.get("extra")
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: cannot resume: the field 'extra' is missing or not a dict "
                         f"(got {type(extra).__name__}); a .last file of fit holds the epoch reached there")
    epoch = extra.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        what = "is missing" if "epoch" not in extra else f"must be an int >= 0, got {epoch!r}"
        raise ValueError(f"{path}: cannot resume: the field extra['epoch'] (the last finished epoch) {what}")
    history = extra.get("history", [])
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise ValueError(f"{path}: cannot resume: the field extra['history'] must be a list of dicts, one "
                         "per epoch")
    best_epoch = extra.get("best_epoch", 0)
    best_auc = extra.get("best_valid_auc", float("-inf"))
    if isinstance(best_epoch, bool) or not isinstance(best_epoch, int):
        raise ValueError(f"{path}: cannot resume: the field extra['best_epoch'] must be an int, "
                         f"got {best_epoch!r}")
    if isinstance(best_auc, bool) or not isinstance(best_auc, numbers.Real):
        raise ValueError(f"{path}: cannot resume: the field extra['best_valid_auc'] must be a number, "
                         f"got {best_auc!r}")
    return epoch, history, best_epoch, float(best_auc)


def _first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first weight or buffer of ``model`` holding NaN or inf, or None.

    One check per epoch: a single device sync for all tensors together.
    """
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    if not state or bool(torch.stack([torch.isfinite(v).all() for v in state.values()]).all()):
        return None
    return next(k for k, v in state.items() if not bool(torch.isfinite(v).all()))


def _nan_or_inf(*values: float) -> str:
    return "NaN" if any(math.isnan(v) for v in values) else "inf"


def _diverged(where: str, what: str, config: TrainConfig) -> str:
    """The message of :class:`TrainingDiverged`."""
    return (f"training diverged in {where}: {what}. Try a smaller learning rate than lr = {config.lr:g} "
            f"(e.g. {config.lr / 10:g})" + ("" if config.max_grad_norm else ", or clip the gradients with "
                                            "max_grad_norm")
            + ". The model holds the weights of its best epoch so far (the initial weights if no epoch "
              "finished); no checkpoint was written for this epoch")


def fit(
    model: torch.nn.Module,
    train: DienDataset,
    valid: DienDataset,
    config: TrainConfig | None = None,
    checkpoint: str | Path | None = None,
    model_name: str = "dien",
    resume: bool = False,
    log: Callable[[str], None] | None = print,
) -> History:
    """Train with Adam and early stopping on validation AUC.

    Args:
        model: a model from :func:`dien_tutorial.model.build_model`.
        train, valid: datasets of the two splits.
        config: a :class:`TrainConfig`.
        checkpoint: where to keep the best model (written atomically after
            every epoch that improves validation AUC, plus ``<name>.last``
            after every epoch for resuming). None keeps the best weights in
            memory only.
        model_name: stored in the checkpoint to rebuild the model.
        resume: continue from ``<checkpoint>.last`` if it exists; it must
            have been written for the same ``model_name`` and model config.
        log: called with one compact line per epoch; None for silence.

    Returns:
        A :class:`History`; ``model`` ends holding the best weights.

    Raises:
        TrainingDiverged: (a ``ValueError``) the training loss or a weight
            became NaN or inf; the message names the epoch and step and the
            learning rate. Nothing of the diverged epoch is saved.
        ValueError: ``resume`` found a ``.last`` file (or a best checkpoint)
            of another model or config, or with a missing field; the message
            names the file and the field.
    """
    config = config or TrainConfig()
    seed_everything(config.seed)
    opt = make_optimizer(model, config)
    alpha = float(getattr(getattr(model, "config", None), "alpha", 0.0)) if _uses_aux(model) else 0.0
    history = History()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start_epoch = 0
    model_config = model.config.to_dict() if hasattr(model, "config") else {}
    last = Path(f"{checkpoint}.last") if checkpoint is not None else None
    if resume and last is not None and last.exists():
        # Everything is checked before the model or the optimizer changes.
        state = _state_to_resume(last, model, model_name, model_config)
        epoch, epochs_done, best_epoch, best_auc = _resume_position(last, state)
        best = None
        if Path(checkpoint).exists():
            best = _state_to_resume(Path(checkpoint), model, model_name, model_config)["model_state"]
        model.load_state_dict(state["model_state"])
        if state.get("optimizer_state"):
            try:
                opt.load_state_dict(state["optimizer_state"])
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                raise ValueError(f"{last}: cannot resume: the field 'optimizer_state' does not fit this "
                                 f"model's optimizer ({err})") from err
        start_epoch = epoch + 1
        history.epochs = list(epochs_done)
        history.best_epoch, history.best_valid_auc = best_epoch, best_auc
        if best is not None:
            best_state = best

    bad_epochs = 0
    seen, busy = 0, 0.0
    for epoch in range(start_epoch, config.epochs):
        model.train()
        sums = {"main": 0.0, "aux": 0.0}
        n = 0
        t0 = time.perf_counter()
        steps = math.ceil(len(train) / config.batch_size)
        bar = tqdm(train.batches(config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch),
                   total=steps, disable=not config.progress, desc=f"epoch {epoch}", leave=False)
        for step, batch in enumerate(bar):
            main, aux = train_step(model, opt, batch, alpha, config.max_grad_norm)
            b = len(batch.label)
            main_value, aux_value = float(main), float(aux)  # the loop's one host sync per step
            if not (math.isfinite(main_value) and math.isfinite(aux_value)):
                bar.close()
                model.load_state_dict(best_state)
                raise TrainingDiverged(_diverged(
                    f"epoch {epoch}, step {step + 1} of {steps}",
                    f"the training loss became {_nan_or_inf(main_value, aux_value)} (main {main_value}, "
                    f"aux {aux_value})", config))
            sums["main"] += main_value * b
            sums["aux"] += aux_value * b
            n += b
            if config.progress:
                bar.set_postfix(main=f"{sums['main'] / n:.4f}", aux=f"{sums['aux'] / n:.4f}")
        elapsed = time.perf_counter() - t0
        broken = _first_non_finite(model)  # the last step's update is not seen by any loss
        if broken is not None:
            model.load_state_dict(best_state)
            raise TrainingDiverged(_diverged(f"epoch {epoch}, after its last step ({steps})",
                                             f"the weight {broken!r} holds NaN or inf", config))
        seen += n
        busy += elapsed
        prob = predict(model, valid, config.eval_batch_size)
        if not bool(np.isfinite(prob).all()):  # finite weights so large that their products overflow
            model.load_state_dict(best_state)
            raise TrainingDiverged(_diverged(f"epoch {epoch}", "the weights grew so large that the model "
                                             "predicts NaN or inf on the validation split", config))
        valid_m = metrics(valid.data.user, valid.data.label, prob)
        record = {
            "epoch": epoch,
            "main_loss": sums["main"] / n,
            "aux_loss": sums["aux"] / n,
            "alpha": alpha,
            "total_loss": sums["main"] / n + alpha * sums["aux"] / n,
            "valid_auc": valid_m["auc"],
            "valid_gauc": valid_m["gauc"],
            "valid_logloss": valid_m["logloss"],
            "train_seconds": elapsed,
            "samples_per_s": n / elapsed if elapsed > 0 else float("nan"),
        }
        history.epochs.append(record)
        improved = valid_m["auc"] > history.best_valid_auc
        if improved:
            history.best_valid_auc = valid_m["auc"]
            history.best_epoch = epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bad_epochs = 0
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, model_name, model_config,
                                extra={"epoch": epoch, "valid": valid_m})
        else:
            bad_epochs += 1
        if log is not None:
            log(f"epoch {epoch:2d}  loss {record['total_loss']:.4f} = main {record['main_loss']:.4f}"
                f" + {alpha:g} * aux {record['aux_loss']:.4f}  valid auc {valid_m['auc']:.4f}"
                f" gauc {valid_m['gauc']:.4f} logloss {valid_m['logloss']:.4f}"
                f"  {record['samples_per_s']:,.0f} samples/s{'  *' if improved else ''}")
        if last is not None:
            save_checkpoint(last, model, model_name, model_config, optimizer=opt,
                            extra={"epoch": epoch, "history": history.epochs,
                                   "best_epoch": history.best_epoch,
                                   "best_valid_auc": history.best_valid_auc})
        if bad_epochs > config.patience:
            history.stopped_early = True
            break
    model.load_state_dict(best_state)
    history.train_samples_per_s = seen / busy if busy > 0 else float("nan")
    return history


def history_to_json(history: History) -> str:
    """Serialise a :class:`History` (for ``metrics.json``)."""
    return json.dumps(asdict(history), indent=2)
