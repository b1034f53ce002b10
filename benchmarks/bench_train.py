"""Training speed of our DIEN and DIN against torch-rechub 0.9.0, on Amazon Toys.

What is compared
----------------
The data is the real Amazon Toys 5-core (``load_toys_5core``), turned into
samples by ``build_samples(log, max_len=50, seed=0)``: about 258k training
and 39k test samples, half of them sampled negatives. Both frameworks train
on exactly these samples. torch-rechub gets them as dense arrays, right-padded
with 0 to 50 steps (what its ``generate_seq_feature`` produces and its DIEN
packs), written to a temporary ``.npz`` file: target item and category,
history items and categories, the sampled negative of every history step,
label. Ids are our vocabulary codes (0 padding, 1 unknown), so both
embedding tables have the same number of rows.

Settings shared by both sides: embeddings of width 8 per id field, histories
of at most 50 steps, Adam with lr 1e-3 and no weight decay, the same
shuffled order of the training samples, the same batch size, the same
number of intra-op threads (``torch.set_num_threads``), a freshly seeded
model for every run.

- Ours: ``build_model(name, DIENConfig.paper(n_items, n_cates, item_dim=8,
  cate_dim=8, hidden=16))``; for DIEN that is the AUGRU, the auxiliary loss
  with weight 1 and the 200-80 Dice head of the paper, over one GRU of width
  16 on item ++ category. Batches come from ``DienDataset.batches`` (the
  gather from the log is inside the timed loop) and go through
  :func:`dien_tutorial.train.train_step` with the optimizer of ``fit``.
- torch-rechub: ``torch_rechub.models.ranking.DIEN`` and ``DIN``, built as in
  its examples: target item and category as ``SparseFeature`` (padding 0),
  history and negative history as ``SequenceFeature(pooling="concat",
  shared_with=<target>)``, the target features also as the profile
  ``features`` (its DIN example does this; we leave out its user id, which
  our model does not have), top MLP 200-80. DIEN runs with its own
  auxiliary-loss weight, ``alpha=0.2`` (its default and its example's
  value); DIN's attention MLP is 80-40 with sigmoid, as ours. The loop is
  the body of its ``CTRTrainer.train_one_epoch``, fed with batches sliced
  from tensors already in memory (cheaper than its ``DataLoader``, which
  collates sample by sample, so this favours torch-rechub).

Each side works in a long-lived subprocess (torch-rechub with the Python of
``.venv-bench``, made by ``benchmarks/setup_bench_env.sh``), which loads the
data once and then runs the measurements the parent asks for, one at a
time, while the other side waits idle. The runs alternate ours / theirs /
ours / theirs for every setting, so a slow patch of a shared machine hits
both. Throughput runs take a fixed number of steps (``SETTINGS``) after a
few untimed warm-up steps, both sides on the same batches, at 1 and at 2
threads (on a 2-core machine with any other load, 2 intra-op threads can
stall badly, so both are measured). The AUC runs train one full epoch at
batch 256 and at 4096 (1 thread) and score the test split with
scikit-learn's ``roc_auc_score``. The 1-minute load average is recorded
before and after every run.

What the profile showed (torch.profiler, 1 thread, batch 256, ``T = 50``)
-----------------------------------------------------------------------
About 88% of the ``B * T`` history slots of a Toys batch are padding: the
median history has 2 steps and a quarter of the samples have none, yet
nearly every batch of 256 holds one 50-step history, so the padded width is
50. Before the speed work a DIEN step took about 52 ms (quiet machine):

- the attention MLP over all ``B * T`` slots (matmuls, the sigmoid and its
  backward on ``[12800, 80]``): about 12 ms forward + backward;
- the interest evolving loop: about 18 ms, nearly all of it per-operator
  overhead (50 steps of about 9 kernels forward and 25 autograd kernels
  backward), most of it spent keeping padded rows frozen;
- ``torch.nn.GRU`` (a C++ loop over all 50 steps) forward + backward:
  about 11 ms; its packed mode (``pack_padded_sequence``) was no faster;
- operations on ``[B, T, E]`` tensors (masking the history, the pooling
  sum, gathers and their backward): 100 to 400 us each;
- Dice: ``x.var(dim=0)`` alone about 0.25 ms per call;
- the optimizer (single-tensor Adam, 25 parameter tensors): about 0.9 ms;
  the dense item-embedding gradient (12k rows here): about 0.1 ms per
  lookup, six lookups per step.

At batch 4096 the same work is compute-bound, and padding is nearly all of
it.

What was changed (``dien_tutorial``; numbers from alternating A/B runs of
the package before and after, in one process, same batches, 1 thread)
-----------------------------------------------------------------------
1. Attention scores only the valid steps (``AttentionUnit``): DIEN batch
   256 56.8 -> 44.7 ms per step, batch 4096 1229 -> 719 ms.
2. Both GRUs run over the valid steps only, packed longest history first
   (``PackedSteps``, ``packed_gru``; ``torch.nn.GRU`` and the scripted
   ``evolve_interest`` are kept for ONNX export): with 1., batch 256
   1.7x and batch 4096 3.8x faster than before 1.
3. Fused Adam in ``fit`` (``make_optimizer``): the optimizer step 0.89 ->
   0.27 ms; the update is the same.
4. Dice computes the variance from the centred values and folds its output
   into one multiply; the packed loop cuts its inputs into steps once and
   splits off finished users instead of slicing twice: 24.1 -> 22.3 ms.
5. ``DIEN.forward`` packs the batch once and embeds only the valid steps;
   every layer takes packed input (``DIEN.forward_padded`` keeps the
   padded version): DIEN batch 256 21.8 -> 16.9 ms (with 4.), DIN 6.3 ->
   4.7 ms, DIEN batch 4096 210 -> 115 ms.
6. One embedding lookup per table per batch: about 3% (16.6 -> 16.2 ms).

Tried and dropped at that stage: a hand-written backward for the packed
loop written step by step (correct, but 13% slower than autograd);
folding the step scale into the update gate (no change); ``torch.nn.GRU``
on packed sequences (slower). ``torch.compile`` works here (gcc is
present) but the loops' lengths change with every batch, so it was not
pursued.

A second profile, after those changes (1 thread, batch 256, real Toys
batches, about 1.5k valid steps of 12.8k slots)
------------------------------------------------------------------------
- DIEN, about 17.6 ms a step: some 60% was backward, nearly all of it
  autograd replaying the two packed GRU loops step by step (about 50 steps
  of about 25 small kernels, a few microseconds each whatever their size).
- DIN, about 5 ms a step plus 0.3-0.4 ms for the batch gather: forward and
  backward about 2 ms each, Adam about 0.35 ms (the fused kernel 0.1 ms,
  the rest Python), ``zero_grad`` 0.1 ms. The matrix products themselves
  (attention MLP on the valid steps, the 200-80 head) take 0.5-0.7 ms;
  the two Dice layers about 0.5 ms in 13 forward and 12 backward
  operations each; advanced indexing ``x[idx]`` and ``nn.Embedding``'s
  dense backward cost 3-5x what ``index_select`` does.

What was changed after it:

7. ``PackedGRUFunction``: the packed GRU's backward written out. The
   gradient of one step is linear in the incoming gradient, so the
   coefficients of all steps are computed at once and the loop backwards
   is two kernels per step. ``packed_gru_loop`` keeps the readable loop.
8. ``DiceFunction``: Dice with a closed-form backward (also more accurate
   in float32 than autograd's for small batches).
9. The attention's first layer as one product on ``[q, k, q * k]``, with
   ``q - k`` folded into the weights; ``PackedSteps.softmax``;
   ``index_select`` instead of advanced indexing and, where no padding id
   is looked up, for the embeddings; ``DienDataset.batch`` gathers only
   the valid slots.

Forward outputs, losses and gradients equal the earlier code to within
1e-6 (``tests/test_fast_paths.py``). Measured A/B with ``--quick`` at load
about 2: DIEN batch 256 3.1x -> 4.9x torch-rechub, batch 4096 3.9x ->
4.3x, DIN batch 256 6.8x -> 8.4x.

A third round (same in-process A/B, 1 thread, load below 1):

10. The two packed GRU loops, forward (``_packed_steps``) and the
    recurrence of the backward (``_backward_steps``), run as TorchScript
    (compiled once, when ``dien_tutorial.layers`` is imported):
    the same kernels without the interpreter between them. A forward loop
    of 50 steps went from 1.30 to 0.96 ms; DIEN batch 256 10.3 -> 9.0 ms
    a step, batch 4096 107 -> 102 ms.
11. ``DiceFunction``'s backward hands the normalisation's share to
    PyTorch's batch-norm backward kernel (one operation instead of about
    eight); at batch 4096 Dice's forward and backward together went from
    11.0 to 6.1 ms. ``PackedSteps.softmax`` fixes the rows of users
    without history by index instead of by a ``[B, T]`` mask. DIN batch
    256 4.04 -> 3.79 ms a step.

Outputs are unchanged (the same operations, or the batch-norm backward
within 1e-6 of autograd). The full run of this script after it (load 0.2
to 1.5): DIEN batch 256 5.28x torch-rechub at 1 thread (5.14x at 2),
batch 4096 4.57x (4.74x), DIN batch 256 8.54x (5.65x at 2 threads, where
torch-rechub's large padded products gain from the second core and ours
do not); ``make bench`` in the same hour gave DIEN 5.48x and 4.49x.
What was left in a DIN step then (about 3.8 ms on a quiet machine) was
some 1 ms of matrix products (forward and backward of the attention MLP
on the valid steps and of the head), Adam (0.2 to 0.35 ms in different
profiles, more than half of it Python), and about 250 small operations
and their autograd bookkeeping, each a few microseconds. ``torch.compile``
of the forward and loss, tried as is (graph breaks at the packing's
``tolist`` and the lookup's padding check), took 24 s to compile and made
the DIN step 8% faster.

A fourth round, for DIN only (same in-process A/B, 1 thread):

12. ``dien_tutorial/din_step.py``: DIN's training step with the chain rule
    written out, no autograd, the gradients stored in ``.grad``
    (``train_step`` uses it for the plain DIN). About 190 operations
    instead of 265: a step with the optimizer and the batch gather went
    from 3.82-4.20 to 3.32-3.65 ms. Then its valid steps packed user by
    user (no sorting: nothing in DIN runs step by step), the sigmoid's
    backward as one kernel, Dice's forward in place: 3.22 -> 2.99 ms.
    Then the whole step compiled with TorchScript: 3.22 -> 2.72-2.96 ms.
    Gradients equal autograd's within 1e-12 (float64) and 3e-8 (float32).

Measured after it: this script's full run gave DIEN batch 256 5.24x at 1
thread (4.99x at 2), batch 4096 4.62x (4.85x), DIN batch 256 10.62x
(89,888 against 8,467 samples/s; 7.91x at 2 threads), one epoch of DIN
89,716 against 9,351 samples/s (9.59x), test AUC 0.7006 against 0.6867.
``make bench`` in the same hour: DIEN 5.23x and 5.31x, DIN 10.65x in
fresh workers (83,488 against 7,841), one epoch 9.86x. The DIN ratio
depends on the state of glibc's allocator in torch-rechub's process:
in workers that had trained DIEN first, an earlier ``make bench`` run of
the same code gave 9.14x (87,513 against 9,579), and ``--only din:256``
with ``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824``
gave 9.56x (90,814 against 9,497), against 10.5x to 11.0x without them.

What the AUC runs showed
------------------------
With the package's first embedding initialisation (``nn.Embedding``'s
N(0, 1)) torch-rechub's models scored the higher test AUC after one epoch
at batch 256 (DIEN 0.635 against our 0.626, DIN 0.687 against 0.626):
one epoch of Adam at lr 1e-3 moves a rarely seen item's row by far less
than 1. torch-rechub starts at N(0, 1e-4). The package now starts at
N(0, 0.01) (``model.EMBEDDING_INIT_STD``); with it, ours scored DIEN
0.676 and DIN 0.701 after the same epoch at batch 256, against 0.635 and
0.687. At batch 4096 (63 steps, every model far from trained) the two
sides are within about 0.01 of each other either way.

Usage (from the repository root)::

    bash benchmarks/setup_bench_env.sh     # once
    .venv/bin/python benchmarks/bench_train.py            # full run, 10-20 min
    .venv/bin/python benchmarks/bench_train.py --quick    # fewer steps, no AUC

Prints a table and writes ``benchmarks/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library up here: the torch-rechub worker runs this file
# with the benchmark environment's Python, where dien_tutorial is absent.

ROOT = Path(__file__).resolve().parent.parent
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results" / "train.json"
MAX_LEN = 50
EMBED = 8  # per id field
HIDDEN = 16  # our GRU width: E = item 8 ++ category 8
LR = 1e-3
SHUFFLE_SEED = 0  # order of the training samples, both sides
MODEL_SEED = 0  # torch.manual_seed before building a model
EVAL_BATCH = 4096
RECHUB_DIEN_ALPHA = 0.2  # torch-rechub's default auxiliary-loss weight
MESSAGE = "@@ "  # prefix of the workers' answer lines on stdout

# Goals of the spec: ours / torch-rechub samples per second.
GOALS = {("dien", 256): 3.0, ("dien", 4096): 2.0, ("din", 256): 10.0}
# (model, batch, timed steps, warm-up steps) of the throughput runs.
# "din_example" is a reference row, not a like-for-like one: our DIN against
# torch-rechub's DIN with the widths of its own Amazon example (attention MLP
# 256-128 with Dice, top MLP 256-128).
SETTINGS = [("dien", 256, 300, 10), ("dien", 4096, 30, 2), ("din", 256, 400, 10), ("din_example", 256, 30, 3)]
# (model, batch) of the one-epoch AUC runs.
AUC_SETTINGS = [("dien", 256), ("dien", 4096), ("din", 256), ("din", 4096)]


def _load() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------------------
# Workers: one per framework, answering one JSON request per line
# ---------------------------------------------------------------------------


class OursSide:
    """dien_tutorial: the package's datasets, model and training step."""

    name = "dien_tutorial"

    def __init__(self, npz_path: str) -> None:
        import numpy as np

        from dien_tutorial.data.amazon import default_data_dir, load_toys_5core
        from dien_tutorial.data.samples import build_samples

        data_dir = default_data_dir()
        self.samples = build_samples(load_toys_5core(data_dir / "amazon_toys_5core"), max_len=MAX_LEN, seed=0)
        self.train = self.samples.dataset("train")
        self.test = self.samples.dataset("test")
        # The parent built the same (deterministic) samples: check it.
        with np.load(npz_path) as arrays:
            for split, ds in (("train", self.train), ("test", self.test)):
                if not (np.array_equal(arrays[f"{split}_item"], ds.data.item)
                        and np.array_equal(arrays[f"{split}_label"], ds.data.label)):
                    raise RuntimeError(f"the {split} split differs from the parent's")

    def info(self) -> dict:
        import torch

        return {"framework": self.name, "torch": torch.__version__}

    def _model(self, name: str):
        import torch

        from dien_tutorial.config import DIENConfig
        from dien_tutorial.model import build_model
        from dien_tutorial.train import TrainConfig, make_optimizer

        torch.manual_seed(MODEL_SEED)
        config = DIENConfig.paper(len(self.samples.item_vocab), len(self.samples.cate_vocab),
                                  item_dim=EMBED, cate_dim=EMBED, hidden=HIDDEN)
        model = build_model(name, config)
        model.train()
        return model, make_optimizer(model, TrainConfig(lr=LR))

    def _batches(self, batch: int):
        """The training batches in the shared order, cycling if more are asked for."""
        while True:
            yield from self.train.batches(batch, shuffle=True, seed=SHUFFLE_SEED)

    def run(self, model_name: str, batch: int, steps: int | None, warmup: int, max_seconds: float) -> dict:
        from dien_tutorial.train import train_step

        # "din_example" only changes torch-rechub's widths: ours is the same DIN.
        model, opt = self._model("din" if model_name == "din_example" else model_name)
        alpha = model.config.alpha if model.config.use_aux else 0.0
        batches = self._batches(batch) if steps is not None else self.train.batches(batch, shuffle=True, seed=SHUFFLE_SEED)
        for _ in range(warmup):
            train_step(model, opt, next(batches), alpha)
        done, seen = 0, 0
        start = time.perf_counter()
        for b in batches:
            train_step(model, opt, b, alpha)
            done += 1
            seen += len(b.label)
            if steps is not None and (done >= steps or time.perf_counter() - start > max_seconds):
                break
        seconds = time.perf_counter() - start
        return {"steps": done, "samples": seen, "seconds": seconds, "model": model}

    def auc(self, model) -> float:
        from sklearn.metrics import roc_auc_score

        from dien_tutorial.train import predict

        prob = predict(model, self.test, EVAL_BATCH)
        return float(roc_auc_score(self.test.data.label, prob))


class RechubSide:
    """torch-rechub 0.9.0: its DIEN and DIN on the same samples."""

    name = "torch-rechub"

    def __init__(self, npz_path: str) -> None:
        import numpy as np
        import torch

        with np.load(npz_path) as arrays:
            self.n_items = int(arrays["n_items"])
            self.n_cates = int(arrays["n_cates"])
            self.order = arrays["order"]
            self.split = {}
            for split in ("train", "test"):
                x = {key: torch.from_numpy(arrays[f"{split}_{key}"].astype(np.int64))
                     for key in ("target_item", "target_cate", "hist_item", "hist_cate",
                                 "neg_hist_item", "neg_hist_cate")}
                y = torch.from_numpy(arrays[f"{split}_label"].astype(np.float32))
                self.split[split] = (x, y)

    def info(self) -> dict:
        import torch
        import torch_rechub

        return {"framework": self.name, "torch": torch.__version__,
                "torch_rechub": getattr(torch_rechub, "__version__", "unknown")}

    def _features(self):
        from torch_rechub.basic.features import SequenceFeature, SparseFeature

        target = [SparseFeature("target_item", vocab_size=self.n_items, embed_dim=EMBED, padding_idx=0),
                  SparseFeature("target_cate", vocab_size=self.n_cates, embed_dim=EMBED, padding_idx=0)]

        def sequence(name: str, shared: str, vocab: int):
            return SequenceFeature(name, vocab_size=vocab, embed_dim=EMBED, pooling="concat",
                                   shared_with=shared, padding_idx=0)

        history = [sequence("hist_item", "target_item", self.n_items),
                   sequence("hist_cate", "target_cate", self.n_cates)]
        negatives = [sequence("neg_hist_item", "target_item", self.n_items),
                     sequence("neg_hist_cate", "target_cate", self.n_cates)]
        return target, history, negatives

    def _model(self, name: str):
        import torch
        from torch_rechub.models.ranking import DIEN, DIN

        torch.manual_seed(MODEL_SEED)
        target, history, negatives = self._features()
        if name == "dien":
            model = DIEN(features=target, history_features=history, neg_history_features=negatives,
                         target_features=target, mlp_params={"dims": [200, 80]}, alpha=RECHUB_DIEN_ALPHA)
        elif name == "din":
            model = DIN(features=target, history_features=history, target_features=target,
                        mlp_params={"dims": [200, 80]},
                        attention_mlp_params={"dims": [80, 40], "activation": "sigmoid"})
        else:  # "din_example": the widths of its Amazon example (attention activation: Dice)
            model = DIN(features=target, history_features=history, target_features=target,
                        mlp_params={"dims": [256, 128]}, attention_mlp_params={"dims": [256, 128]})
        model.train()
        return model, torch.optim.Adam(model.parameters(), lr=LR)

    def _batches(self, batch: int, cycle: bool):
        x, y = self.split["train"]
        while True:
            for lo in range(0, len(self.order), batch):
                index = self.order[lo:lo + batch]
                yield {key: value[index] for key, value in x.items()}, y[index]
            if not cycle:
                return

    def run(self, model_name: str, batch: int, steps: int | None, warmup: int, max_seconds: float) -> dict:
        import torch

        model, opt = self._model(model_name)
        criterion = torch.nn.BCELoss()
        with_aux = model_name == "dien"  # its DIEN returns (prediction, auxiliary loss)

        def step(x: dict, y):
            # The body of torch-rechub's CTRTrainer.train_one_epoch (its
            # regularisation term is 0 by default and left out).
            if with_aux:
                y_pred, other_loss = model(x)
                loss = criterion(y_pred, y) + other_loss
            else:
                loss = criterion(model(x), y)
            model.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

        batches = self._batches(batch, cycle=steps is not None)
        for _ in range(warmup):
            step(*next(batches))
        done, seen = 0, 0
        start = time.perf_counter()
        for x, y in batches:
            step(x, y)
            done += 1
            seen += len(y)
            if steps is not None and (done >= steps or time.perf_counter() - start > max_seconds):
                break
        seconds = time.perf_counter() - start
        return {"steps": done, "samples": seen, "seconds": seconds, "model": model}

    def auc(self, model) -> float:
        import numpy as np
        import torch
        from sklearn.metrics import roc_auc_score

        x, y = self.split["test"]
        model.eval()
        out = []
        with torch.no_grad():
            for lo in range(0, len(y), EVAL_BATCH):
                pred = model({key: value[lo:lo + EVAL_BATCH] for key, value in x.items()})
                out.append(pred[0] if isinstance(pred, tuple) else pred)
        return float(roc_auc_score(y.numpy(), torch.cat(out).numpy().astype(np.float64)))


def worker(kind: str, npz_path: str) -> None:
    """Serve requests from stdin: one JSON object per line, one answer per line."""
    import torch

    side = OursSide(npz_path) if kind == "ours" else RechubSide(npz_path)
    print(MESSAGE + json.dumps({"ready": True, **side.info()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("cmd") == "quit":
            return
        torch.set_num_threads(request["threads"])
        load_before = _load()
        result = side.run(request["model"], request["batch"], request.get("steps"),
                          request.get("warmup", 0), request.get("max_seconds", float("inf")))
        model = result.pop("model")
        result.update({
            "samples_per_s": result["samples"] / result["seconds"],
            "threads": torch.get_num_threads(),
            "load_before": load_before,
            "load_after": _load(),
        })
        if request.get("auc"):
            result["test_auc"] = side.auc(model)
        print(MESSAGE + json.dumps(result), flush=True)


class Worker:
    """The parent's handle on one long-lived worker subprocess.

    The worker prints one ``MESSAGE`` line when it is ready and one answer
    line per request read from its stdin; its stderr goes to ``log``.
    ``run_all.py`` uses the same handle for its framework workers.
    """

    def __init__(self, argv: list[str], kind: str, name: str, log: Path) -> None:
        self.kind = kind  # the worker's kind, as passed on its command line
        self.name = name  # for messages
        self.log = log
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
            text=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        self.info = self._answer()

    @classmethod
    def for_kind(cls, python: Path, kind: str, npz: Path, log: Path) -> "Worker":
        """A worker of this script (``--worker KIND NPZ``)."""
        return cls([str(python), __file__, "--worker", kind, str(npz)], kind, kind, log)

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MESSAGE):
                return json.loads(line[len(MESSAGE):])
        raise RuntimeError(f"the {self.name} worker stopped (exit {self.proc.wait()}):\n"
                           + self.log.read_text()[-3000:])

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


def samples_to_arrays(samples) -> dict:
    """Both splits as dense arrays right-padded with 0 to ``MAX_LEN`` steps (int32).

    Target and history ids, the aux-loss negatives, history lengths, labels,
    ``<split>_item`` (for the workers' check that they read the same
    samples) and ``order``, the order ``DienDataset.batches(shuffle=True,
    seed=SHUFFLE_SEED)`` visits the training samples in.
    """
    import numpy as np

    arrays = {"n_items": np.int64(len(samples.item_vocab)), "n_cates": np.int64(len(samples.cate_vocab))}
    for split in ("train", "test"):
        ds = samples.dataset(split)
        b = ds.batch(np.arange(len(ds)))  # every sample, padded to the split's longest history
        width = b.hist_item.shape[1]

        def dense(t):  # [N, width] -> [N, MAX_LEN]
            out = np.zeros((len(ds), MAX_LEN), dtype=np.int32)
            out[:, :width] = t.numpy()
            return out

        arrays.update({
            f"{split}_target_item": b.item.numpy().astype(np.int32),
            f"{split}_target_cate": b.cate.numpy().astype(np.int32),
            f"{split}_hist_item": dense(b.hist_item),
            f"{split}_hist_cate": dense(b.hist_cate),
            f"{split}_neg_hist_item": dense(b.neg_hist_item),
            f"{split}_neg_hist_cate": dense(b.neg_hist_cate),
            f"{split}_length": b.length.numpy().astype(np.int32),
            f"{split}_label": b.label.numpy(),
            f"{split}_item": ds.data.item,
        })
    arrays["order"] = np.random.default_rng(SHUFFLE_SEED).permutation(len(samples.splits["train"]))
    return arrays


def write_npz(path: Path) -> dict:
    """Build the samples once and write both splits as dense padded arrays."""
    import numpy as np

    from dien_tutorial.data.amazon import default_data_dir, load_toys_5core
    from dien_tutorial.data.samples import build_samples

    data_dir = default_data_dir()
    if data_dir is None or not (data_dir / "amazon_toys_5core").is_dir():
        sys.exit("the Amazon Toys 5-core data is missing (set DIEN_DATA_DIR)")
    samples = build_samples(load_toys_5core(data_dir / "amazon_toys_5core"), max_len=MAX_LEN, seed=0)
    arrays = samples_to_arrays(samples)
    np.savez(path, **arrays)
    stats = samples.stats()
    return {key: stats[key] for key in ("train_samples", "test_samples", "item_vocab", "cate_vocab",
                                        "train_history_length_quantiles")}


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (framework, model, batch, threads), with the mean of its runs."""
    rows: dict[tuple, dict] = {}
    for r in runs:
        if r["kind"] != "throughput":
            continue
        key = (r["framework"], r["model"], r["batch"], r["threads"])
        row = rows.setdefault(key, {"framework": key[0], "model": key[1], "batch": key[2], "threads": key[3],
                                    "runs": [], "runs_cut_short": 0})
        row["runs"].append(r["samples_per_s"])
        row["runs_cut_short"] += int(r["cut_short"])
    out = []
    for key, row in rows.items():
        row["samples_per_s"] = statistics.mean(row["runs"])
        if key[0] == "dien_tutorial":
            theirs = rows.get(("torch-rechub", *key[1:]))
            if theirs:
                row["ratio"] = row["samples_per_s"] / statistics.mean(theirs["runs"])
                # Per round: our run i against their run i (adjacent in time).
                row["ratio_per_round"] = [o / t for o, t in zip(row["runs"], theirs["runs"])]
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "NPZ"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a quarter of the steps, no AUC epochs")
    parser.add_argument("--threads", default="1,2", help="thread counts to measure (default 1,2)")
    parser.add_argument("--auc-threads", type=int, default=1,
                        help="threads of the full-epoch AUC runs (default 1: 2 threads can stall "
                             "when the machine is shared)")
    parser.add_argument("--only", default="",
                        help="comma-separated settings to run, e.g. 'dien:256,din_example:256,auc' "
                             "(default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS.name} "
                        "in benchmarks/results)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="end a throughput run after this long even if steps remain (reported); "
                             "a stalled 2-thread run would otherwise take minutes")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if not BENCH_PYTHON.exists():
        sys.exit(f"{BENCH_PYTHON} is missing: run `bash benchmarks/setup_bench_env.sh` first")

    threads = [int(t) for t in args.threads.split(",")]
    scale = 4 if args.quick else 1
    settings = [(m, b, max(1, steps // scale), warmup) for m, b, steps, warmup in SETTINGS]
    auc_settings = [] if args.quick else AUC_SETTINGS
    if args.only:
        wanted = set(args.only.split(","))
        settings = [s for s in settings if f"{s[0]}:{s[1]}" in wanted]
        auc_settings = auc_settings if "auc" in wanted else []

    wall = time.perf_counter()
    load_start = os.getloadavg()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        npz = Path(tmp) / "toys.npz"
        print("building the Toys samples and writing torch-rechub's arrays ...", flush=True)
        data = write_npz(npz)
        print(f"train {data['train_samples']:,} samples, test {data['test_samples']:,}; "
              f"{data['item_vocab']:,} items, {data['cate_vocab']} categories", flush=True)
        sides = {}
        try:
            sides["ours"] = Worker.for_kind(Path(sys.executable), "ours", npz, Path(tmp) / "ours.log")
            sides["rechub"] = Worker.for_kind(BENCH_PYTHON, "rechub", npz, Path(tmp) / "rechub.log")
            schedule = [("throughput", model, batch, steps, warmup, t)
                        for model, batch, steps, warmup in settings for t in threads]
            schedule += [("epoch", model, batch, None, 0, args.auc_threads) for model, batch in auc_settings]
            for kind, model, batch, steps, warmup, t in schedule:
                order = ["ours", "rechub", "ours", "rechub"] if kind == "throughput" else ["ours", "rechub"]
                for side in order:
                    r = sides[side].ask(model=model, batch=batch, threads=t, steps=steps, warmup=warmup,
                                        max_seconds=args.max_seconds, auc=kind == "epoch")
                    r.update({"kind": kind, "framework": sides[side].info["framework"], "model": model,
                              "batch": batch, "cut_short": steps is not None and r["steps"] < steps})
                    runs.append(r)
                    auc = f"  test AUC {r['test_auc']:.4f}" if "test_auc" in r else ""
                    cut = "  (cut short)" if r["cut_short"] else ""
                    print(f"  {kind:10s} {r['framework']:14s} {model:11s} batch {batch:5d} threads {t}: "
                          f"{r['samples_per_s']:9,.0f} samples/s  ({r['steps']} steps, {r['seconds']:.1f} s, "
                          f"load {r['load_before']:.2f}->{r['load_after']:.2f}){auc}{cut}", flush=True)
        finally:
            for w in sides.values():
                w.close()
        infos = {k: w.info for k, w in sides.items()}

    rows = summarise(runs)
    aucs = {(r["framework"], r["model"], r["batch"]): r for r in runs if r["kind"] == "epoch"}
    print()
    print(f"Training throughput on Amazon Toys 5-core (embedding {EMBED}, max_len {MAX_LEN}); "
          f"ratio = ours / torch-rechub, mean of 2 alternating runs each")
    header = (f"{'framework':<15}{'model':<12}{'batch':>6}{'threads':>8}{'samples/s':>11}"
              f"{'runs':>18}{'ratio':>8}  {'goal':<6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        goal = GOALS.get((row["model"], row["batch"]))  # none for the reference row din_example
        ratio = row.get("ratio")
        verdict = ""
        if ratio is not None and goal is not None:
            verdict = f">={goal:g}x " + ("met" if ratio >= goal else "MISSED")
        runs_txt = "/".join(f"{x:,.0f}" for x in row["runs"]) + ("*" if row["runs_cut_short"] else "")
        print(f"{row['framework']:<15}{row['model']:<12}{row['batch']:>6}{row['threads']:>8}"
              f"{row['samples_per_s']:>11,.0f}{runs_txt:>18}"
              f"{(f'{ratio:.2f}x' if ratio else ''):>8}  {verdict}")
    if any(row["runs_cut_short"] for row in rows):
        print(f"* a run reached the time limit ({args.max_seconds:.0f} s) before its last step; "
              "its samples/s cover the steps it did")
    if aucs:
        print()
        print(f"One epoch of training ({args.auc_threads} thread(s)), then test AUC")
        print(f"{'framework':<15}{'model':<12}{'batch':>6}{'samples/s':>11}{'test AUC':>10}")
        for (framework, model, batch), r in aucs.items():
            print(f"{framework:<15}{model:<12}{batch:>6}{r['samples_per_s']:>11,.0f}{r['test_auc']:>10.4f}")

    report = {
        "benchmark": "training throughput and test AUC, dien_tutorial vs torch-rechub, Amazon Toys 5-core",
        "data": data,
        "settings": {
            "embed_dim": EMBED, "our_hidden": HIDDEN, "max_len": MAX_LEN, "lr": LR, "optimizer": "Adam",
            "shuffle_seed": SHUFFLE_SEED, "model_seed": MODEL_SEED, "threads": threads,
            "auc_threads": args.auc_threads, "steps": {f"{m}_{b}": s for m, b, s, _ in settings},
            "warmup_steps": {f"{m}_{b}": w for m, b, _, w in settings},
            "rechub_dien_alpha": RECHUB_DIEN_ALPHA, "our_dien_alpha": 1.0, "max_seconds": args.max_seconds,
            "quick": args.quick,
        },
        "goals": {f"{m}_{b}": g for (m, b), g in GOALS.items()},
        "summary": rows,
        "auc_runs": [r for r in runs if r["kind"] == "epoch"],
        "runs": runs,
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
                    "workers": infos},
        "wall_seconds": time.perf_counter() - wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
