"""From a behaviour log to DIEN training samples.

The steps, in the order :func:`build_samples` runs them:

1. **Timelines.** Each user's rows are already sorted by (time, order)
   (:func:`~dien_tutorial.data.log.validate_log` did that).
2. **Histories.** A target's history holds only behaviours *strictly
   earlier in time* than the target, truncated to the most recent
   ``max_len``. Two clicks on the same day (equal ``time``) never see each
   other, even though ``order`` says which came first: the data cannot prove
   that the first one was visible when the second was made.
3. **Leakage-free split by timeline.** A user's last behaviour is the test
   target, the one before it the validation target, earlier ones are
   training targets. Users with a single behaviour cannot give both a
   validation and a test target: they are skipped and counted.
4. **Vocabularies** are fitted on the training split only: index 0 is
   padding, 1 an id never seen in training, real ids start at 2.
5. **Negatives.** Every positive target gets a negative target with the
   same history: an item the user never clicked. For the auxiliary loss,
   every behaviour gets a sampled negative item the user never clicked
   (so never the item clicked at that step).

Samples do not copy their histories. Each sample stores where its history
starts in the sorted log and how long it is; :class:`DienDataset` gathers
the padded windows batch by batch. A 1.7M-row log therefore costs a few
hundred megabytes, not ``rows x max_len`` integers.

Randomness is *counter based*: the candidate negative for a behaviour is a
hash of (seed, user id, position in the user's timeline, attempt). So the
draws do not depend on how many other rows the log has, and the same seed
gives the same draws on any machine.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from dien_tutorial.data.log import BehaviourLog

PAD = 0  # padding index in every vocabulary
UNK = 1  # id not seen in the training split
FIRST_ID = 2  # first index of a real id

SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """A mapping from raw ids to indices: 0 padding, 1 unknown, 2.. real ids.

    Attributes:
        ids: the raw ids seen in training, sorted; ``ids[k]`` has index k + 2.
    """

    ids: pd.Index

    @classmethod
    def fit(cls, values: np.ndarray | pd.Series) -> "Vocabulary":
        """Build from training values (duplicates allowed)."""
        # Sorted, so the mapping does not depend on row order or counts.
        # Hash-based unique first: sorting only the distinct ids is much
        # faster than np.unique on millions of strings.
        return cls(ids=pd.Index(np.sort(pd.unique(np.asarray(values)))))

    def __len__(self) -> int:
        """Number of rows an embedding table needs (padding and unknown included)."""
        return len(self.ids) + FIRST_ID

    def encode(self, values: np.ndarray | pd.Series) -> tuple[np.ndarray, int]:
        """Map raw ids to indices.

        Returns:
            ``(codes, n_unknown)``: int64 codes of the same shape, with ids
            unseen in training mapped to :data:`UNK`, and how many were.
        """
        pos = self.ids.get_indexer(np.asarray(values))
        unknown = pos < 0
        codes = np.where(unknown, UNK, pos + FIRST_ID).astype(np.int64)
        return codes, int(unknown.sum())

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`encode` for real ids (codes >= 2)."""
        codes = np.asarray(codes)
        if (codes < FIRST_ID).any():
            raise ValueError("decode: padding (0) and unknown (1) have no raw id")
        return self.ids.to_numpy()[codes - FIRST_ID]


# ---------------------------------------------------------------------------
# Counter-based sampling
# ---------------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective scramble of uint64 values."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def _draw(keys: np.ndarray, seed: int, stream: int, attempt: int, n: int) -> np.ndarray:
    """Deterministic pseudo-random integers in [0, n), one per key."""
    with np.errstate(over="ignore"):
        salt = _mix64(np.array([seed, stream, attempt], dtype=np.uint64)
                      * np.uint64(0x9E3779B97F4A7C15))
        h = _mix64(keys ^ salt[0])
        h = _mix64(h ^ salt[1])
        h = _mix64(h ^ salt[2])
    # Multiply-shift maps 64 random bits to [0, n) with negligible bias.
    return ((h >> np.uint64(11)).astype(np.float64) * (n / 2.0**53)).astype(np.int64)


def sample_negatives(
    keys: np.ndarray,
    row_user: np.ndarray,
    clicked: np.ndarray,
    pool: np.ndarray,
    n_items: int,
    seed: int,
    stream: int,
    max_attempts: int = 32,
    user_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Draw one item per key that the key's user never clicked.

    Args:
        keys: uint64 [N], a stable random key per draw (user hash and position).
        row_user: int64 [N], user code of each draw.
        clicked: int64 sorted array of ``user_code * n_items + item_code``
            for every click in the log (the users' click sets).
        pool: int64 [P] item codes to draw from (uniformly).
        n_items: number of distinct item codes in the log.
        seed: random seed.
        stream: separates independent draws made from the same keys.
        max_attempts: random redraw rounds; draws still clicked after them
            pick among the user's unclicked pool items directly.
        user_ids: raw id of each user code, so that an error names the user
            as the data spells it; without it the message gives the code.

    Returns:
        int64 [N] item codes, none of them in its user's click set.

    Raises:
        ValueError: some user clicked every item of the pool.
    """
    out = np.empty(len(keys), dtype=np.int64)
    todo = np.arange(len(keys))
    for attempt in range(max_attempts):
        cand = pool[_draw(keys[todo], seed, stream, attempt, len(pool))]
        pair = row_user[todo] * n_items + cand
        hit = np.searchsorted(clicked, pair)
        hit = np.minimum(hit, len(clicked) - 1)
        taken = clicked[hit] == pair
        out[todo[~taken]] = cand[~taken]
        todo = todo[taken]
        if len(todo) == 0:
            return out
    # Rare: users who clicked most of the pool. Pick among their unclicked
    # pool items exactly (a loop over these few draws only).
    for i in todo:
        free = pool[~np.isin(row_user[i] * n_items + pool, clicked)]
        if len(free) == 0:
            code = int(row_user[i])
            if user_ids is None:
                who = f"user code {code}"
            else:
                raw = user_ids[code]
                who = f"user {raw.item() if isinstance(raw, np.generic) else raw!r}"
            raise ValueError(
                f"{who} clicked every item that can be a "
                "negative, so no negative can be drawn for them"
            )
        out[i] = free[_draw(keys[i:i + 1], seed, stream, max_attempts, len(free))[0]]
    return out


# ---------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------


@dataclass
class SplitSamples:
    """One split's samples. Every array has one entry per sample [N].

    Positive and negative samples alternate: rows 2k and 2k+1 share their
    history and differ in target and label.

    Attributes:
        user: user code (for GAUC, which groups by user).
        item: target item index (vocabulary code).
        cate: target category index.
        label: 1.0 for the clicked target, 0.0 for the sampled negative.
        hist_start: row in the sorted log where the history window starts.
        hist_len: number of history steps, 0..max_len.
        time: unix time of the target.
    """

    user: np.ndarray
    item: np.ndarray
    cate: np.ndarray
    label: np.ndarray
    hist_start: np.ndarray
    hist_len: np.ndarray
    time: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class DienSamples:
    """Everything the model needs: vocabularies, behaviours, split samples.

    Attributes:
        max_len: maximum history length.
        item_vocab, cate_vocab: fitted on the training split.
        beh_item, beh_cate: [R] indices of each behaviour of the sorted log.
        beh_neg_item, beh_neg_cate: [R] the aux-loss negative of each behaviour.
        beh_time: [R] unix time of each behaviour.
        splits: ``"train"``, ``"valid"``, ``"test"`` -> :class:`SplitSamples`.
        counts: what was skipped or mapped to unknown, by reason.
        user_ids: raw user id of each user code.
    """

    max_len: int
    item_vocab: Vocabulary
    cate_vocab: Vocabulary
    beh_item: np.ndarray
    beh_cate: np.ndarray
    beh_neg_item: np.ndarray
    beh_neg_cate: np.ndarray
    beh_time: np.ndarray
    splits: dict[str, SplitSamples]
    counts: dict[str, int] = field(default_factory=dict)
    user_ids: np.ndarray | None = None

    def dataset(self, split: str) -> "DienDataset":
        """A :class:`DienDataset` over one split."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; choose from {list(self.splits)}")
        return DienDataset(self, split)

    def stats(self) -> dict[str, object]:
        """Sample counts per split and history-length quantiles."""
        out: dict[str, object] = {}
        for name, s in self.splits.items():
            out[f"{name}_samples"] = len(s)
        lengths = self.splits["train"].hist_len[::2]
        qs = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
        if len(lengths):
            out["train_history_length_quantiles"] = {
                f"p{int(q * 100)}": float(np.quantile(lengths, q)) for q in qs
            }
        out["item_vocab"] = len(self.item_vocab)
        out["cate_vocab"] = len(self.cate_vocab)
        out.update(self.counts)
        return out


def _run_starts(*keys: np.ndarray) -> np.ndarray:
    """For sorted rows, the index of the first row of each row's run of equal keys."""
    n = len(keys[0])
    new = np.zeros(n, dtype=bool)
    new[0] = True
    for k in keys:
        new[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(new)
    return starts[np.cumsum(new) - 1]


def build_samples(
    log: BehaviourLog,
    max_len: int = 50,
    seed: int = 0,
    max_attempts: int = 32,
) -> DienSamples:
    """Build DIEN samples from a validated behaviour log.

    Args:
        log: output of a loader (sorted by user, time, order; no repeated pairs).
        max_len: keep at most this many most recent history steps. Any
            value above the log's length works and means "no limit"; it is
            stored as given in :attr:`DienSamples.max_len`.
        seed: seed of the negative sampling.
        max_attempts: redraw rounds of the negative sampler.

    Returns:
        A :class:`DienSamples`.

    Raises:
        ValueError: ``max_len`` < 1, no user has three behaviours (so there
            is no training target), or some user clicked every item that
            can be a negative (the message names the source and the user).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    f = log.frame
    n_rows = len(f)
    # No history is longer than the log, so a larger max_len changes nothing;
    # capping it keeps the int64 arithmetic below from overflowing (a Python
    # int of 2**63 or more cannot even be converted).
    window = min(max_len, n_rows)
    user_code, user_ids = pd.factorize(f["user"], sort=True)
    user_ids = user_ids.to_numpy()  # [U] raw id of each user code
    user_code = user_code.astype(np.int64)  # [R]
    item_code, item_ids = pd.factorize(f["item"], sort=True)
    item_code = item_code.astype(np.int64)  # [R]
    time = f["time"].to_numpy(np.int64)  # [R]

    # Position of each row in its user's timeline, and the user's length.
    user_start = _run_starts(user_code)  # [R]
    pos = np.arange(n_rows) - user_start  # [R]
    user_size = np.bincount(user_code)[user_code]  # [R]

    # History = strictly earlier rows: everything before the first row of
    # this row's (user, time) run, at most max_len of them.
    tie_start = _run_starts(user_code, time)  # [R]
    hist_start = np.maximum(user_start, tie_start - window)  # [R]
    hist_len = tie_start - hist_start  # [R]

    split = np.full(n_rows, -1, dtype=np.int8)  # -1 = not a target
    usable = user_size >= 2
    split[usable & (pos == user_size - 1)] = 2  # test
    split[usable & (pos == user_size - 2)] = 1  # valid
    split[usable & (pos < user_size - 2)] = 0  # train
    counts = {
        "users_skipped_single_behaviour": int((user_size == 1).sum()),
    }
    if counts["users_skipped_single_behaviour"]:
        warnings.warn(
            f"{counts['users_skipped_single_behaviour']:,} user(s) with a single "
            "behaviour were skipped: they cannot give both a validation and a test target",
            stacklevel=2,
        )
    train_rows = np.flatnonzero(split == 0)
    if len(train_rows) == 0:
        raise ValueError(
            f"{log.report.source}: no user has three or more behaviours, "
            "so there is no training target"
        )

    # Vocabularies from the training split only. Training histories hold
    # earlier training rows, so the training targets cover every id in it.
    item_vocab = Vocabulary.fit(f["item"].to_numpy()[train_rows])
    cate_vocab = Vocabulary.fit(f["category"].to_numpy()[train_rows])
    beh_item, _ = item_vocab.encode(f["item"])  # [R]
    beh_cate, _ = cate_vocab.encode(f["category"])  # [R]

    # Category of every item code, through the same training vocabulary.
    first_row_of_item = np.zeros(len(item_ids), dtype=np.int64)
    first_row_of_item[item_code[::-1]] = np.arange(n_rows)[::-1]
    cate_of_item = beh_cate[first_row_of_item]  # [I] indexed by item code
    vocab_of_item = beh_item[first_row_of_item]  # [I]

    # Negatives are drawn from the items known in training (uniformly) and
    # must lie outside the user's whole click set, future clicks included.
    pool = np.unique(item_code[train_rows])  # [P]
    n_items = len(item_ids)
    clicked = np.sort(user_code * n_items + item_code)  # [R]
    user_hash = pd.util.hash_array(user_ids)[user_code]  # [R] uint64
    with np.errstate(over="ignore"):
        row_key = _mix64(user_hash ^ _mix64(pos.astype(np.uint64)))  # [R]

    def negatives(rows: np.ndarray | slice, stream: int) -> np.ndarray:
        """sample_negatives for some rows, with errors naming the source."""
        try:
            return sample_negatives(row_key[rows], user_code[rows], clicked, pool, n_items,
                                    seed, stream, max_attempts, user_ids=user_ids)
        except ValueError as err:
            raise ValueError(f"{log.report.source}: {err}") from None

    aux_neg = negatives(slice(None), 1)
    beh_neg_item = vocab_of_item[aux_neg]  # [R]
    beh_neg_cate = cate_of_item[aux_neg]  # [R]

    splits: dict[str, SplitSamples] = {}
    for k, name in enumerate(SPLITS):
        rows = np.flatnonzero(split == k)  # [N/2]
        neg = negatives(rows, 2)
        tgt_item = np.stack([beh_item[rows], vocab_of_item[neg]], axis=1).ravel()  # [N]
        tgt_cate = np.stack([beh_cate[rows], cate_of_item[neg]], axis=1).ravel()  # [N]
        label = np.tile(np.array([1.0, 0.0], dtype=np.float32), len(rows))  # [N]
        both = np.repeat(rows, 2)  # [N]
        splits[name] = SplitSamples(
            user=user_code[both],
            item=tgt_item,
            cate=tgt_cate,
            label=label,
            hist_start=hist_start[both],
            hist_len=hist_len[both],
            time=time[both],
        )
        if name != "train":
            # Ids first seen after training map to UNK: count them.
            counts[f"{name}_unknown_target_items"] = int((beh_item[rows] == UNK).sum())
            # As wide as the longest of these histories, not max_len: a
            # max_len of 10**8 must not allocate rows x 10**8 integers.
            win = _windows(hist_start[rows], hist_len[rows],
                           int(hist_len[rows].max(initial=0)))
            counts[f"{name}_unknown_history_items"] = int(
                ((beh_item[np.where(win >= 0, win, 0)] == UNK) & (win >= 0)).sum()
            )

    return DienSamples(
        max_len=max_len,
        item_vocab=item_vocab,
        cate_vocab=cate_vocab,
        beh_item=beh_item,
        beh_cate=beh_cate,
        beh_neg_item=beh_neg_item,
        beh_neg_cate=beh_neg_cate,
        beh_time=time,
        splits=splits,
        counts=counts,
        user_ids=user_ids,
    )


def _windows(start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """Row indices of history windows, right-padded with -1: int64 [N, width]."""
    steps = np.arange(width)  # [T]
    idx = start[:, None] + steps[None, :]  # [N, T]
    return np.where(steps[None, :] < length[:, None], idx, -1)


# ---------------------------------------------------------------------------
# PyTorch side
# ---------------------------------------------------------------------------


class Batch(NamedTuple):
    """A padded batch. B = batch size, T = longest history in the batch (>= 1).

    History tensors are right-padded with 0 (valid steps first), so
    ``mask = arange(T) < length``.
    """

    user: torch.Tensor  # [B] int64, user code (for GAUC)
    item: torch.Tensor  # [B] int64, target item
    cate: torch.Tensor  # [B] int64, target category
    label: torch.Tensor  # [B] float32
    hist_item: torch.Tensor  # [B, T] int64
    hist_cate: torch.Tensor  # [B, T] int64
    neg_hist_item: torch.Tensor  # [B, T] int64, aux-loss negatives
    neg_hist_cate: torch.Tensor  # [B, T] int64
    length: torch.Tensor  # [B] int64, true history length

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] bool, True on valid history steps."""
        steps = torch.arange(self.hist_item.shape[1])
        return steps[None, :] < self.length[:, None]


class DienDataset(torch.utils.data.Dataset):
    """One split of :class:`DienSamples` as a PyTorch dataset.

    ``dataset[i]`` is one sample (a dict of tensors, history unpadded);
    :func:`collate` pads a list of them. :meth:`batch` builds a whole batch
    from an index array in one vectorised step; prefer it for training.
    """

    def __init__(self, samples: DienSamples, split: str):
        self.samples = samples
        self.split = split
        self.data = samples.splits[split]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        d, s = self.data, self.samples
        rows = slice(d.hist_start[i], d.hist_start[i] + d.hist_len[i])
        return {
            "user": torch.tensor(d.user[i]),
            "item": torch.tensor(d.item[i]),
            "cate": torch.tensor(d.cate[i]),
            "label": torch.tensor(d.label[i]),
            "hist_item": torch.from_numpy(s.beh_item[rows].copy()),  # [L]
            "hist_cate": torch.from_numpy(s.beh_cate[rows].copy()),  # [L]
            "neg_hist_item": torch.from_numpy(s.beh_neg_item[rows].copy()),  # [L]
            "neg_hist_cate": torch.from_numpy(s.beh_neg_cate[rows].copy()),  # [L]
            "length": torch.tensor(int(d.hist_len[i])),
        }

    def batch(self, index: np.ndarray | Sequence[int]) -> Batch:
        """Gather samples ``index`` into a padded :class:`Batch`."""
        index = np.asarray(index, dtype=np.int64)
        d, s = self.data, self.samples
        length = d.hist_len[index]  # [B]
        width = max(int(length.max(initial=0)), 1)
        steps = np.arange(width)  # [T]
        valid = steps < length[:, None]  # [B, T]
        # Only the valid slots are read from the log and written; most of a
        # batch is padding (88% for Amazon Toys at T = 50), which stays 0.
        rows = (d.hist_start[index][:, None] + steps)[valid]  # [P]: log rows of the valid slots
        slots = np.flatnonzero(valid)  # [P]: their positions in the flattened [B * T]

        def gather(values: np.ndarray) -> torch.Tensor:
            out = np.zeros(len(index) * width, dtype=values.dtype)  # [B * T]
            out[slots] = values[rows]
            return torch.from_numpy(out.reshape(len(index), width))  # [B, T]

        return Batch(
            user=torch.from_numpy(d.user[index]),
            item=torch.from_numpy(d.item[index]),
            cate=torch.from_numpy(d.cate[index]),
            label=torch.from_numpy(d.label[index]),
            hist_item=gather(s.beh_item),
            hist_cate=gather(s.beh_cate),
            neg_hist_item=gather(s.beh_neg_item),
            neg_hist_cate=gather(s.beh_neg_cate),
            length=torch.from_numpy(length),
        )

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0):
        """Yield :class:`Batch` objects covering the split once.

        Args:
            batch_size: samples per batch (the last one may be smaller).
            shuffle: visit samples in a random order drawn from ``seed``.
            seed: seed of the shuffle; pass the epoch number to vary it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(self))
        for lo in range(0, len(order), batch_size):
            yield self.batch(order[lo:lo + batch_size])


def collate(items: list[dict[str, torch.Tensor]]) -> Batch:
    """Pad a list of ``DienDataset[i]`` samples into a :class:`Batch`.

    For ``torch.utils.data.DataLoader(dataset, collate_fn=collate)``.
    """
    if not items:
        raise ValueError("collate: empty list of samples")
    length = torch.stack([it["length"] for it in items])  # [B]
    width = max(int(length.max()), 1)

    def pad(key: str) -> torch.Tensor:
        out = torch.zeros(len(items), width, dtype=torch.int64)  # [B, T]
        for b, it in enumerate(items):
            out[b, : len(it[key])] = it[key]
        return out

    return Batch(
        user=torch.stack([it["user"] for it in items]),
        item=torch.stack([it["item"] for it in items]),
        cate=torch.stack([it["cate"] for it in items]),
        label=torch.stack([it["label"] for it in items]),
        hist_item=pad("hist_item"),
        hist_cate=pad("hist_cate"),
        neg_hist_item=pad("neg_hist_item"),
        neg_hist_cate=pad("neg_hist_cate"),
        length=length,
    )
