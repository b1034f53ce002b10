"""Three DIEN implementations behind one request protocol, for ``run_all.py``.

The frameworks
--------------
- ``ours``: dien_tutorial (this repository), in the project's ``.venv``.
- ``rechub``: torch-rechub 0.9.0's DIEN, in ``.venv-bench``, built and
  trained exactly as ``bench_train.py`` does it (this module subclasses its
  ``RechubSide``).
- ``deepctr``: DeepCTR-Torch 0.3.0's DIEN, in ``.venv-bench`` when
  ``setup_bench_env.sh`` could install it. Built as in its own DIEN example:
  target item and category as ``SparseFeat`` (width 8), the history and the
  negative history as ``VarLenSparseFeat`` sharing the target's tables,
  with ``length_name="seq_length"``; ``gru_type="AUGRU"``,
  ``use_negsampling=True`` and ``alpha=1`` (as ours), top MLP 200-80 (its
  default ReLU), attention MLP 80-40 with sigmoid (as ours), every other
  argument its default (embedding L2 of 1e-6, init std 1e-4). The training
  step is the body of its ``BaseModel.fit`` loop: binary cross-entropy
  *summed* over the batch, plus its regularisation and auxiliary losses,
  Adam with lr 1e-3. Its input is one float tensor of all feature columns
  (``build_input_features`` decides the column order), made once from the
  same padded arrays torch-rechub reads.

  DeepCTR-Torch imports ``requests`` at import time, a package it does not
  declare, to ask PyPI for a newer release in a background thread. The
  worker gives it a stand-in ``requests`` whose ``get`` fails, so no network
  call is made (it then prints one line asking to check the version by
  hand).

The protocol
------------
``python bench_frameworks.py --worker KIND NPZ SOURCE`` loads the data once
and answers one JSON request per stdin line with one stdout line starting
with ``@@ ``; other output is ignored. Requests (``cmd``):

- ``train``: a fresh seeded ``model`` (``"dien"`` unless the request says
  ``"din"``, or ``"din_example"``: see ``bench_train.SETTINGS``; ours and
  rechub only) trained for ``steps`` steps (or one epoch when ``steps`` is
  null) at ``batch`` with ``threads`` intra-op threads;
  then, with ``infer_batch``, a timed forward pass over the test split (or
  its first ``infer_max_batches`` batches) in eval mode, whose predictions
  give the test AUC.
- ``synthetic`` (ours, rechub): train-step and inference time on one batch
  of random ids whose histories all have exactly ``steps_t`` steps.
- ``toys_len`` (ours): train-step and inference time on the real batches
  of samples built with another ``max_len``.
- ``latency`` (ours): ONNX Runtime against PyTorch, through
  :func:`dien_tutorial.export.benchmark_latency`.

Every answer carries the 1-minute load average before and after and
``peak_rss_mb``: the worker's resident-memory high-water mark over that
request, ``VmHWM`` of ``/proc/self/status`` (``getrusage``'s ``ru_maxrss``
would include the parent's peak: see ``bench_scaling.py``). The mark is
reset to the current resident size before each request (Linux
``/proc/self/clear_refs``); where that is not allowed, ``peak_scope`` says
``"worker"`` and the figure covers the worker's whole life so far. The
loaded data is included in the figure: it is what each framework needs to
hold.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

# Only the standard library at import time: this file runs under two
# environments (the project's and .venv-bench).
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_train as bt  # noqa: E402  (standard library only at import time)
from bench_scaling import own_peak_mb  # noqa: E402

MESSAGE = bt.MESSAGE
MAX_LEN = bt.MAX_LEN
EMBED = bt.EMBED
LR = bt.LR
MODEL_SEED = bt.MODEL_SEED
SYNTHETIC_SEED = 1  # ids of the fixed-length batches, the same for every framework
FRAMEWORKS = {"ours": "dien_tutorial", "rechub": "torch-rechub", "deepctr": "DeepCTR-Torch"}


# ---------------------------------------------------------------------------
# Measuring helpers
# ---------------------------------------------------------------------------


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark to its current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """RSS high-water mark of this process in MB (since the last :func:`reset_peak`)."""
    return own_peak_mb()


def rss_mb() -> float:
    """Current RSS of this process in MB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def timed_steps(step, make_batches, steps: int | None, warmup: int, max_seconds: float) -> dict:
    """Run ``step(batch)`` over ``make_batches()``, timing all but ``warmup`` calls.

    ``steps=None`` runs until the batches end (one epoch); otherwise the
    loop stops after ``steps`` timed steps or ``max_seconds``, whichever
    comes first (``cut_short`` says which).
    """
    batches = make_batches()
    for _ in range(warmup):
        step(next(batches))
    done, seen = 0, 0
    start = time.perf_counter()
    for b in batches:
        seen += step(b)
        done += 1
        if steps is not None and (done >= steps or time.perf_counter() - start > max_seconds):
            break
    seconds = time.perf_counter() - start
    return {"steps": done, "samples": seen, "seconds": seconds,
            "cut_short": steps is not None and done < steps}


def timed_inference(predict, label, batch: int, max_batches: int | None) -> dict:
    """Time ``predict(lo, hi)`` (click probabilities of test rows ``lo:hi``) over the test split.

    Runs without gradients, batch after batch, stopping after
    ``max_batches`` batches if given; returns the time, the rows seen and
    their probabilities and labels.
    """
    import torch

    probs, seen = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for i, lo in enumerate(range(0, len(label), batch)):
            if max_batches is not None and i >= max_batches:
                break
            probs.append(predict(lo, lo + batch))
            seen += len(probs[-1])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": seen, "prob": torch.cat(probs).numpy(), "label": label[:seen].numpy()}


def synthetic_arrays(n_items: int, n_cates: int, batch: int, steps: int, seed: int = SYNTHETIC_SEED) -> dict:
    """One batch of random ids whose histories all hold exactly ``steps`` steps.

    Ids are drawn from ``2 .. n - 1`` (real ids of our vocabularies), so no
    slot is padding. Returns int64 arrays ``target_item [B]``,
    ``target_cate [B]``, ``hist_item``, ``hist_cate``, ``neg_hist_item``,
    ``neg_hist_cate`` ``[B, T]``, ``length [B]`` and float32 ``label [B]``.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {"target_item": rng.integers(2, n_items, batch), "target_cate": rng.integers(2, n_cates, batch)}
    for key, vocab in (("hist_item", n_items), ("hist_cate", n_cates),
                       ("neg_hist_item", n_items), ("neg_hist_cate", n_cates)):
        out[key] = rng.integers(2, vocab, (batch, steps))  # [B, T]
    out["length"] = np.full(batch, steps, dtype=np.int64)  # [B]
    out["label"] = rng.integers(0, 2, batch).astype(np.float32)  # [B]
    return out


def _auc(label, prob) -> float | None:
    """Test AUC, or None when the scored samples hold a single class."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    label = np.asarray(label)
    if label.min() == label.max():
        return None
    return float(roc_auc_score(label, np.asarray(prob, dtype=np.float64)))


# ---------------------------------------------------------------------------
# dien_tutorial
# ---------------------------------------------------------------------------


def ours_samples(source: str, max_len: int):
    """Our samples of the benchmark data: the real Toys 5-core or the simulator's default."""
    import warnings

    from dien_tutorial.data.samples import build_samples

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the loaders' counts are reported elsewhere
        if source == "toys":
            from dien_tutorial.data.amazon import default_data_dir, load_toys_5core

            log = load_toys_5core(default_data_dir() / "amazon_toys_5core")
        else:
            from dien_tutorial.data.simulate import SimulationConfig, simulate

            log = simulate(SimulationConfig.default()).log
        return log, build_samples(log, max_len=max_len, seed=0)


class Ours(bt.OursSide):
    """dien_tutorial: ``bench_train``'s training loop on samples of any source."""

    def __init__(self, npz_path: str, source: str) -> None:  # noqa: D107 (no super().__init__: it loads Toys)
        import numpy as np

        self.source = source
        self.log, self.samples = ours_samples(source, MAX_LEN)
        self.train = self.samples.dataset("train")
        self.test = self.samples.dataset("test")
        self._by_len = {MAX_LEN: self.samples}
        self._onnx: Path | None = None
        with np.load(npz_path) as arrays:  # the parent built the same (deterministic) samples
            for split, ds in (("train", self.train), ("test", self.test)):
                if not (np.array_equal(arrays[f"{split}_item"], ds.data.item)
                        and np.array_equal(arrays[f"{split}_label"], ds.data.label)):
                    raise RuntimeError(f"the {split} split differs from the parent's")

    def info(self) -> dict:
        import onnxruntime
        import torch

        import dien_tutorial

        return {"framework": FRAMEWORKS["ours"], "torch": torch.__version__,
                "dien_tutorial": getattr(dien_tutorial, "__version__", "unknown"),
                "onnxruntime": onnxruntime.__version__}

    def infer(self, model, batch: int, max_batches: int | None) -> dict:
        """Timed eval-mode forward over the test split; its predictions and labels."""
        import numpy as np
        import torch

        from dien_tutorial.train import model_inputs

        model.eval()
        probs, labels, seen = [], [], 0
        start = time.perf_counter()
        with torch.inference_mode():
            for i, b in enumerate(self.test.batches(batch)):
                if max_batches is not None and i >= max_batches:
                    break
                probs.append(model(**model_inputs(b, False)).prob)  # [B]
                labels.append(b.label)
                seen += len(b.label)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "samples": seen, "prob": torch.cat(probs).numpy(),
                "label": np.asarray(torch.cat(labels).numpy())}

    def _synthetic_batch(self, arrays: dict):
        import numpy as np
        import torch

        from dien_tutorial.data.samples import Batch

        t = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}
        return Batch(user=torch.zeros_like(t["target_item"]), item=t["target_item"], cate=t["target_cate"],
                     label=t["label"], hist_item=t["hist_item"], hist_cate=t["hist_cate"],
                     neg_hist_item=t["neg_hist_item"], neg_hist_cate=t["neg_hist_cate"], length=t["length"])

    def _time_batches(self, batches: list, train_steps: int, infer_steps: int, warmup: int,
                      max_seconds: float) -> dict:
        """Train-step and inference times of a fresh DIEN, cycling over ``batches``."""
        import itertools

        import torch

        from dien_tutorial.train import model_inputs, train_step

        model, opt = self._model("dien")
        alpha = model.config.alpha

        def one_train(b) -> int:
            train_step(model, opt, b, alpha)
            return len(b.label)

        train = timed_steps(one_train, lambda: itertools.cycle(batches), train_steps, warmup, max_seconds)
        model.eval()

        def one_infer(b) -> int:
            model(**model_inputs(b, False))
            return len(b.label)

        with torch.inference_mode():
            infer = timed_steps(one_infer, lambda: itertools.cycle(batches), infer_steps, warmup, max_seconds)
        return {"train": train, "infer": infer}

    def synthetic(self, steps_t: int, batch: int, train_steps: int, infer_steps: int, warmup: int,
                  max_seconds: float) -> dict:
        arrays = synthetic_arrays(len(self.samples.item_vocab), len(self.samples.cate_vocab), batch, steps_t)
        return self._time_batches([self._synthetic_batch(arrays)], train_steps, infer_steps, warmup,
                                  max_seconds)

    def toys_len(self, max_len: int, batch: int, train_steps: int, infer_steps: int, warmup: int,
                 max_seconds: float) -> dict:
        """The same measurement on real batches of samples built with ``max_len``."""
        import itertools
        import warnings

        from dien_tutorial.data.samples import build_samples

        if max_len not in self._by_len:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._by_len[max_len] = build_samples(self.log, max_len=max_len, seed=0)
        samples = self._by_len[max_len]
        train = samples.dataset("train")
        n = max(train_steps, infer_steps) + warmup
        batches = list(itertools.islice(train.batches(batch, shuffle=True, seed=bt.SHUFFLE_SEED), n))
        widths = [int(b.hist_item.shape[1]) for b in batches]
        out = self._time_batches(batches, train_steps, infer_steps, warmup, max_seconds)
        out["padded_width_mean"] = sum(widths) / len(widths)
        out["valid_step_share"] = (sum(int(b.length.sum()) for b in batches)
                                   / sum(len(b.label) * w for b, w in zip(batches, widths)))
        return out

    def latency(self, batches: list[int], steps_t: int, repeats: int, warmup: int, workdir: str) -> dict:
        """ONNX Runtime vs PyTorch median latency of an untrained DIEN of the benchmark's widths."""
        from dien_tutorial.export import benchmark_latency, export_onnx

        model, _ = self._model("dien")
        model.eval()
        if self._onnx is None:
            self._onnx = export_onnx(model, Path(workdir) / "dien_bench.onnx")
        result = benchmark_latency(model, self._onnx, batches=tuple(batches), T=steps_t,
                                   repeats=repeats, warmup=warmup, seed=0)
        return {str(b): r for b, r in result.items()}


# ---------------------------------------------------------------------------
# torch-rechub
# ---------------------------------------------------------------------------


class Rechub(bt.RechubSide):
    """torch-rechub 0.9.0 as ``bench_train`` runs it, plus inference and fixed-length batches."""

    def __init__(self, npz_path: str, source: str) -> None:  # noqa: D107
        super().__init__(npz_path)

    def infer(self, model, batch: int, max_batches: int | None) -> dict:
        x, y = self.split["test"]
        model.eval()

        def predict(lo: int, hi: int):
            pred = model({key: value[lo:hi] for key, value in x.items()})
            return pred[0] if isinstance(pred, tuple) else pred

        return timed_inference(predict, y, batch, max_batches)

    def synthetic(self, steps_t: int, batch: int, train_steps: int, infer_steps: int, warmup: int,
                  max_seconds: float) -> dict:
        import itertools

        import torch

        arrays = synthetic_arrays(self.n_items, self.n_cates, batch, steps_t)
        x = {key: torch.from_numpy(arrays[key]) for key in ("target_item", "target_cate", "hist_item",
                                                            "hist_cate", "neg_hist_item", "neg_hist_cate")}
        y = torch.from_numpy(arrays["label"])
        model, opt = self._model("dien")
        criterion = torch.nn.BCELoss()

        def one_train(_) -> int:  # the step of bench_train's RechubSide.run
            y_pred, other_loss = model(x)
            loss = criterion(y_pred, y) + other_loss
            model.zero_grad()
            loss.backward()
            opt.step()
            return len(y)

        train = timed_steps(one_train, lambda: itertools.repeat(None), train_steps, warmup, max_seconds)
        model.eval()

        def one_infer(_) -> int:
            model(x)
            return len(y)

        with torch.no_grad():
            infer = timed_steps(one_infer, lambda: itertools.repeat(None), infer_steps, warmup, max_seconds)
        return {"train": train, "infer": infer}


# ---------------------------------------------------------------------------
# DeepCTR-Torch
# ---------------------------------------------------------------------------


def _import_deepctr():
    """Import deepctr_torch without its network call (see the module docstring)."""
    if "requests" not in sys.modules:
        stand_in = types.ModuleType("requests")

        def _offline(*args, **kwargs):
            raise OSError("no network calls from the benchmark")

        stand_in.get = _offline
        sys.modules["requests"] = stand_in
    import deepctr_torch

    return deepctr_torch


class DeepCtr:
    """DeepCTR-Torch 0.3.0's DIEN on the same padded arrays."""

    name = FRAMEWORKS["deepctr"]
    COLUMNS = {"item": "target_item", "cate": "target_cate", "hist_item": "hist_item",
               "hist_cate": "hist_cate", "neg_hist_item": "neg_hist_item",
               "neg_hist_cate": "neg_hist_cate", "seq_length": "length"}

    def __init__(self, npz_path: str, source: str) -> None:
        import numpy as np
        import torch

        self.lib = _import_deepctr()
        with np.load(npz_path) as arrays:
            self.n_items = int(arrays["n_items"])
            self.n_cates = int(arrays["n_cates"])
            self.order = arrays["order"]
            self.split = {}
            for split in ("train", "test"):
                cols = {key: arrays[f"{split}_{key}"] for key in set(self.COLUMNS.values())}
                self.split[split] = (self._matrix(cols, MAX_LEN),
                                     torch.from_numpy(arrays[f"{split}_label"].astype(np.float32)))

    def info(self) -> dict:
        import torch

        return {"framework": self.name, "torch": torch.__version__, "deepctr_torch": self.lib.__version__}

    def _features(self, steps_t: int) -> list:
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

        features = [SparseFeat("item", self.n_items, embedding_dim=EMBED),
                    SparseFeat("cate", self.n_cates, embedding_dim=EMBED)]
        for prefix in ("hist_", "neg_hist_"):
            for name, vocab in (("item", self.n_items), ("cate", self.n_cates)):
                features.append(VarLenSparseFeat(
                    SparseFeat(prefix + name, vocab, embedding_dim=EMBED, embedding_name=name),
                    maxlen=steps_t, length_name="seq_length"))
        return features

    def _matrix(self, cols: dict, steps_t: int):
        """Its input: every feature column side by side in one float32 tensor [N, F]."""
        import numpy as np
        import torch
        from deepctr_torch.inputs import build_input_features

        index = build_input_features(self._features(steps_t))  # name -> (first column, end)
        n = len(cols["target_item"])
        out = np.zeros((n, max(end for _, end in index.values())), dtype=np.float32)
        for name, (lo, hi) in index.items():
            out[:, lo:hi] = cols[self.COLUMNS[name]].reshape(n, hi - lo)
        return torch.from_numpy(out)

    def _model(self, steps_t: int = MAX_LEN):
        import torch
        from deepctr_torch.models import DIEN

        torch.manual_seed(MODEL_SEED)
        model = DIEN(self._features(steps_t), ["item", "cate"], gru_type="AUGRU", use_negsampling=True,
                     alpha=1.0, dnn_hidden_units=(200, 80), att_hidden_units=(80, 40),
                     att_activation="sigmoid", seed=MODEL_SEED, device="cpu")
        model.train()
        return model, torch.optim.Adam(model.parameters(), lr=LR)

    @staticmethod
    def _step(model, opt, x, y) -> None:
        """The body of its BaseModel.fit loop (one task, binary cross-entropy)."""
        import torch.nn.functional as F

        y_pred = model(x).squeeze(-1)
        opt.zero_grad()
        loss = F.binary_cross_entropy(y_pred, y, reduction="sum")
        total = loss + model.get_regularization_loss() + model.aux_loss
        total.backward()
        opt.step()

    def run(self, model_name: str, batch: int, steps: int | None, warmup: int, max_seconds: float) -> dict:
        if model_name != "dien":
            raise ValueError(f"DeepCTR-Torch side: only 'dien' is benchmarked, not {model_name!r}")
        x, y = self.split["train"]
        model, opt = self._model()

        def batches():
            while True:
                for lo in range(0, len(self.order), batch):
                    index = self.order[lo:lo + batch]
                    yield x[index], y[index]
                if steps is None:
                    return

        def one(b) -> int:
            self._step(model, opt, *b)
            return len(b[1])

        result = timed_steps(one, batches, steps, warmup, max_seconds)
        result["model"] = model
        return result

    def infer(self, model, batch: int, max_batches: int | None) -> dict:
        x, y = self.split["test"]
        model.eval()
        return timed_inference(lambda lo, hi: model(x[lo:hi]).squeeze(-1), y, batch, max_batches)


# ---------------------------------------------------------------------------
# The worker loop
# ---------------------------------------------------------------------------

SIDES = {"ours": Ours, "rechub": Rechub, "deepctr": DeepCtr}


def _handle(side, request: dict) -> dict:
    import torch

    cmd = request["cmd"]
    torch.set_num_threads(request.get("threads", 1))
    if cmd == "train":
        result = side.run(request.get("model", "dien"), request["batch"], request.get("steps"),
                          request.get("warmup", 0), request.get("max_seconds", float("inf")))
        model = result.pop("model")
        steps = request.get("steps")
        result.setdefault("cut_short", steps is not None and result["steps"] < steps)
        result["samples_per_s"] = result["samples"] / result["seconds"]
        if request.get("infer_batch"):
            inf = side.infer(model, request["infer_batch"], request.get("infer_max_batches"))
            result["infer_samples"] = inf["samples"]
            result["infer_seconds"] = inf["seconds"]
            result["infer_samples_per_s"] = inf["samples"] / inf["seconds"]
            result["test_auc"] = _auc(inf["label"], inf["prob"])
        return result
    if cmd == "synthetic":
        return side.synthetic(request["steps_t"], request["batch"], request["train_steps"],
                              request["infer_steps"], request.get("warmup", 1), request["max_seconds"])
    if cmd == "toys_len":
        return side.toys_len(request["steps_t"], request["batch"], request["train_steps"],
                             request["infer_steps"], request.get("warmup", 1), request["max_seconds"])
    if cmd == "latency":
        return side.latency(request["batches"], request["steps_t"], request["repeats"],
                            request.get("warmup", 3), request["workdir"])
    raise ValueError(f"unknown request {cmd!r}")


def serve(kind: str, npz_path: str, source: str) -> None:
    """Load the data, then answer requests until stdin closes or a ``quit`` arrives."""
    import torch

    torch.set_num_threads(1)
    side = SIDES[kind](npz_path, source)
    print(MESSAGE + json.dumps({"ready": True, "rss_mb": rss_mb(), **side.info()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("cmd") == "quit":
            return
        scope = "request" if reset_peak() else "worker"
        answer = {"load_before": os.getloadavg()[0]}
        try:
            answer.update(_handle(side, request))
        except Exception:  # reported to the parent, which records it and goes on
            answer["error"] = traceback.format_exc()[-2500:]
        answer.update({"load_after": os.getloadavg()[0], "peak_rss_mb": peak_rss_mb(),
                       "peak_scope": scope, "threads": torch.get_num_threads()})
        print(MESSAGE + json.dumps(answer), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "--worker":
        sys.exit("usage: bench_frameworks.py --worker KIND NPZ SOURCE (started by run_all.py)")
    serve(*sys.argv[2:])
