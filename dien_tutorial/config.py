"""Every width and switch of the DIEN model, in one dataclass.

:class:`DIENConfig` is the only place where a number that shapes the model
lives. The layers take their widths as arguments and the model reads them
from here, so the book can point at one table when it says "the paper uses
18-wide embeddings".

A config round-trips through plain Python types (:meth:`DIENConfig.to_dict`,
:meth:`DIENConfig.from_dict`), so a checkpoint can store it next to the
weights and still be read with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# The choices of the string-valued fields. Kept as tuples so error messages
# can list them.
ACTIVATIONS = ("dice", "prelu")
EVOLVING_KINDS = ("augru", "agru", "aigru", "gru_att", "none")
AUX_SCORERS = ("mlp", "inner")

# Variants in which an interest-evolving GRU runs over the extractor's states.
# "gru_att" (extractor GRU + attention pooling) and "none" (DIN: attention
# pooling over raw embeddings) are the paper's baselines.
DIEN_EVOLVING_KINDS = ("augru", "agru", "aigru")

# Fields that hold a tuple of layer widths: stored as lists in to_dict().
_WIDTH_FIELDS = ("attention_widths", "mlp_widths", "aux_widths")


@dataclass(frozen=True)
class DIENConfig:
    """Hyper-parameters of DIEN and of the baselines built from its parts.

    The defaults are the paper's settings for the Amazon data (Section 5.1 of
    Zhou et al., 2019, and the authors' code), so ``DIENConfig(n_items=...,
    n_cates=...)`` equals :meth:`paper`. Only the vocabulary sizes have no
    default: they come from the data.

    Attributes:
        n_items: rows of the item embedding table, including index 0
            (padding) and index 1 (unknown item). Real item ids start at 2.
        n_cates: rows of the category table, with the same convention.
        item_dim: width of one item embedding.
        cate_dim: width of one category embedding. A behaviour is the
            concatenation item ++ category, so ``E = item_dim + cate_dim``.
        hidden: ``H``, the hidden width of both GRUs (interest extractor and
            interest evolving layer).
        attention_widths: hidden layers of the attention MLP (DIN's
            activation unit); a final width-1 layer gives the score.
        mlp_widths: hidden layers of the prediction head; a final width-1
            layer gives the click logit.
        activation: activation of the head's hidden layers, ``"dice"`` (the
            paper) or ``"prelu"``.
        evolving: how the history becomes one interest vector.
            ``"augru"``/``"agru"``/``"aigru"`` are DIEN's three variants of
            the interest evolving layer; ``"gru_att"`` is the baseline
            "extractor GRU, then attention pooling"; ``"none"`` is DIN
            (attention pooling over the embeddings, no GRU at all).
        use_aux: add the auxiliary loss that supervises every extractor
            state with the next behaviour. Needs an extractor, so it must be
            False when ``evolving == "none"``.
        alpha: weight of the auxiliary loss in the total loss.
        aux_scorer: how the auxiliary loss scores a (state, behaviour) pair:
            ``"inner"`` (paper: inner product after a linear map of the
            state; the default, and about 7x cheaper) or ``"mlp"`` (authors'
            code: an MLP on the concatenation). See
            :class:`dien_tutorial.layers.AuxiliaryLoss`.
        aux_widths: hidden layers of the ``"mlp"`` aux scorer (unused by
            ``"inner"``).
        dropout: dropout probability after each hidden layer of the head.
    """

    n_items: int
    n_cates: int
    item_dim: int = 18  # paper: 18 per id field
    cate_dim: int = 18  # so E = 36
    hidden: int = 36  # paper: GRU hidden size equals E
    attention_widths: tuple[int, ...] = (80, 40)  # authors' code
    mlp_widths: tuple[int, ...] = (200, 80)  # paper: 200 -> 80 -> 1
    activation: str = "dice"  # paper uses Dice in the head
    evolving: str = "augru"  # the paper's best variant
    use_aux: bool = True  # full DIEN
    alpha: float = 1.0  # paper: aux loss weighted 1
    aux_scorer: str = "inner"  # the paper's; "mlp" is the authors' code
    aux_widths: tuple[int, ...] = (100, 50)  # authors' code, used by "mlp" only
    dropout: float = 0.0  # the paper reports none

    def __post_init__(self) -> None:
        # Lists arrive from JSON or from to_dict(); the dataclass stores
        # tuples so a config is hashable and cannot be changed in place.
        for name in _WIDTH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        # An int alpha or dropout (say from JSON) is stored as float so that
        # to_dict() always gives the same types back.
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if _is_number(value):
                object.__setattr__(self, name, float(value))
        self.validate()

    # ------------------------------------------------------------------ #
    # derived widths
    # ------------------------------------------------------------------ #
    @property
    def behaviour_dim(self) -> int:
        """``E``: width of one embedded behaviour (item ++ category)."""
        return self.item_dim + self.cate_dim

    @property
    def has_extractor(self) -> bool:
        """Whether a GRU interest extractor runs over the history."""
        return self.evolving != "none"

    # ------------------------------------------------------------------ #
    # validation
    # ------------------------------------------------------------------ #
    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad one.

        Raises:
            ValueError: the message starts with ``DIENConfig.<field>``.
        """
        for name in ("n_items", "n_cates"):
            value = getattr(self, name)
            # Index 0 is padding and 1 is unknown, so a usable vocabulary
            # has at least one more row.
            if not _is_int(value) or value < 3:
                raise ValueError(
                    f"DIENConfig.{name} must be an int >= 3 (0 = padding, 1 = unknown, "
                    f"real ids from 2), got {value!r}"
                )
        for name in ("item_dim", "cate_dim", "hidden"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"DIENConfig.{name} must be a positive int, got {value!r}")
        for name in _WIDTH_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(_is_int(w) and w >= 1 for w in value):
                raise ValueError(
                    f"DIENConfig.{name} must be a tuple of positive ints, got {value!r}"
                )
        if not self.attention_widths:
            raise ValueError("DIENConfig.attention_widths must name at least one hidden layer")
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("evolving", self.evolving, EVOLVING_KINDS)
        _check_choice("aux_scorer", self.aux_scorer, AUX_SCORERS)
        if self.aux_scorer == "mlp" and not self.aux_widths:
            raise ValueError("DIENConfig.aux_widths must name at least one hidden layer for aux_scorer='mlp'")
        if not isinstance(self.use_aux, bool):
            raise ValueError(f"DIENConfig.use_aux must be a bool, got {self.use_aux!r}")
        if self.use_aux and not self.has_extractor:
            raise ValueError(
                "DIENConfig.use_aux must be False when evolving='none': the auxiliary "
                "loss supervises the extractor GRU, and DIN has none"
            )
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"DIENConfig.alpha must be a finite number >= 0, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DIENConfig.dropout must be in [0, 1), got {self.dropout!r}")

    # ------------------------------------------------------------------ #
    # presets
    # ------------------------------------------------------------------ #
    @classmethod
    def paper(cls, n_items: int, n_cates: int, **overrides: Any) -> DIENConfig:
        """The paper's widths: embeddings 18 per field, hidden 36, head 200-80.

        Args:
            n_items: item vocabulary size (with padding and unknown rows).
            n_cates: category vocabulary size (same convention).
            **overrides: any other field, e.g. ``evolving="agru"``.
        """
        return cls(n_items=n_items, n_cates=n_cates, **overrides)

    @classmethod
    def tiny(cls, n_items: int = 64, n_cates: int = 8, **overrides: Any) -> DIENConfig:
        """A model small enough to build and train in tests within seconds.

        Args:
            n_items: item vocabulary size (default 64).
            n_cates: category vocabulary size (default 8).
            **overrides: any other field.
        """
        widths: dict[str, Any] = {
            "item_dim": 4,
            "cate_dim": 4,
            "hidden": 8,
            "attention_widths": (8, 4),
            "mlp_widths": (16, 8),
            "aux_widths": (8, 4),
        }
        widths.update(overrides)
        return cls(n_items=n_items, n_cates=n_cates, **widths)

    # ------------------------------------------------------------------ #
    # plain-type round trip
    # ------------------------------------------------------------------ #
    def to_dict(self) -> dict[str, Any]:
        """All fields as ``int``/``float``/``str``/``bool``/``list`` values.

        Safe to store inside a checkpoint that is loaded with
        ``weights_only=True``.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = [int(w) for w in value] if f.name in _WIDTH_FIELDS else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DIENConfig:
        """Rebuild a config from :meth:`to_dict` output (or parsed JSON).

        Raises:
            ValueError: an unknown key (named), or a field failing validation.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DIENConfig has no field {unknown[0]!r} (known: {sorted(known)})")
        missing = sorted(name for name in ("n_items", "n_cates") if name not in data)
        if missing:
            raise ValueError(f"DIENConfig.{missing[0]} is required")
        return cls(**data)


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but True is not a width.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DIENConfig.{name} must be one of {choices}, got {value!r}")
