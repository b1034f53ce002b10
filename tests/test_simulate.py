"""The simulator: determinism, shape of the data, and the story it tells."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from dien_tutorial.data.log import LOG_COLUMNS
from dien_tutorial.data.simulate import Simulation, SimulationConfig, simulate

DAY = 86_400


@pytest.fixture(scope="module")
def tiny() -> Simulation:
    return simulate(SimulationConfig.tiny())


@pytest.fixture(scope="module")
def default() -> Simulation:
    return simulate(SimulationConfig())


def roomy(**overrides) -> SimulationConfig:
    """Tiny, but with 200 equally sized categories of items and histories of
    at most 50, so no shopper can run out of new items in their category and
    every click can follow the interest."""
    return SimulationConfig.tiny(
        n_items=2_400, n_categories=12, category_exponent=0.0, max_history=50, **overrides
    )


def consecutive(sim: Simulation, column: str, frame: str = "log") -> np.ndarray:
    """For each pair of consecutive clicks of one user: did ``column`` change?"""
    f = sim.log.frame if frame == "log" else sim.truth
    values, users = f[column].to_numpy(), f["user"].to_numpy()
    same_user = users[1:] == users[:-1]
    return (values[1:] != values[:-1])[same_user]


# --- determinism -------------------------------------------------------------


def test_same_seed_gives_byte_identical_frames(tiny):
    again = simulate(SimulationConfig.tiny())
    for a, b in ((tiny.log.frame, again.log.frame), (tiny.truth, again.truth)):
        pd.testing.assert_frame_equal(a, b)
        for column in a.columns:
            assert a[column].to_numpy().tobytes() == b[column].to_numpy().tobytes()
    np.testing.assert_array_equal(tiny.transition, again.transition)


def test_different_seeds_differ(tiny):
    other = simulate(SimulationConfig.tiny(seed=1))
    a, b = tiny.log.frame, other.log.frame
    assert len(a) != len(b) or not a.equals(b)
    assert not np.array_equal(tiny.transition, other.transition)


# --- the log -----------------------------------------------------------------


def test_log_is_canonical_and_nothing_is_dropped(tiny):
    f = tiny.log.frame
    assert tuple(f.columns) == LOG_COLUMNS
    assert all(f[c].dtype == np.int64 for c in LOG_COLUMNS)
    assert tiny.log.report.dropped == {}
    assert tiny.log.report.rows_read == len(f)
    assert not f.duplicated(["user", "item"]).any()
    assert (f.groupby("item")["category"].nunique() == 1).all()


def test_row_counts(tiny, default):
    for sim, n_users in ((tiny, 300), (default, 8_000)):
        stats = sim.log.stats()
        assert stats["users"] == n_users
        assert stats["interactions"] == len(sim.truth)
        assert stats["categories"] == sim.config.n_categories
        assert stats["items"] <= sim.config.n_items
    # Measured: 2,493 clicks (tiny), 71,529 (default); the mean history is ~8.8.
    assert 2_000 <= len(tiny.log.frame) <= 3_000
    assert 65_000 <= len(default.log.frame) <= 78_000
    # The long tail leaves few catalogue items unclicked (measured 2,962 of 3,000).
    assert default.log.stats()["items"] >= 2_850


def test_history_lengths_look_like_amazon_5_core(default):
    lengths = default.log.frame.groupby("user").size()
    assert lengths.min() == 5
    assert 6 <= lengths.median() <= 7  # measured 6
    assert 8.0 <= lengths.mean() <= 9.5  # measured 8.94
    assert lengths.quantile(0.99) >= 30  # a heavy tail (measured 45)
    assert lengths.max() <= 500


def test_order_and_time(tiny):
    f, c = tiny.log.frame, tiny.config
    # order counts each user's clicks 0, 1, 2, ...
    expected = f.groupby("user").cumcount().to_numpy()
    np.testing.assert_array_equal(f["order"].to_numpy(), expected)
    t = f["time"].to_numpy()
    assert (t % DAY == 0).all()  # whole days, as in the Amazon reviews
    assert t.min() >= c.time_start and t.max() <= c.time_end
    same_user = f["user"].to_numpy()[1:] == f["user"].to_numpy()[:-1]
    gaps = np.diff(t)[same_user]
    assert (gaps >= 0).all()
    assert (gaps == 0).any() and (gaps > 0).mean() > 0.8  # mostly days apart


def test_item_popularity_is_long_tailed(default):
    clicks = np.sort(default.log.frame["item"].value_counts().to_numpy())[::-1]
    clicks = np.concatenate([clicks, np.zeros(default.config.n_items - clicks.size)])
    share = np.cumsum(clicks) / clicks.sum()
    n = default.config.n_items
    assert share[n // 10 - 1] > 0.45  # top 10% of items: measured 51.6%
    assert 1 - share[n // 2 - 1] < 0.15  # bottom half: measured 10.1%


# --- the ground truth --------------------------------------------------------


def test_truth_lines_up_with_the_log(tiny):
    key = ["user", "time", "order"]
    pd.testing.assert_frame_equal(tiny.truth[key], tiny.log.frame[key])
    assert tiny.truth["interest"].dtype == np.int64
    assert tiny.truth["followed_interest"].dtype == bool
    followed = tiny.truth["followed_interest"].to_numpy()
    same = tiny.log.frame["category"].to_numpy() == tiny.truth["interest"].to_numpy()
    assert same[followed].all()


def test_noise_rate(default):
    # noise=0.1 plus a few fallback clicks of heavy users (measured 89.3%).
    assert 0.86 <= default.truth["followed_interest"].mean() <= 0.91


def test_without_drift_or_noise_every_click_follows_the_single_interest():
    sim = simulate(roomy(drift=0.0, noise=0.0))
    assert sim.log.report.notes == []  # no fallback clicks
    assert sim.truth["followed_interest"].all()
    np.testing.assert_array_equal(
        sim.log.frame["category"].to_numpy(), sim.truth["interest"].to_numpy()
    )
    assert (sim.truth.groupby("user")["interest"].nunique() == 1).all()
    assert not consecutive(sim, "category").any()


def test_drift_changes_categories_at_its_rate():
    sim = simulate(roomy(drift=0.3, noise=0.0))
    changed = consecutive(sim, "category")
    assert 0.25 <= changed.mean() <= 0.35  # measured 0.30
    np.testing.assert_array_equal(changed, consecutive(sim, "interest", frame="truth"))


def test_drift_moves_only_to_neighbours(tiny):
    c = tiny.config
    t = tiny.transition
    assert t.shape == (c.n_categories, c.n_categories)
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    assert ((t > 0).sum(axis=1) == 2 * c.drift_width).all()
    assert (np.diag(t) == 0).all()
    interest, users = tiny.truth["interest"].to_numpy(), tiny.truth["user"].to_numpy()
    moved = (users[1:] == users[:-1]) & (interest[1:] != interest[:-1])
    assert moved.sum() > 100
    assert (t[interest[:-1][moved], interest[1:][moved]] > 0).all()


def test_stronger_drift_makes_the_last_click_more_informative_than_the_history():
    """Predict each click's interest from the history: the most frequent
    earlier category wins without drift; with drift the latest click gains."""

    def accuracies(drift: float) -> tuple[float, float]:
        sim = simulate(SimulationConfig.tiny(drift=drift, noise=0.1, seed=3))
        f = sim.log.frame.assign(interest=sim.truth["interest"])
        last_hits = majority_hits = total = 0
        for _, g in f.groupby("user"):  # a test may loop; the simulator may not
            cats, target = g["category"].to_numpy(), g["interest"].to_numpy()
            for k in range(4, len(g)):
                values, counts = np.unique(cats[:k], return_counts=True)
                majority_hits += values[np.argmax(counts)] == target[k]
                last_hits += cats[k - 1] == target[k]
                total += 1
        return last_hits / total, majority_hits / total

    last_still, majority_still = accuracies(0.0)
    last_drift, majority_drift = accuracies(0.4)
    assert majority_still >= last_still  # no drift: the history's mode is best
    assert last_drift > majority_drift  # drift: recency is best


# --- configuration -----------------------------------------------------------


def test_presets():
    assert SimulationConfig.default() == SimulationConfig()
    assert SimulationConfig.tiny().n_users == 300
    big = SimulationConfig.electronics_size()
    assert (big.n_users, big.n_items, big.n_categories) == (192_403, 63_001, 801)
    assert SimulationConfig.tiny(seed=7).seed == 7
    assert dataclasses.replace(SimulationConfig(), drift=0.5).drift == 0.5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_items": 5, "n_categories": 10}, "n_items"),
        ({"drift": -0.1}, "drift"),
        ({"drift": 1.5}, "drift"),
        ({"noise": 1.2}, "noise"),
        ({"n_users": 0}, "n_users"),
        ({"n_categories": 1}, "n_categories"),
        ({"n_categories": 4, "drift_width": 2}, "drift_width"),
        ({"min_history": 10, "max_history": 5}, "max_history"),
        ({"n_items": 100, "max_history": 60}, "max_history"),
        ({"item_exponent": -1.0}, "item_exponent"),
        ({"history_tail": 0.0}, "history_tail"),
        ({"time_end": 0}, "time_end"),
        ({"mean_gap_days": 0.0}, "mean_gap_days"),
        ({"n_users": 2.5}, "n_users"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"SimulationConfig\.{field}\b"):
        SimulationConfig(**overrides)
