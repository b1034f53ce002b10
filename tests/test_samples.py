"""Tests of the behaviour log checks and the DIEN sample builder.

Every log here is built by hand (or by a small seeded generator below) and
passed through :func:`validate_log`, so the tests do not depend on the
Amazon loaders or the simulator.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from dien_tutorial.data.log import LOG_COLUMNS, DataFormatError, validate_log
from dien_tutorial.data.samples import (
    PAD,
    UNK,
    Batch,
    Vocabulary,
    build_samples,
    collate,
    sample_negatives,
)

DAY = 86_400
BATCH_FIELDS = Batch._fields


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def make_log(rows, source="hand-made log"):
    """A validated log from (user, item, category, time, order) tuples."""
    return validate_log(pd.DataFrame(rows, columns=list(LOG_COLUMNS)), source)


def random_frame(n_users, n_items, seed, max_clicks=30, days=10, string_ids=False):
    """A random log frame with many same-day clicks.

    Each user clicks 1..max_clicks distinct items on one of ``days`` days
    (so equal timestamps are common); item ``i`` has category ``i % 7``.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for u in range(n_users):
        n = int(rng.integers(1, max_clicks + 1))
        items = rng.choice(n_items, size=n, replace=False)
        times = np.sort(rng.integers(0, days, size=n)) * DAY
        parts.append(pd.DataFrame({
            "user": u, "item": items, "category": items % 7,
            "time": times, "order": np.arange(n),
        }))
    frame = pd.concat(parts, ignore_index=True)
    if string_ids:
        for col in ("user", "item", "category"):
            frame[col] = col[0] + frame[col].astype(str)
    # Shuffle the rows: validate_log must restore the order.
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def build_quiet(log, **kwargs):
    """build_samples, ignoring the single-behaviour warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_samples(log, **kwargs)


def split_codes(frame):
    """Per row of a validated frame: 0 train, 1 valid, 2 test target (users with >= 2 rows).

    Rows of single-behaviour users get -1.
    """
    pos = frame.groupby("user", sort=False).cumcount().to_numpy()
    size = frame.groupby("user", sort=False)["user"].transform("size").to_numpy()
    code = np.where(pos == size - 1, 2, np.where(pos == size - 2, 1, 0))
    return np.where(size >= 2, code, -1)


def window_rows(split, i):
    """Log rows of sample ``i``'s history, oldest first."""
    start = int(split.hist_start[i])
    return np.arange(start, start + int(split.hist_len[i]))


def as_bytes(batch):
    """Every field of a Batch as (dtype, shape, raw bytes)."""
    return {
        name: (t.dtype, tuple(t.shape), t.numpy().tobytes())
        for name, t in zip(BATCH_FIELDS, batch)
    }


# ---------------------------------------------------------------------------
# Padding and batching
# ---------------------------------------------------------------------------


@pytest.fixture
def long_user_samples():
    """User 1 has 53 behaviours on distinct days, user 2 has 40.

    User 1's items are 1000 + k at step k, category k % 4; the training
    targets of user 1 are steps 0..50, so item 1000 + k has code k + 2.
    User 2's items (2000 + k) leave user 1 unclicked items to draw
    negatives from.
    """
    rows = [(1, 1000 + k, k % 4, k * DAY, 0) for k in range(53)]
    rows += [(2, 2000 + k, 9, k * DAY, 0) for k in range(40)]
    return build_samples(make_log(rows), max_len=50)


def _train_index(samples, user_code, step):
    """Index of the positive train sample of ``user_code`` whose target is at ``step * DAY``."""
    d = samples.splits["train"]
    hit = np.flatnonzero((d.user == user_code) & (d.time == step * DAY) & (d.label == 1))
    assert len(hit) == 1
    return int(hit[0])


def test_histories_of_length_0_1_2_50_in_one_batch(long_user_samples):
    s = long_user_samples
    assert list(s.user_ids) == [1, 2]
    index = [_train_index(s, 0, step) for step in (0, 1, 2, 50)]
    ds = s.dataset("train")

    direct = ds.batch(index)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=index, collate_fn=collate)
    via_loader = next(iter(loader))

    for b in (direct, via_loader):
        assert b.length.tolist() == [0, 1, 2, 50]
        for name in ("hist_item", "hist_cate", "neg_hist_item", "neg_hist_cate"):
            t = getattr(b, name)
            assert t.shape == (4, 50) and t.dtype == torch.int64
            assert (t[~b.mask] == PAD).all(), name
            assert (t[b.mask] >= 2).all(), name  # every real step is a known id
        assert b.mask.sum(dim=1).tolist() == [0, 1, 2, 50]
        assert b.label.tolist() == [1.0, 1.0, 1.0, 1.0]
        # Target at step k: item 1000 + k -> code k + 2.
        assert b.item.tolist() == [2, 3, 4, 52]
        # History of the target at step k: steps 0..k-1, oldest first.
        for row, k in enumerate((0, 1, 2, 50)):
            assert b.hist_item[row, :k].tolist() == [j + 2 for j in range(k)]
            cats = s.cate_vocab.encode(np.arange(k) % 4)[0]
            assert b.hist_cate[row, :k].tolist() == cats.tolist()
    assert as_bytes(direct) == as_bytes(via_loader)


def test_history_truncated_to_most_recent_max_len(long_user_samples):
    s = long_user_samples
    valid = s.splits["valid"]
    first = int(np.flatnonzero(valid.user == 0)[0])  # user 1's validation target: step 51
    assert valid.time[first] == 51 * DAY
    b = s.dataset("valid").batch([first])
    # 51 earlier steps; the 50 most recent are steps 1..50.
    assert b.length.tolist() == [50]
    assert b.hist_item[0].tolist() == [k + 2 for k in range(1, 51)]


def test_batch_of_only_empty_histories_has_width_one(long_user_samples):
    s = long_user_samples
    i = _train_index(s, 0, 0)
    for b in (s.dataset("train").batch([i, i + 1]),
              collate([s.dataset("train")[i], s.dataset("train")[i + 1]])):
        assert b.hist_item.shape == (2, 1)
        assert b.hist_item.tolist() == [[0], [0]] and b.length.tolist() == [0, 0]


def test_batches_cover_the_split_once(long_user_samples):
    ds = long_user_samples.dataset("train")
    for shuffle in (False, True):
        seen = torch.cat([torch.stack([b.user, b.item, b.label.long()], dim=1)
                          for b in ds.batches(batch_size=7, shuffle=shuffle, seed=3)])
        assert len(seen) == len(ds)
        full = ds.batch(np.arange(len(ds)))
        want = torch.stack([full.user, full.item, full.label.long()], dim=1)
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, want.tolist()))


# ---------------------------------------------------------------------------
# Negative sampling
# ---------------------------------------------------------------------------


def test_sample_negatives_10000_draws_avoid_click_sets_and_repeat_by_seed():
    rng = np.random.default_rng(7)
    n_users, n_items, n_draws = 100, 50, 10_000
    # Each user clicked 20 of the 50 items: 40% of candidates get rejected.
    clicked_items = [rng.choice(n_items, size=20, replace=False) for _ in range(n_users)]
    clicked = np.sort(np.concatenate(
        [u * n_items + items for u, items in enumerate(clicked_items)]))
    pool = np.arange(n_items)
    keys = rng.integers(0, 2**63, size=n_draws, dtype=np.uint64)
    row_user = rng.integers(0, n_users, size=n_draws)

    out = sample_negatives(keys, row_user, clicked, pool, n_items, seed=0, stream=1)
    assert out.shape == (n_draws,) and out.dtype == np.int64
    assert np.isin(out, pool).all()
    assert not np.isin(row_user * n_items + out, clicked).any()

    again = sample_negatives(keys, row_user, clicked, pool, n_items, seed=0, stream=1)
    other_seed = sample_negatives(keys, row_user, clicked, pool, n_items, seed=1, stream=1)
    other_stream = sample_negatives(keys, row_user, clicked, pool, n_items, seed=0, stream=2)
    assert np.array_equal(out, again)
    # 30 allowed items per user: two independent draws agree ~1/30 of the time.
    assert (out != other_seed).mean() > 0.9
    assert (out != other_stream).mean() > 0.9
    # A draw does not depend on the other draws of the call.
    part = sample_negatives(keys[::3], row_user[::3], clicked, pool, n_items, seed=0, stream=1)
    assert np.array_equal(part, out[::3])


def test_sample_negatives_is_uniform_over_the_pool():
    n = 10_000
    keys = np.arange(n, dtype=np.uint64)
    pool = np.arange(10, 20)  # item codes 10..19
    clicked = np.array([5], dtype=np.int64)  # user 0 clicked item 5, outside the pool
    out = sample_negatives(keys, np.zeros(n, dtype=np.int64), clicked, pool, 20, seed=0, stream=1)
    counts = np.bincount(out, minlength=20)[10:]
    # Binomial(10000, 0.1): sd = 30, so 150 is five standard deviations.
    assert np.abs(counts - 1000).max() < 150


def test_sample_negatives_gives_up_when_a_user_clicked_the_whole_pool():
    pool = np.arange(4)
    clicked = np.arange(4, dtype=np.int64)  # user 0 clicked items 0..3
    with pytest.raises(ValueError, match="clicked every item that can be a negative"):
        sample_negatives(np.arange(3, dtype=np.uint64), np.zeros(3, dtype=np.int64),
                         clicked, pool, 4, seed=0, stream=1, max_attempts=8)


def test_sample_negatives_finds_the_last_unclicked_item():
    """A user who clicked 99 of 100 pool items still gets the one left, every time."""
    pool = np.arange(100)
    clicked = np.array([i for i in range(100) if i != 37], dtype=np.int64)  # user 0
    draws = sample_negatives(np.arange(50, dtype=np.uint64), np.zeros(50, dtype=np.int64),
                             clicked, pool, 100, seed=0, stream=1, max_attempts=2)
    np.testing.assert_array_equal(draws, np.full(50, 37))


@pytest.fixture(scope="module")
def dense_log():
    """1,000 users x 12 clicks out of 60 items: 10,000 training targets.

    Every user clicked 20% of the catalogue, so many candidate negatives are
    rejected and redrawn.
    """
    rng = np.random.default_rng(11)
    rows = []
    for u in range(1000):
        for k, item in enumerate(rng.choice(60, size=12, replace=False)):
            rows.append((u, int(item), int(item) % 5, k * DAY, 0))
    return make_log(rows, "dense log")


def test_built_negatives_over_10000_targets_avoid_click_sets(dense_log):
    s = build_samples(dense_log, max_len=50, seed=0)
    f = dense_log.frame
    assert len(s.splits["train"]) == 2 * 10_000
    click_pairs = set(zip(f["user"], f["item"]))

    n_target_draws = 0
    for name, d in s.splits.items():
        neg = d.label == 0
        users = s.user_ids[d.user[neg]]
        items = s.item_vocab.decode(d.item[neg])
        assert not any(pair in click_pairs for pair in zip(users, items)), name
        # The positive target is in the click set, so in particular never the negative.
        assert (d.item[neg] != d.item[~neg]).all()
        n_target_draws += int(neg.sum())
    assert n_target_draws == 12_000

    # Aux negatives: one per behaviour, never the item clicked at that step,
    # never any item of the user's click set.
    aux = s.item_vocab.decode(s.beh_neg_item)
    assert len(aux) == len(f) == 12_000
    assert (aux != f["item"].to_numpy()).all()
    assert not any(pair in click_pairs for pair in zip(f["user"], aux))
    assert np.array_equal(s.beh_neg_cate, s.cate_vocab.encode(aux % 5)[0])


def test_built_negatives_repeat_with_the_seed(dense_log):
    a = build_samples(dense_log, seed=0)
    b = build_samples(dense_log, seed=0)
    c = build_samples(dense_log, seed=1)
    assert np.array_equal(a.beh_neg_item, b.beh_neg_item)
    for name in a.splits:
        assert np.array_equal(a.splits[name].item, b.splits[name].item)
    assert (a.beh_neg_item != c.beh_neg_item).mean() > 0.9
    neg = a.splits["train"].label == 0
    assert (a.splits["train"].item[neg] != c.splits["train"].item[neg]).mean() > 0.9


# ---------------------------------------------------------------------------
# Time order and leakage
# ---------------------------------------------------------------------------


def test_same_day_clicks_never_see_each_other():
    # User u: day 1, then three clicks on day 2, then day 3. User v only
    # brings items that u never clicked, so u's negatives can be drawn.
    rows = [("u", f"i{k}", "c", t * DAY, k) for k, t in enumerate([1, 2, 2, 2, 3])]
    rows += [("v", f"v{k}", "c", k * DAY, 0) for k in range(20)]
    s = build_samples(make_log(rows), max_len=10)
    assert s.user_ids[0] == "u"
    pos = {name: d.hist_len[(d.label == 1) & (d.user == 0)].tolist()
           for name, d in s.splits.items()}
    assert pos == {"train": [0, 1, 1], "valid": [1], "test": [4]}
    test = s.dataset("test").batch([0])
    assert s.item_vocab.decode(test.hist_item[0, :3].numpy()).tolist() == ["i0", "i1", "i2"]
    assert test.hist_item[0, 3].item() == UNK  # i3 (the valid target) is not in training


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_every_history_step_is_strictly_earlier_than_its_target(max_len):
    log = make_log(random_frame(150, 80, seed=5, max_clicks=40, days=8))
    f = log.frame
    s = build_quiet(log, max_len=max_len)
    user_raw = f["user"].to_numpy()
    times = f["time"].to_numpy()
    assert np.array_equal(s.beh_time, times)
    n_ties = 0
    for name, d in s.splits.items():
        for i in range(len(d)):
            rows = window_rows(d, i)
            target_time = d.time[i]
            user = s.user_ids[d.user[i]]
            assert (s.beh_time[rows] < target_time).all()
            assert (user_raw[rows] == user).all()
            # The window is the most recent max_len strictly earlier behaviours.
            earlier = np.flatnonzero((user_raw == user) & (times < target_time))
            assert rows.tolist() == earlier[-max_len:].tolist() if len(earlier) else rows.size == 0
            n_ties += int(((user_raw == user) & (times == target_time)).sum() > 1)
    assert n_ties > 100  # the log really has same-day clicks


def test_changing_a_later_behaviour_leaves_earlier_samples_byte_identical():
    """Replacing a user's test target leaves every other sample unchanged.

    Conditions of the experiment:

    * The changed behaviour is user U's last one (the test target), so it
      is after every other sample of U and belongs to no training target:
      the training vocabularies stay the same.
    * Before the change its item X is clicked by U only, so after the
      change X leaves the log altogether; X is the smallest id, so the
      internal item codes of all other items shift; the samples must not
      depend on that.
    * The replacement Y is an existing training item (so it can be drawn as
      a negative) that U never clicked, with Y's own category.
    * Negatives are drawn outside the user's whole click set, future clicks
      included, so the change of click set could change U's negatives. It
      does not when Y is not among U's negatives before the change and X is
      not among them after; the test checks both and then asserts that the
      result is the same. (Under these conditions a redraw sequence sees
      exactly the same accept/reject decisions.)
    """
    frame = validate_log(random_frame(120, 60, seed=3, max_clicks=25), "before").frame
    sizes = frame.groupby("user")["user"].transform("size")
    user = int(frame.loc[sizes >= 8, "user"].iloc[0])
    last = int(np.flatnonzero(frame["user"].to_numpy() == user)[-1])
    frame.loc[last, ["item", "category"]] = [-1, 6]  # X = -1: clicked by U only, smallest id
    before = make_log(frame, "before")
    s0 = build_quiet(before, max_len=5)
    u = int(np.searchsorted(s0.user_ids, user))

    def negatives_of_u(s):
        rows = np.flatnonzero(frame["user"].to_numpy() == user)
        found = set(s.item_vocab.decode(s.beh_neg_item[rows]).tolist())
        for d in s.splits.values():
            found |= set(s.item_vocab.decode(d.item[(d.user == u) & (d.label == 0)]).tolist())
        return found

    clicked_by_u = set(frame.loc[frame["user"] == user, "item"])
    for y in s0.item_vocab.ids:  # existing training items, in order
        if y in clicked_by_u or y in negatives_of_u(s0):
            continue
        changed = frame.copy()
        changed.loc[last, ["item", "category"]] = [y, y % 7]
        s1 = build_quiet(make_log(changed, "after"), max_len=5)
        if -1 not in negatives_of_u(s1):
            break
    else:
        pytest.fail("no replacement item satisfies the conditions")

    assert s1.item_vocab.ids.equals(s0.item_vocab.ids)
    assert s1.cate_vocab.ids.equals(s0.cate_vocab.ids)
    for name in ("train", "valid", "test"):
        d = s0.splits[name]
        keep = np.flatnonzero(~((d.user == u) & (name == "test")))
        assert len(keep) > 0
        b0 = s0.dataset(name).batch(keep)
        b1 = s1.dataset(name).batch(keep)
        assert as_bytes(b0) == as_bytes(b1), name
        for i in keep[:: max(1, len(keep) // 50)]:  # and item by item, unpadded
            x0, x1 = s0.dataset(name)[i], s1.dataset(name)[i]
            assert all(torch.equal(x0[k], x1[k]) for k in x0), (name, i)
    # The changed sample itself did change.
    t = np.flatnonzero((s0.splits["test"].user == u) & (s0.splits["test"].label == 1))
    assert s0.splits["test"].item[t] != s1.splits["test"].item[t]


# ---------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------


def test_split_by_timeline_and_single_behaviour_users():
    rows = [("a", f"a{k}", "c", k * DAY, 0) for k in range(5)]
    rows += [("b", "b0", "c", 0, 0), ("b", "b1", "c", DAY, 0)]
    rows += [("c", "c0", "c", 0, 0)]
    rows += [("d", f"d{k}", "c", k * DAY, 0) for k in range(10)]
    with pytest.warns(UserWarning, match="1 user\\(s\\) with a single behaviour"):
        s = build_samples(make_log(rows), max_len=10)
    assert s.counts["users_skipped_single_behaviour"] == 1
    assert list(s.user_ids) == ["a", "b", "c", "d"]

    def positives(name):
        d = s.splits[name]
        p = d.label == 1
        return list(zip(s.user_ids[d.user[p]], d.time[p] // DAY))

    assert positives("train") == [("a", 0), ("a", 1), ("a", 2)] + [("d", k) for k in range(8)]
    assert positives("valid") == [("a", 3), ("b", 0), ("d", 8)]  # b: two behaviours give valid + test
    assert positives("test") == [("a", 4), ("b", 1), ("d", 9)]
    assert not any((d.user == 2).any() for d in s.splits.values())  # user c nowhere


def test_no_warning_without_single_behaviour_users(dense_log):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = build_samples(dense_log)
    assert s.counts["users_skipped_single_behaviour"] == 0


def test_test_target_never_in_training_histories_or_targets():
    log = make_log(random_frame(200, 70, seed=9, max_clicks=30, days=6))
    f = log.frame
    s = build_quiet(log, max_len=50)
    code = split_codes(f)
    items = f["item"].to_numpy()
    user_raw = f["user"].to_numpy()
    test_item = dict(zip(user_raw[code == 2], items[code == 2]))
    valid_item = dict(zip(user_raw[code == 1], items[code == 1]))

    train = s.splits["train"]
    assert len(train) == 2 * int((code == 0).sum())
    for i in range(0, len(train), 2):
        user = s.user_ids[train.user[i]]
        seen = set(items[window_rows(train, i)])  # raw history items
        seen |= set(s.item_vocab.decode(train.item[i:i + 2]))  # positive and negative
        assert test_item[user] not in seen
        assert valid_item[user] not in seen
    # The test target is after every training target of the user.
    for i in range(0, len(train), 2):
        user = s.user_ids[train.user[i]]
        t_test = f.loc[(f["user"] == user), "time"].max()
        assert train.time[i] <= t_test


# ---------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------


def test_vocabulary_codes():
    v = Vocabulary.fit(np.array(["b", "a", "b", "c"]))
    assert list(v.ids) == ["a", "b", "c"] and len(v) == 5
    codes, n_unknown = v.encode(np.array(["c", "zz", "a", "yy", "b"]))
    assert codes.tolist() == [4, UNK, 2, UNK, 3] and n_unknown == 2
    assert codes.dtype == np.int64
    assert v.decode(np.array([2, 3, 4])).tolist() == ["a", "b", "c"]
    with pytest.raises(ValueError):
        v.decode(np.array([PAD]))
    with pytest.raises(ValueError):
        v.decode(np.array([UNK]))


def test_vocabularies_fit_on_training_targets_only():
    log = make_log(random_frame(200, 300, seed=1, max_clicks=12))
    f = log.frame
    s = build_quiet(log)
    code = split_codes(f)
    train_items = np.unique(f["item"].to_numpy()[code == 0])
    train_cates = np.unique(f["category"].to_numpy()[code == 0])
    assert s.item_vocab.ids.tolist() == train_items.tolist()
    assert s.cate_vocab.ids.tolist() == train_cates.tolist()
    # Real ids start at 2; 0 and 1 are never real ids.
    assert s.item_vocab.encode(train_items)[0].tolist() == list(range(2, len(train_items) + 2))
    assert s.beh_item[code == 0].min() >= 2
    for d in s.splits.values():
        assert d.item.min() >= UNK and d.cate.min() >= UNK
    # Every behaviour's category goes through the category vocabulary.
    assert np.array_equal(s.beh_cate, s.cate_vocab.encode(f["category"])[0])
    assert np.array_equal(s.beh_item, s.item_vocab.encode(f["item"])[0])
    # Items seen only in valid/test exist in this log, and map to UNK.
    unseen = ~np.isin(f["item"].to_numpy(), train_items)
    assert unseen.any()
    assert (s.beh_item[unseen] == UNK).all()


def test_unknown_ids_are_counted():
    rows = [
        ("a", "x1", "cx", 1, 0), ("a", "x2", "cx", 2, 0), ("a", "x3", "cx", 3, 0),
        ("a", "new_valid", "cx", 4, 0),          # valid target, unseen item
        ("a", "new_test", "c_new", 5, 0),        # test target, unseen item and category
        ("b", "x1", "cx", 1, 0), ("b", "x2", "cx", 2, 0), ("b", "x3", "cx", 3, 0),
        ("b", "x4", "cx", 4, 0),                 # valid target, unseen item
        ("b", "x1000", "cx", 5, 0),              # test target, unseen
        ("c", "x2", "cx", 1, 0), ("c", "x1", "cx", 2, 0), ("c", "x3", "cx", 3, 0),
        ("c", "x2000", "cx", 4, 0),              # valid target, unseen item
        ("c", "x2001", "cx", 5, 0),              # test target, unseen
        # d brings training items that a, b, c never clicked (their negatives).
        ("d", "y1", "cx", 1, 0), ("d", "y2", "cx", 2, 0), ("d", "y3", "cx", 3, 0),
        ("d", "y4", "cx", 4, 0), ("d", "x1", "cx", 5, 0), ("d", "x2", "cx", 6, 0),
    ]
    s = build_samples(make_log(rows), max_len=50)
    assert s.item_vocab.ids.tolist() == ["x1", "x2", "x3", "y1", "y2", "y3", "y4"]
    assert s.cate_vocab.ids.tolist() == ["cx"]
    assert s.counts["valid_unknown_target_items"] == 3
    assert s.counts["test_unknown_target_items"] == 3
    # Only the test histories hold the (unknown) validation targets.
    assert s.counts["valid_unknown_history_items"] == 0
    assert s.counts["test_unknown_history_items"] == 3
    test = s.splits["test"]
    pos = test.label == 1
    assert test.item[pos].tolist() == [UNK, UNK, UNK, 3]  # d's x2 is known: code 3
    assert test.cate[pos].tolist() == [UNK, 2, 2, 2]  # c_new is unseen, cx is code 2
    # Negatives are always real training items.
    for d in s.splits.values():
        assert (d.item[d.label == 0] >= 2).all()
    assert s.stats()["valid_unknown_target_items"] == 3


def test_string_ids_end_to_end():
    frame = random_frame(80, 40, seed=4, string_ids=True)
    log = make_log(frame)
    assert all(pd.api.types.is_string_dtype(log.frame[c]) for c in ("user", "item", "category"))
    s = build_quiet(log, max_len=20)
    f = log.frame
    assert all(str(u).startswith("u") for u in s.user_ids)
    ds = s.dataset("valid")
    b = ds.batch(np.arange(len(ds)))
    valid_rows = np.flatnonzero(split_codes(f) == 1)
    # Positives: the raw target item, user, and history read back from the codes.
    assert s.user_ids[b.user[::2].numpy()].tolist() == f["user"].to_numpy()[valid_rows].tolist()
    known_target = b.item[::2].numpy() >= 2
    assert (s.item_vocab.decode(b.item[::2].numpy()[known_target]).tolist()
            == f["item"].to_numpy()[valid_rows][known_target].tolist())
    for k in range(len(valid_rows)):
        i = 2 * k
        n = int(b.length[i])
        hist = f["item"].to_numpy()[window_rows(s.splits["valid"], i)]
        codes = b.hist_item[i, :n].numpy()
        known = codes >= 2
        assert s.item_vocab.decode(codes[known]).tolist() == hist[known].tolist()
        neg_raw = s.item_vocab.decode(b.item[i + 1:i + 2].numpy())[0]
        assert neg_raw.startswith("i")
        assert s.cate_vocab.decode(b.cate[i + 1:i + 2].numpy())[0] == "c" + str(int(neg_raw[1:]) % 7)


# ---------------------------------------------------------------------------
# Positive / negative pairs
# ---------------------------------------------------------------------------


def test_positives_and_negatives_alternate_and_share_history(dense_log):
    s = build_samples(dense_log, max_len=5)
    for name, d in s.splits.items():
        assert d.label.dtype == np.float32
        assert d.label[0::2].tolist() == [1.0] * (len(d) // 2)
        assert d.label[1::2].tolist() == [0.0] * (len(d) // 2)
        for field in ("user", "hist_start", "hist_len", "time"):
            a = getattr(d, field)
            assert np.array_equal(a[0::2], a[1::2]), (name, field)
        assert (d.item[0::2] != d.item[1::2]).all()
        b = s.dataset(name).batch(np.arange(len(d)))
        for field in ("hist_item", "hist_cate", "neg_hist_item", "neg_hist_cate", "length"):
            t = getattr(b, field)
            assert torch.equal(t[0::2], t[1::2]), (name, field)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_bad_arguments(long_user_samples, dense_log):
    with pytest.raises(ValueError, match="max_len"):
        build_samples(dense_log, max_len=0)
    ds = long_user_samples.dataset("test")
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds[-len(ds) - 1]
    assert torch.equal(ds[-1]["item"], ds[len(ds) - 1]["item"])
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(batch_size=0))
    with pytest.raises(KeyError):
        long_user_samples.dataset("training")


def test_no_user_with_three_behaviours_names_the_source():
    rows = [("a", "x", "c", 1, 0), ("a", "y", "c", 2, 0), ("b", "x", "c", 1, 0)]
    log = make_log(rows, source="tiny.csv")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="tiny.csv"):
        build_samples(log)


# ---------------------------------------------------------------------------
# validate_log
# ---------------------------------------------------------------------------


def _frame(**overrides):
    base = {
        "user": [1, 1, 2], "item": [10, 11, 10], "category": [5, 6, 5],
        "time": [100, 200, 100], "order": [0, 1, 0],
    }
    base.update(overrides)
    return pd.DataFrame(base)


def test_validate_log_missing_column():
    with pytest.raises(DataFormatError, match=r"clicks\.csv.*'category'"):
        validate_log(_frame().drop(columns="category"), "clicks.csv")
    assert issubclass(DataFormatError, ValueError)


def test_validate_log_null_id():
    with pytest.raises(DataFormatError, match=r"src: column 'item' is empty at row 1"):
        validate_log(_frame(item=["a", None, "b"]), "src")
    with pytest.raises(DataFormatError, match=r"column 'user' is empty at row 2"):
        validate_log(_frame(user=[1.0, 2.0, np.nan]), "src")


def test_validate_log_time_must_be_integer():
    with pytest.raises(DataFormatError, match=r"src: column 'time' must hold integers"):
        validate_log(_frame(time=[1.0, 2.0, 3.0]), "src")
    with pytest.raises(DataFormatError, match="'order'"):
        validate_log(_frame(order=["0", "1", "0"]), "src")


def test_validate_log_float_ids():
    with pytest.raises(DataFormatError, match=r"src: column 'item' holds a non-integer number \S*10\.5"):
        validate_log(_frame(item=[10.0, 10.5, 11.0]), "src")
    log = validate_log(_frame(item=[10.0, 11.0, 10.0]), "src")  # whole numbers are fine
    assert log.frame["item"].dtype == np.int64
    assert log.frame["item"].tolist() == [10, 11, 10]


def test_validate_log_item_with_two_categories():
    with pytest.raises(DataFormatError, match=r"src: item \S*10\S* has 2 categories"):
        validate_log(_frame(category=[5, 6, 7]), "src")
    with pytest.raises(DataFormatError, match=r"item 'B00X'"):
        validate_log(_frame(item=["B00X", "B00Y", "B00X"], category=["c1", "c2", "c3"]), "src")


def test_validate_log_drops_duplicates_and_repeats_with_a_warning():
    frame = pd.DataFrame({
        "user": [1, 1, 1, 1, 2, 2],
        "item": [10, 10, 11, 10, 10, 12],
        "category": [5, 5, 6, 5, 5, 7],
        "time": [100, 100, 200, 300, 50, 60],  # rows 0/1 exact duplicates; row 3 repeats (1, 10)
        "order": [0, 0, 0, 0, 0, 0],
    })
    with pytest.warns(UserWarning, match="src: dropped"):
        log = validate_log(frame, "src")
    assert log.report.dropped == {
        "duplicate rows (same user, item, time)": 1,
        "repeated (user, item) pairs, later clicks": 1,
    }
    assert log.report.rows_read == 6
    f = log.frame
    assert list(f.columns) == list(LOG_COLUMNS)
    assert f[["user", "item", "time"]].values.tolist() == [
        [1, 10, 100], [1, 11, 200], [2, 10, 50], [2, 12, 60]]  # earliest click kept
    assert log.stats() == {"users": 2, "items": 3, "categories": 3, "interactions": 4}


def test_validate_log_clean_input_has_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = validate_log(_frame(), "src")
    assert log.report.dropped == {}


def test_validate_log_sorts_by_user_time_order():
    frame = pd.DataFrame({
        "user": ["b", "a", "a", "a", "a"],
        "item": ["p", "x", "y", "z", "w"],
        "category": ["c"] * 5,
        "time": [5, 30, 10, 10, 10],   # three same-time clicks of user a, unsorted
        "order": [0, 0, 2, 0, 1],
    })
    f = validate_log(frame, "src").frame
    assert f["item"].tolist() == ["z", "w", "y", "x", "p"]
    assert f["time"].tolist() == [10, 10, 10, 30, 5]
    assert f.index.equals(pd.RangeIndex(5))
    assert f["time"].dtype == np.int64 and f["order"].dtype == np.int64


def test_validate_log_empty_frame():
    with pytest.raises(DataFormatError, match="src: the log has no rows"):
        validate_log(_frame().iloc[:0], "src")


# ---------------------------------------------------------------------------
# Values int64 cannot hold, huge max_len, and errors naming raw ids
# ---------------------------------------------------------------------------


def test_validate_log_float_ids_must_be_finite_and_exact():
    # Cast blindly, 1e19 would become int64's minimum and inf an error without a row.
    for bad, shown, row in [
        ([10.0, 1e19, 11.0], r"1e\+19", 1),
        ([np.inf, 10.0, 11.0], "inf", 0),
        ([10.0, 11.0, -np.inf], "-inf", 2),
        ([10.0, 11.0, 2.0**53 + 2], "9007199254740994.0", 2),
    ]:
        with pytest.raises(DataFormatError, match=rf"src: column 'item' holds {shown} at row {row};"):
            validate_log(_frame(item=bad), "src")
    log = validate_log(_frame(item=[2.0**53, -(2.0**53), 2.0**53]), "src")  # still exact
    assert log.frame["item"].tolist() == [2**53, -(2**53), 2**53]


@pytest.mark.parametrize("column", ["time", "order", "item"])
def test_validate_log_uint64_beyond_int64_is_refused(column):
    values = np.array([5, 2**63 + 5, 5], dtype=np.uint64)
    with pytest.raises(DataFormatError,
                       match=rf"src: column '{column}' holds {2**63 + 5} at row 1, which does not fit"):
        validate_log(_frame(**{column: values}), "src")
    fits = validate_log(_frame(time=np.array([100, 2**63 - 1, 100], dtype=np.uint64)), "src")
    assert fits.frame["time"].tolist() == [100, 2**63 - 1, 100]


@pytest.mark.parametrize("column", ["time", "order"])
def test_validate_log_nullable_integers_with_na_are_refused(column):
    values = pd.array([1, None, 0], dtype="Int64")
    with pytest.raises(DataFormatError, match=rf"src: column '{column}' is empty at row 1"):
        validate_log(_frame(**{column: values}), "src")
    log = validate_log(_frame(**{column: pd.array([1, 2, 0], dtype="Int64")}), "src")
    assert log.frame[column].dtype == np.int64


def _unknown_history_log():
    """Three users; the last two clicks of user 1 are items no training target has."""
    rows = [(0, 1, 0, 1, 0), (0, 2, 0, 2, 0), (0, 3, 0, 3, 0), (0, 4, 0, 4, 0),
            (1, 1, 0, 1, 0), (1, 2, 0, 2, 0), (1, 9, 0, 3, 0), (1, 10, 0, 4, 0),
            (2, 5, 0, 1, 0), (2, 6, 0, 2, 0), (2, 7, 0, 3, 0), (2, 8, 0, 4, 0)]
    return make_log(rows, source="tiny log")


@pytest.mark.parametrize("max_len", [2**63 - 1, 2**64, 10**30])
def test_max_len_beyond_the_log_length_means_no_limit(max_len):
    log = _unknown_history_log()
    full = build_samples(log, max_len=len(log.frame))
    huge = build_samples(log, max_len=max_len)
    assert huge.max_len == max_len
    # 2**63 - 1 used to wrap around in int64 and drop the test histories' unknown items.
    assert full.counts["test_unknown_history_items"] == 3
    assert huge.counts == full.counts
    for name in full.splits:
        for field_name, want in vars(full.splits[name]).items():
            np.testing.assert_array_equal(getattr(huge.splits[name], field_name), want)
    np.testing.assert_array_equal(huge.beh_neg_item, full.beh_neg_item)


def test_max_len_of_1e8_on_a_real_sized_log_is_quick(dense_log):
    # The windows counted for unknown history items are as wide as the
    # longest history, not max_len (10**8 columns took minutes and 10 GB).
    samples = build_quiet(dense_log, max_len=10**8)
    reference = build_quiet(dense_log, max_len=len(dense_log.frame))
    assert samples.counts == reference.counts


def test_user_who_clicked_every_item_is_named_by_raw_id_and_source():
    rows = [(f"u{u}", f"i{(u * 3 + k) % 10}", "c", k, 0) for u in range(4) for k in range(4)]
    rows += [("alice", f"i{i}", "c", 100 + i, 0) for i in range(10)]
    log = make_log(rows, source="clicks.csv")
    with pytest.raises(ValueError,
                       match=r"^clicks\.csv: user 'alice' clicked every item that can be a negative"):
        build_samples(log)


def test_sample_negatives_error_uses_raw_ids_when_given():
    with pytest.raises(ValueError, match=r"^user 70012 clicked every item"):
        sample_negatives(np.arange(2, dtype=np.uint64), np.zeros(2, dtype=np.int64),
                         np.arange(4, dtype=np.int64), np.arange(4), 4, seed=0, stream=1,
                         max_attempts=2, user_ids=np.array([70012]))
