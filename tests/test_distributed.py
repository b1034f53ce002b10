"""Data-parallel training: ``dien_tutorial.distributed``.

The main test trains DIEN (tiny preset, simulated data, one epoch) on two
CPU processes with gloo over loopback, and once in this process with the
same global batch and seed, and compares the two. The sharding, the
weighting of the auxiliary loss and the synchronised Dice statistics make
the two runs take the same optimiser steps, so they differ only by
floating-point summation order. Tolerances, and what they are set against:

- test predictions: max |p_2 - p_1| <= 1e-5 (measured: below 5e-7 for
  seeds 0, 1 and 3); leaving out SyncDice or the auxiliary weighting moves
  them by about 1e-2;
- test AUC, GAUC and logloss: within 1e-5;
- weights: max |w_2 - w_1| <= 1e-4 (measured: up to 1.5e-5) for every
  tensor but the attention's last bias. Adam divides by the root of the
  squared gradients, so a parameter whose gradient is nearly zero turns
  rounding noise into steps of about the learning rate: the softmax ignores
  a constant shift of the scores, so that bias has a zero gradient in exact
  arithmetic and wanders by up to 1e-3. The test checks that shifting it
  changes no prediction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dien_tutorial import distributed as D
from dien_tutorial.cli import _prepare
from dien_tutorial.config import DIENConfig
from dien_tutorial.data.samples import build_samples
from dien_tutorial.data.simulate import SimulationConfig, simulate
from dien_tutorial.model import MODEL_NAMES, build_model
from dien_tutorial.train import TrainConfig, fit, metrics, model_from_checkpoint, model_inputs, predict

PRED_TOL = 1e-5
METRIC_TOL = 1e-5
WEIGHT_TOL = 1e-4
SHIFT_INVARIANT = "attention.rest.3.bias"  # last layer of the tiny preset's (8, 4) attention MLP

# One epoch of the book's simulated data, global batch 512 (2 x 256).
RUN = ["--source", "simulated", "--model", "dien", "--preset", "tiny", "--epochs", "1",
       "--batch-size", "512", "--seed", "3", "--no-progress"]


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun`` on this machine, loopback only."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_loopback_port()), "-m", "dien_tutorial.distributed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def no_launch_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, like each torchrun worker (restored afterwards).

    The models here are tiny: more threads only add synchronisation, which
    on a machine whose cores are busy slows these tests many times over.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path, no_launch_env, capsys):
    t0 = time.perf_counter()
    two = _torchrun([*RUN, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert D.main([*RUN, "--out", str(tmp_path / "one")]) == 0  # plain process: world size 1
    assert "on 1 rank(s), backend none" in capsys.readouterr().out

    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (m1["world_size"], m1["backend"], m1["per_rank_batch_size"]) == (1, "none", 512)
    assert (m2["world_size"], m2["backend"], m2["per_rank_batch_size"]) == (2, "gloo", 256)
    assert m2["ranks_identical_weights"] is True
    train_fields = {"model", "source", "test_auc", "test_gauc", "test_logloss", "test_samples",
                    "train_samples_per_s", "epochs_run", "best_epoch", "best_valid_auc",
                    "stopped_early", "wall_seconds", "seed", "data_seed", "threads", "train_config",
                    "model_config", "history", "data"}  # what `train` writes
    assert train_fields <= set(m1) and train_fields <= set(m2)
    # 111,058 training samples: 216 steps of 512, and 466 samples left out.
    assert (m2["steps_per_epoch"], m2["dropped_train_samples_per_epoch"]) == (216, 466)
    assert m1["steps_per_epoch"] == 216
    for key in ("test_auc", "test_gauc", "test_logloss", "best_valid_auc"):
        assert m2[key] == pytest.approx(m1[key], abs=METRIC_TOL), key
    assert m1["history"][0]["main_loss"] == pytest.approx(m2["history"][0]["main_loss"], abs=1e-6)
    assert m1["history"][0]["aux_loss"] == pytest.approx(m2["history"][0]["aux_loss"], abs=1e-6)
    assert m1["test_auc"] > 0.75  # it learned something: the comparison is not of two blank models

    model1, state1 = model_from_checkpoint(tmp_path / "one" / "model.pt")
    model2, state2 = model_from_checkpoint(tmp_path / "two" / "model.pt")
    assert state2["extra"]["world_size"] == 2
    w1, w2 = state1["model_state"], state2["model_state"]
    assert set(w1) == set(w2) and SHIFT_INVARIANT in w1
    weight_gap = max((w1[k].double() - w2[k].double()).abs().max().item()
                     for k in w1 if k != SHIFT_INVARIANT)
    assert weight_gap <= WEIGHT_TOL

    samples = _prepare(Namespace(source="simulated", path=None, data_seed=0, max_len=50, threads=None))
    test = samples.dataset("test")
    p1, p2 = predict(model1, test), predict(model2, test)
    assert np.abs(p1.astype(np.float64) - p2).max() <= PRED_TOL
    # Rank 0's evaluation is the single-process one of the saved weights.
    assert metrics(test.data.user, test.data.label, p2)["auc"] == m2["test_auc"]
    # The excluded bias cannot matter: a shift of 1.0 changes no prediction.
    with torch.no_grad():
        dict(model2.named_parameters())[SHIFT_INVARIANT].add_(1.0)
    assert np.abs(predict(model2, test) - p2).max() <= 1e-6

    # Control: one process with the per-rank batch (256) as its batch takes
    # other steps, and lands far outside the tolerance.
    torch.manual_seed(3)
    control = build_model("dien", DIENConfig.tiny(n_items=len(samples.item_vocab),
                                                  n_cates=len(samples.cate_vocab)))
    D.fit_sharded(control, samples.dataset("train"), samples.dataset("valid"),
                  TrainConfig(epochs=1, batch_size=256, seed=3, progress=False), D.World(), log=None)
    assert np.abs(predict(control, test).astype(np.float64) - p1).max() > 100 * PRED_TOL
    print(f"two-rank comparison took {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------------------
# World size 1 is the package's fit
# ---------------------------------------------------------------------------


def _small_samples():
    return build_samples(simulate(SimulationConfig.tiny(seed=5)).log, max_len=20, seed=5)


def test_world_size_one_without_a_remainder_is_exactly_fit():
    samples = _small_samples()
    n = len(samples.splits["train"])
    batch = 64
    keep = n // batch * batch  # no remainder: fit's last batch is full too
    assert keep < n
    train_split = samples.splits["train"]
    trimmed = dataclasses.replace(train_split, **{f.name: getattr(train_split, f.name)[:keep]
                                                 for f in dataclasses.fields(train_split)})
    samples = dataclasses.replace(samples, splits={**samples.splits, "train": trimmed})
    cfg = DIENConfig.tiny(n_items=len(samples.item_vocab), n_cates=len(samples.cate_vocab))
    tcfg = TrainConfig(epochs=3, batch_size=batch, seed=7, progress=False, patience=5)

    torch.manual_seed(7)
    ours = build_model("dien", cfg)
    torch.manual_seed(7)
    theirs = build_model("dien", cfg)
    history, info = D.fit_sharded(ours, samples.dataset("train"), samples.dataset("valid"), tcfg,
                                  D.World(), log=None)
    reference = fit(theirs, samples.dataset("train"), samples.dataset("valid"), tcfg, log=None)

    assert info == {"world_size": 1, "backend": "none", "per_rank_batch_size": batch,
                    "global_batch_size": batch, "steps_per_epoch": keep // batch,
                    "dropped_train_samples_per_epoch": 0, "ranks_identical_weights": True}
    for a, b in zip(history.epochs, reference.epochs, strict=True):
        for key in ("main_loss", "aux_loss", "total_loss", "valid_auc", "valid_gauc", "valid_logloss"):
            assert a[key] == b[key], key
    assert history.best_epoch == reference.best_epoch
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


# ---------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------


def test_ranks_split_each_global_batch_and_drop_the_same_remainder():
    order = D.epoch_order(11, seed=2, epoch=1)
    assert np.array_equal(order, np.random.default_rng(2001).permutation(11))
    per_rank = [list(D.shard(order, global_batch=4, world_size=2, rank=r)) for r in (0, 1)]
    assert [len(p) for p in per_rank] == [2, 2]  # equal batch counts: no rank waits forever
    for k in range(2):
        (l0, g0), (l1, g1) = per_rank[0][k], per_rank[1][k]
        assert np.array_equal(g0, order[4 * k:4 * k + 4]) and np.array_equal(g0, g1)
        assert len(l0) == len(l1) == 2
        assert sorted([*l0, *l1]) == sorted(order[4 * k:4 * k + 4])
    used = np.concatenate([l for p in per_rank for l, _ in p])
    assert sorted(used) == sorted(order[:8])  # the last 11 mod 4 = 3 are dropped


def test_aux_pairs_counts_what_the_auxiliary_loss_scores():
    samples = _small_samples()
    train = samples.dataset("train")
    index = np.arange(40)
    model = build_model("dien", DIENConfig.tiny(n_items=len(samples.item_vocab),
                                                n_cates=len(samples.cate_vocab)))
    out = model(**model_inputs(train.batch(index), True))
    counted = int(out.aux_row_pairs.sum())
    assert counted > 0
    assert D.aux_pairs(train.data.hist_len[index]) == counted


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameter_gets_a_gradient_so_ddp_needs_no_unused_search(name):
    samples = _small_samples()
    train = samples.dataset("train")
    model = build_model(name, DIENConfig.tiny(n_items=len(samples.item_vocab),
                                              n_cates=len(samples.cate_vocab)))
    alpha = D.aux_weight(model)
    assert (alpha > 0) == (name == "dien")
    batch = train.batch(np.arange(32))
    out = model(**model_inputs(batch, alpha > 0))
    (F.binary_cross_entropy_with_logits(out.logit, batch.label) + alpha * out.aux_loss).backward()
    idle = [k for k, p in model.named_parameters() if p.grad is None]
    assert idle == []
    assert D.needs_unused_parameters(model) is False


def test_an_auxiliary_network_weighted_zero_needs_the_unused_search():
    model = build_model("dien", DIENConfig.tiny(alpha=0.0))
    assert model.aux is not None
    assert D.needs_unused_parameters(model) is True


# ---------------------------------------------------------------------------
# Bad world setups
# ---------------------------------------------------------------------------


def test_batch_not_divisible_by_the_world_size_exits_2_before_any_network(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # it must fail before it would need them
    assert D.main(["--batch-size", "511", "--backend", "gloo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 511" in err and "world size 2" in err and "e.g. 510" in err
    assert not (tmp_path / "metrics.json").exists()


def test_nccl_without_cuda_exits_2_naming_the_backend(monkeypatch, tmp_path, capsys, no_launch_env):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.main(["--backend", "nccl", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--backend nccl needs CUDA" in err and "--backend gloo" in err


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "but not WORLD_SIZE, LOCAL_RANK"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 must lie in 0 .. WORLD_SIZE-1 = 1"),
])
def test_broken_launch_environment_is_named(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        D.read_launch_env(env)


def test_plain_run_is_world_size_one_without_a_process_group():
    world = D.plan_world(None, env={}, cuda_available=False)
    assert world == D.World() and not world.distributed
    assert D.plan_world(None, env={"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"},
                        cuda_available=False) == D.World(1, 3, 1, "gloo", torch.device("cpu"))


def test_fewer_samples_than_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="some rank would get no data"):
        D.steps_per_epoch(100, 128)
    assert D.steps_per_epoch(300, 128) == 2


# ---------------------------------------------------------------------------
# Output files: checked before any work, written with the usual mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda out: out.write_text("x"), "is a file, not a folder: rank 0 writes model.pt and metrics.json"),
    (lambda out: (out / "model.pt").mkdir(parents=True), "model.pt is a folder: rank 0 writes the file model.pt"),
    (lambda out: (out / "metrics.json").mkdir(parents=True), "metrics.json is a folder: rank 0 writes the file"),
], ids=["out-is-a-file", "model.pt-is-a-folder", "metrics.json-is-a-folder"])
def test_unusable_output_paths_exit_2_before_any_sample_is_built(make, message, tmp_path, monkeypatch, capsys,
                                                                 no_launch_env):
    import dien_tutorial.cli

    def no_samples(args):
        raise AssertionError("the samples were built before the output folder was checked")

    monkeypatch.setattr(dien_tutorial.cli, "_prepare", no_samples)
    out = tmp_path / "run"
    make(out)
    assert D.main(["--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and str(out) in err


def test_output_check_creates_the_folder_and_leaves_nothing_in_it(tmp_path):
    out = tmp_path / "a" / "b"
    D.check_outputs(out)
    assert out.is_dir() and list(out.iterdir()) == []
    (out / "model.pt").write_bytes(b"an old run")  # an old file is fine: it gets replaced
    D.check_outputs(out)
    with pytest.raises(OSError, match="cannot create --out .*: Not a directory"):
        D.check_outputs(out / "model.pt" / "sub")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_metrics_json_gets_the_mode_of_a_normal_new_file(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        D._write_json(tmp_path / "metrics.json", {"test_auc": 0.5})
    finally:
        os.umask(before)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == mode
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"test_auc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_threads_must_be_a_positive_integer(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        D.main(["--threads", value, "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert "argument --threads: expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_metrics_json_is_strict_json(tmp_path):
    import json

    from dien_tutorial.distributed import _write_json

    _write_json(tmp_path / "metrics.json", {"test_gauc": float("nan"), "test_auc": 0.75, "runs": [float("inf")]})
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"test_gauc": None, "test_auc": 0.75, "runs": [None]}
