"""A seeded simulator of shoppers whose interest drifts: the embedded default data.

The book needs data that runs in seconds and whose answer we know. This module
makes a behaviour log (see :mod:`dien_tutorial.data.log`) from a small
generative story, and keeps the hidden part of the story, each shopper's
*interest* at every step, as ground truth.

**The catalogue.** There are ``n_categories`` categories. Category ``c`` (its id
is its popularity rank, 0 the most popular) has weight proportional to
``1 / (c + 1) ** category_exponent``; it owns a share of the ``n_items`` items
in proportion to that weight (at least one item each). Inside a category the
item of rank ``r`` has weight ``1 / (r + 1) ** item_exponent``, so a few items
take most clicks and the rest form a long tail, as in the Amazon 5-core data.
Item ids are shuffled, so an id says nothing about category or popularity.

**The shoppers.** Every shopper clicks a number of items drawn from a shifted,
heavy-tailed distribution: at least ``min_history`` (5, as in a 5-core data
set), usually a few more, rarely hundreds (capped at ``max_history``). The
shopper starts interested in a category picked by category popularity. Before
each later click, with probability ``drift`` the interest moves on to a
*neighbouring* category. Neighbours are fixed for the whole data set: the
categories sit on a shuffled ring, and an interest can move up to
``drift_width`` places along it, nearer places and some seeded favourites
being likelier. That fixed transition matrix is what makes the evolution
learnable: after "cameras" comes "lenses" more often than anything else.

**The clicks.** Each click follows the current interest and picks an item from
that category by item popularity, except that with probability ``noise`` the
shopper ignores the interest and clicks a random popular item from anywhere.
Nobody clicks the same item twice: a repeat is redrawn. If a shopper has
already clicked nearly everything they like in a category, the redraws give
up and the click lands on a random item; it is then flagged as not following
the interest, and the log's report counts these clicks.

**The clock.** Clicks are stamped in whole days (unix seconds at midnight, as
in the Amazon reviews). Each shopper is active over a span of roughly
``mean_gap_days`` per click, placed at a random date between ``time_start``
and ``time_end``; several clicks can share a day, and the ``order`` column
says which came first.

Why it suits DIEN: with ``drift = 0`` a shopper's whole history points at one
category and a model that averages the history does as well as any. The
larger ``drift``, the more the *latest* clicks matter and the more a sequence
model (the interest-evolution GRU of DIEN) has to gain, until drift is so
strong that the interest is noise again.

Example:
    >>> sim = simulate(SimulationConfig.tiny())
    >>> sim.log.stats()["users"]
    300
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dien_tutorial.data.log import BehaviourLog, LoadReport, validate_log

_DAY = 86_400  # seconds

# Rounds of redrawing a repeated item before a click falls back to a random
# item anywhere: first by popularity, then uniformly within the category
# (uniform finds the rare unclicked items that popularity almost never picks).
_POPULAR_REDRAWS = 10
_UNIFORM_REDRAWS = 10
# A fallback click can itself repeat; this bounds that last loop. With at most
# half the catalogue clicked by anyone, each round resolves at least half.
_FALLBACK_REDRAWS = 200


@dataclass(frozen=True)
class SimulationConfig:
    """Every knob of the simulator; the defaults make the book's data set.

    Build one directly, from a preset, or vary one knob of another with
    ``dataclasses.replace(config, drift=0.3)``. Presets:
    :meth:`tiny` (tests), the default (the book, runs in about a second) and
    :meth:`electronics_size` (as large as Amazon Electronics 5-core).

    Raises:
        ValueError: a field is out of range; the message names the field.
    """

    # Catalogue and population. The default is small enough for a laptop CPU
    # to train DIEN in seconds yet large enough for stable AUC estimates.
    n_users: int = 8_000
    n_items: int = 3_000
    n_categories: int = 40

    # Interest evolution. drift is the chance per click that the interest
    # moves to another category; drift_width is how far along the category
    # ring it can move (so each category has 2 * drift_width neighbours).
    drift: float = 0.2
    drift_width: int = 2

    # Chance that a click ignores the interest (a random popular item).
    noise: float = 0.1

    # Zipf exponents: popularity of items inside a category, and of the
    # categories themselves (which also sets how many items each one owns).
    item_exponent: float = 1.0
    category_exponent: float = 1.0

    # History length = min_history + floor(Lomax(history_tail, history_scale)),
    # capped at max_history. The defaults mimic Amazon Electronics 5-core:
    # minimum 5, median 6, mean about 8.8, a long tail of heavy reviewers.
    min_history: int = 5
    history_scale: float = 4.3
    history_tail: float = 2.0
    max_history: int = 500

    # Clock: the Amazon 2014 dump spans mostly 2008-01-01 .. 2014-07-23.
    time_start: int = 1_199_145_600  # 2008-01-01 00:00 UTC
    time_end: int = 1_406_073_600  # 2014-07-23 00:00 UTC
    mean_gap_days: float = 45.0

    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"SimulationConfig.{name} {rule}, got {getattr(self, name)!r}")

        for name in ("n_users", "n_items", "n_categories", "drift_width",
                     "min_history", "max_history", "time_start", "time_end", "seed"):
            need(isinstance(getattr(self, name), (int, np.integer)), name, "must be an integer")
        need(self.n_users >= 1, "n_users", "must be at least 1")
        need(self.n_categories >= 2, "n_categories", "must be at least 2")
        need(self.n_items >= self.n_categories, "n_items",
             f"must be at least n_categories ({self.n_categories}), one item per category")
        need(0.0 <= self.drift <= 1.0, "drift", "must be a probability in [0, 1]")
        need(self.drift_width >= 1, "drift_width", "must be at least 1")
        need(2 * self.drift_width <= self.n_categories - 1, "drift_width",
             f"must leave 2 * drift_width distinct neighbours among "
             f"{self.n_categories} categories")
        need(0.0 <= self.noise <= 1.0, "noise", "must be a probability in [0, 1]")
        need(self.item_exponent >= 0.0, "item_exponent", "must be >= 0")
        need(self.category_exponent >= 0.0, "category_exponent", "must be >= 0")
        need(self.min_history >= 1, "min_history", "must be at least 1")
        need(self.max_history >= self.min_history, "max_history",
             f"must be at least min_history ({self.min_history})")
        # Keeps the fallback draw able to find an unclicked item quickly.
        need(self.max_history <= self.n_items // 2, "max_history",
             f"must be at most half of n_items ({self.n_items})")
        need(self.history_scale > 0.0, "history_scale", "must be > 0")
        need(self.history_tail > 0.0, "history_tail", "must be > 0")
        need(self.time_end > self.time_start, "time_end",
             f"must be after time_start ({self.time_start})")
        need(self.mean_gap_days > 0.0, "mean_gap_days", "must be > 0")
        need(self.seed >= 0, "seed", "must be >= 0")

    @classmethod
    def tiny(cls, **overrides: Any) -> SimulationConfig:
        """About 300 users and 2,500 clicks: for tests, in milliseconds."""
        return cls(**{"n_users": 300, "n_items": 600, "n_categories": 12,
                      "max_history": 200, **overrides})

    @classmethod
    def default(cls, **overrides: Any) -> SimulationConfig:
        """The book's data set (the dataclass defaults), with ``overrides``."""
        return cls(**overrides)

    @classmethod
    def electronics_size(cls, **overrides: Any) -> SimulationConfig:
        """As large as Amazon Electronics 5-core: ~1.7M clicks, for benchmarks.

        192,403 users, 63,001 items and 801 categories, as in that data set.
        """
        return cls(**{"n_users": 192_403, "n_items": 63_001, "n_categories": 801,
                      **overrides})


@dataclass
class Simulation:
    """A simulated log together with the hidden story behind it.

    Attributes:
        config: the configuration that produced it.
        log: the behaviour log, built by :func:`validate_log` (nothing dropped).
        truth: one row per log row, in the same order: ``user``, ``time``,
            ``order`` (the log's key), ``interest`` (the category the shopper
            intended at that click) and ``followed_interest`` (False for a
            noise click or a fallback after too many repeats).
        transition: ``transition[a, b]`` is the chance that a drifting
            interest moves from category ``a`` to category ``b``.
    """

    config: SimulationConfig
    log: BehaviourLog
    truth: pd.DataFrame
    transition: np.ndarray


@dataclass
class _Catalogue:
    """Items laid out category by category, most popular first."""

    start: np.ndarray  # first item index of each category
    size: np.ndarray  # number of items of each category
    category_cdf: np.ndarray  # cumulative category popularity, ends at 1
    # cumulative item popularity within its category, shifted by the category
    # index, so one sorted array serves a searchsorted for every category
    shifted_cdf: np.ndarray
    item_category: np.ndarray  # category index of each item index
    item_id: np.ndarray  # raw (shuffled) id of each item index


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    return 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent


def _make_catalogue(config: SimulationConfig, rng: np.random.Generator) -> _Catalogue:
    """Category sizes and popularities, and item popularities within them."""
    n_cat = config.n_categories
    cat_weight = _zipf_weights(n_cat, config.category_exponent)
    cat_weight /= cat_weight.sum()
    # One item per category guaranteed, the rest shared by category weight.
    size = 1 + rng.multinomial(config.n_items - n_cat, cat_weight)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    item_category = np.repeat(np.arange(n_cat), size)

    # Rank of each item inside its category: 0, 1, ... restarting per category.
    rank = np.arange(config.n_items) - start[item_category]
    weight = 1.0 / (rank + 1.0) ** config.item_exponent
    cum = np.cumsum(weight)
    # Cumulative weight within the category: subtract what came before it.
    before = np.concatenate([[0.0], cum])[start][item_category]
    total = np.add.reduceat(weight, start)[item_category]
    within = (cum - before) / total
    within[start + size - 1] = 1.0  # exact 1 at each category's end
    category_cdf = np.cumsum(cat_weight)
    category_cdf[-1] = 1.0
    return _Catalogue(
        start=start,
        size=size,
        category_cdf=category_cdf,
        shifted_cdf=item_category + within,
        item_category=item_category,
        item_id=rng.permutation(config.n_items).astype(np.int64),
    )


def _make_transitions(
    config: SimulationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of each category on a shuffled ring, and their cumulative odds."""
    n_cat, width = config.n_categories, config.drift_width
    ring = rng.permutation(n_cat)  # ring[p] = category at ring position p
    position = np.empty(n_cat, dtype=np.int64)
    position[ring] = np.arange(n_cat)
    steps = np.concatenate([np.arange(-width, 0), np.arange(1, width + 1)])
    neighbours = ring[(position[:, None] + steps[None, :]) % n_cat]
    # Nearer is likelier; the gamma factor gives each category favourites,
    # so the matrix is asymmetric and worth learning.
    odds = rng.gamma(2.0, size=neighbours.shape) / np.abs(steps)[None, :]
    cdf = np.cumsum(odds / odds.sum(axis=1, keepdims=True), axis=1)
    cdf[:, -1] = 1.0
    return neighbours, cdf


def _history_lengths(config: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Clicks per user: min_history plus a Lomax (Pareto II) draw, capped."""
    u = rng.random(config.n_users)
    lomax = config.history_scale * ((1.0 - u) ** (-1.0 / config.history_tail) - 1.0)
    # Clip before converting: the Lomax tail can exceed any integer type.
    extra = np.floor(np.minimum(lomax, config.max_history)).astype(np.int64)
    return np.minimum(config.min_history + extra, config.max_history)


def _evolve_interests(
    config: SimulationConfig,
    rng: np.random.Generator,
    catalogue: _Catalogue,
    neighbours: np.ndarray,
    neighbour_cdf: np.ndarray,
    lengths: np.ndarray,
    row_start: np.ndarray,
) -> np.ndarray:
    """The interest of every user at every step, as one array over log rows."""
    interest = np.empty(int(lengths.sum()), dtype=np.int64)
    # Longest histories first: the users still active at step t are a prefix,
    # so each step works on a slice instead of a mask over everybody.
    by_length = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[by_length]
    starts = row_start[by_length]
    active = np.searchsorted(-sorted_len, -np.arange(sorted_len[0]), side="left")
    # First interests by category popularity (iid, so the user order is moot).
    current = np.searchsorted(catalogue.category_cdf, rng.random(config.n_users), side="right")
    for t, k in enumerate(active):
        current = current[:k]
        if t > 0:
            moving = np.flatnonzero(rng.random(k) < config.drift)
            if moving.size:
                cdf = neighbour_cdf[current[moving]]
                pick = (cdf < rng.random(moving.size)[:, None]).sum(axis=1)
                current[moving] = neighbours[current[moving], np.minimum(pick, cdf.shape[1] - 1)]
        interest[starts[:k] + t] = current
    return interest


def _draw_popular(
    catalogue: _Catalogue, category: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One item index per entry of ``category``, by popularity within it."""
    target = category + rng.random(category.size)
    return np.searchsorted(catalogue.shifted_cdf, target, side="right")


def _draw_uniform(
    catalogue: _Catalogue, category: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One item index per entry of ``category``, every item equally likely."""
    offset = np.floor(rng.random(category.size) * catalogue.size[category]).astype(np.int64)
    return catalogue.start[category] + offset


def _repeats(row_user: np.ndarray, item: np.ndarray, rows: np.ndarray, n_items: int) -> np.ndarray:
    """Rows (among ``rows``, ascending) whose (user, item) appeared earlier."""
    key = row_user[rows] * n_items + item[rows]
    by_key = np.argsort(key, kind="stable")  # stable: earlier rows come first
    sorted_key = key[by_key]
    later = np.flatnonzero(sorted_key[1:] == sorted_key[:-1]) + 1
    return np.sort(rows[by_key[later]])


def _rows_of(users: np.ndarray, row_user: np.ndarray, n_users: int) -> np.ndarray:
    """Indices of all rows belonging to ``users``."""
    touched = np.zeros(n_users, dtype=bool)
    touched[users] = True
    return np.flatnonzero(touched[row_user])


def _pick_items(
    config: SimulationConfig,
    rng: np.random.Generator,
    catalogue: _Catalogue,
    row_user: np.ndarray,
    category: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Items for all clicks with no (user, item) repeated; and fallback rows."""
    item = _draw_popular(catalogue, category, rng)
    pending = _repeats(row_user, item, np.arange(item.size), config.n_items)
    fallback = np.zeros(item.size, dtype=bool)
    for round_ in range(_POPULAR_REDRAWS + _UNIFORM_REDRAWS + _FALLBACK_REDRAWS):
        if pending.size == 0:
            return item, fallback
        if round_ < _POPULAR_REDRAWS:
            item[pending] = _draw_popular(catalogue, category[pending], rng)
        elif round_ < _POPULAR_REDRAWS + _UNIFORM_REDRAWS:
            item[pending] = _draw_uniform(catalogue, category[pending], rng)
        else:
            # The shopper has (nearly) exhausted the category: any item will do.
            item[pending] = rng.integers(0, config.n_items, size=pending.size)
            fallback[pending] = True
        # Only the users whose items just changed can have new repeats.
        rows = _rows_of(row_user[pending], row_user, config.n_users)
        pending = _repeats(row_user, item, rows, config.n_items)
    raise RuntimeError("simulate: could not remove repeated clicks; this is a bug")


def _timestamps(
    config: SimulationConfig, rng: np.random.Generator, lengths: np.ndarray, row_user: np.ndarray
) -> np.ndarray:
    """Whole-day unix times, non-decreasing within each user."""
    window = (config.time_end - config.time_start) // _DAY
    span = np.minimum(rng.exponential(config.mean_gap_days * (lengths - 1)), window)
    span = np.floor(span).astype(np.int64)
    first_day = np.floor(rng.random(config.n_users) * (window - span + 1)).astype(np.int64)
    day = np.floor(rng.random(row_user.size) * (span[row_user] + 1)).astype(np.int64)
    # Sorting user * (window + 1) + day sorts days inside each user's block of
    # rows while leaving the blocks where they are.
    day = np.sort(row_user * (window + 1) + day) - row_user * (window + 1)
    return config.time_start + (first_day[row_user] + day) * _DAY


def simulate(config: SimulationConfig | None = None) -> Simulation:
    """Simulate shoppers with drifting interests.

    Args:
        config: the knobs; ``SimulationConfig()`` (the book's default) if omitted.

    Returns:
        The validated behaviour log, the per-click ground truth and the
        category transition matrix. The same config always gives the same
        result, to the byte.
    """
    if config is None:
        config = SimulationConfig()
    rng = np.random.default_rng(config.seed)
    catalogue = _make_catalogue(config, rng)
    neighbours, neighbour_cdf = _make_transitions(config, rng)

    lengths = _history_lengths(config, rng)
    row_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    row_user = np.repeat(np.arange(config.n_users, dtype=np.int64), lengths)
    order = np.arange(row_user.size, dtype=np.int64) - row_start[row_user]

    interest = _evolve_interests(config, rng, catalogue, neighbours, neighbour_cdf,
                                 lengths, row_start)
    noisy = rng.random(row_user.size) < config.noise
    noise_category = np.searchsorted(catalogue.category_cdf, rng.random(int(noisy.sum())),
                                     side="right")
    category = interest.copy()
    category[noisy] = noise_category
    item, fallback = _pick_items(config, rng, catalogue, row_user, category)
    time = _timestamps(config, rng, lengths, row_user)

    source = f"simulate(seed={config.seed}, n_users={config.n_users})"
    report = LoadReport(source=source, rows_read=int(row_user.size))
    if fallback.any():
        report.notes.append(
            f"{int(fallback.sum()):,} click(s) fell back to a random item because the "
            "shopper had already clicked nearly everything they liked in the category"
        )
    frame = pd.DataFrame({
        "user": row_user,
        "item": catalogue.item_id[item],
        "category": catalogue.item_category[item].astype(np.int64),
        "time": time,
        "order": order,
    })
    # Rows are already sorted by (user, time, order), so the validated log
    # keeps this row order and the truth below lines up with it.
    log = validate_log(frame, source=source, report=report)
    truth = pd.DataFrame({
        "user": row_user,
        "time": time,
        "order": order,
        "interest": interest,
        "followed_interest": ~(noisy | fallback),
    })

    transition = np.zeros((config.n_categories, config.n_categories))
    odds = np.diff(neighbour_cdf, axis=1, prepend=0.0)
    np.add.at(transition, (np.arange(config.n_categories)[:, None], neighbours), odds)
    return Simulation(config=config, log=log, truth=truth, transition=transition)


__all__ = ["Simulation", "SimulationConfig", "simulate"]
