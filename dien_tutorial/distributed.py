"""Data-parallel training of DIEN with ``torch.distributed``.

Run it with ``torchrun``, one process per GPU or per group of CPU cores::

    torchrun --standalone --nproc_per_node 2 -m dien_tutorial.distributed \\
        --source simulated --model dien --preset tiny --epochs 1 \\
        --batch-size 512 --seed 0 --out runs/ddp

or plainly, as one process (no process group, world size 1)::

    python -m dien_tutorial.distributed --source simulated --out runs/one

The arguments are those of ``python -m dien_tutorial train`` plus
``--backend``; ``DIR/metrics.json`` has the same fields as ``train`` writes,
plus ``world_size``, ``backend`` and the sharding figures.

How one optimiser step works, for ``W`` processes ("ranks"):

1. **Global batch.** ``--batch-size B`` is the *global* batch, the number
   of samples behind one optimiser step, as in ``train``. Each rank takes
   ``b = B / W`` of them, so ``B`` must be divisible by ``W``.
2. **Sharding.** Every rank draws the same shuffled order of the training
   samples for the epoch (the order ``fit`` uses, from the same seed), then
   takes every ``W``-th position starting at its rank. Its ``k``-th batch
   is the next ``b`` of those, so the ranks' ``k``-th batches together are
   exactly positions ``k*B .. (k+1)*B - 1`` of the order: the batch one
   process would see with ``--batch-size B``.
3. **Remainder: dropped.** The last ``N mod B`` positions of each epoch's
   order are not trained on, so that every rank runs the same number of
   equal batches and no all-reduce waits for a rank that has run out. The
   order changes every epoch, so different samples are left out each time.
   ``train``, by contrast, trains on a smaller last batch; with drop-last
   the two differ by that one batch per epoch.
4. **Gradients.** :class:`~torch.nn.parallel.DistributedDataParallel`
   averages the ranks' gradients, so each rank's loss must be its share of
   the global batch's loss times ``W``. The click loss is a mean over
   samples, and equal shares make the average of the ranks' means the
   global mean. The auxiliary loss is a mean over history *pairs*, whose
   count differs from rank to rank, so rank ``r``'s auxiliary loss is
   weighted by ``W * pairs_r / pairs_global``. Every rank can count the
   global pairs itself, from the history lengths of the global batch.
5. **Dice.** The head's Dice activation normalises with the statistics of
   the training batch, as batch norm does. Per-rank statistics would
   differ from the global batch's, so :class:`SyncDice` sums them over the
   ranks (the role ``SyncBatchNorm`` plays for batch norm).

With these, ``W`` ranks with global batch ``B`` take the same steps as one
process with batch ``B`` over the same order, up to floating-point
summation order (``tests/test_distributed.py`` measures how close).

Learning rate: since ``--batch-size`` is the global batch, changing the
number of processes changes nothing about the optimisation, so keep
``--lr``. Raising ``--batch-size`` to give each added process a full batch
is a different optimisation problem (fewer, less noisy steps per epoch) and
usually wants a larger learning rate; see the book's section on scaling out.

Evaluation runs on rank 0 alone, over the whole validation and test splits,
with the package's :func:`~dien_tutorial.train.evaluate` on the unwrapped
model: the numbers are those a single process gets from the same weights.
Rank 0 writes ``DIR/model.pt`` (the best epoch, as ``train`` does) with
:func:`~dien_tutorial.train.save_checkpoint` and ``DIR/metrics.json``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from dien_tutorial.data.samples import Batch, DienDataset
from dien_tutorial.layers import Dice
from dien_tutorial.train import (
    History,
    TrainConfig,
    evaluate,
    json_text,
    make_optimizer,
    model_inputs,
    save_checkpoint,
    seed_everything,
    write_atomically,
)

BACKENDS = ("gloo", "nccl")

# Errors that mean bad input or set-up, reported in one line with exit
# code 2 (as ``python -m dien_tutorial`` does; the data loaders raise the
# last four on damaged files).
BAD_INPUT = (ValueError, OSError, EOFError, OverflowError, RecursionError, zlib.error)

# The variables torchrun sets for every worker; a plain run has none of them.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# ---------------------------------------------------------------------------
# The world: who am I, how many are we, which backend
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: 0 .. world_size - 1; rank 0 evaluates and writes the files.
        world_size: number of processes ``W``.
        local_rank: rank among the processes of this machine (picks the GPU).
        backend: ``"gloo"``, ``"nccl"``, or ``None`` for a plain single
            process without a process group.
        device: where this rank trains: ``cuda:<local_rank>`` with nccl,
            else the CPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is (to be) initialised."""
        return self.backend is not None


def read_launch_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables.

    Returns:
        None when none of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` is set
        (a plain ``python -m`` run).

    Raises:
        ValueError: some are set and others not, one is not an integer, or
            they contradict each other; the message names the variable.
    """
    env = os.environ if env is None else env
    present = [name for name in _ENV if name in env]
    if not present:
        return None
    missing = [name for name in _ENV if name not in env]
    if missing:
        raise ValueError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}: "
            "launch with torchrun, which sets all of them, or unset them for a single process")
    values = {}
    for name in _ENV:
        try:
            values[name] = int(env[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK={rank} must lie in 0 .. WORLD_SIZE-1 = {world_size - 1}")
    if local_rank < 0:
        raise ValueError(f"environment variable LOCAL_RANK={local_rank} must be >= 0")
    return rank, world_size, local_rank


def choose_backend(requested: str | None, cuda_available: bool | None = None) -> str:
    """The collective backend: nccl when CUDA is there, else gloo.

    Args:
        requested: ``"gloo"``, ``"nccl"``, or None for the default.
        cuda_available: override ``torch.cuda.is_available()`` (for tests).

    Raises:
        ValueError: an unknown name, or nccl on a machine without CUDA.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested is None:
        return "nccl" if cuda else "gloo"
    if requested not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "nccl" and not cuda:
        raise ValueError(
            "--backend nccl needs CUDA GPUs, but torch.cuda.is_available() is False here; "
            "use --backend gloo (CPU) instead")
    return requested


def plan_world(backend: str | None, env: Mapping[str, str] | None = None,
               cuda_available: bool | None = None) -> World:
    """Work out the :class:`World` without touching the network.

    A plain run (no torchrun variables) is world size 1 without a process
    group. Under torchrun the backend is :func:`choose_backend`'s; nccl
    trains on ``cuda:<LOCAL_RANK>``, gloo on the CPU.

    Raises:
        ValueError: see :func:`read_launch_env` and :func:`choose_backend`;
            also nccl with fewer GPUs than ``LOCAL_RANK + 1``.
    """
    chosen = choose_backend(backend, cuda_available)
    launch = read_launch_env(env)
    if launch is None:
        return World()
    rank, world_size, local_rank = launch
    device = torch.device("cpu")
    if chosen == "nccl":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(
                f"LOCAL_RANK={local_rank} needs GPU {local_rank}, but this machine has {gpus}: "
                "start at most one process per GPU (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
    return World(rank, world_size, local_rank, chosen, device)


def init_world(world: World, timeout_minutes: float = 30.0) -> None:
    """Join the process group (a no-op for a plain single process).

    ``MASTER_ADDR`` and ``MASTER_PORT``, set by torchrun, say where rank 0
    listens for the others.
    """
    if not world.distributed or dist.is_initialized():
        return
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    dist.init_process_group(world.backend, rank=world.rank, world_size=world.world_size,
                            timeout=timedelta(minutes=timeout_minutes))


def close_world() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def agree(world: World, error: BaseException | None, step: str) -> None:
    """Make every rank fail together when any rank failed at ``step``.

    A rank that raised while the others went on would leave them waiting in
    the next collective until the timeout. Instead each rank reports
    whether it failed, and all raise if one did.

    Raises:
        ValueError: some rank failed; the message names the ranks (and, on
            a failed rank, repeats its own error).
    """
    if not world.distributed:
        if error is not None:
            raise error
        return
    flags = torch.zeros(world.world_size, dtype=torch.int64, device=world.device)  # [W]
    flags[world.rank] = int(error is not None)
    dist.all_reduce(flags)
    failed = [int(r) for r in torch.nonzero(flags).flatten().tolist()]
    if not failed:
        return
    if error is not None:
        raise ValueError(f"{step}: {error}") from error
    raise ValueError(f"{step} failed on rank(s) {failed}; see their messages")


# ---------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """``b = B / W``, the batch each rank trains on.

    Raises:
        ValueError: ``B`` not divisible by ``W`` (naming both).
    """
    if global_batch < 1:
        raise ValueError(f"--batch-size must be >= 1, got {global_batch}")
    if global_batch % world_size:
        raise ValueError(
            f"--batch-size {global_batch} (the global batch) is not divisible by the world size "
            f"{world_size}: each rank trains on batch-size / world-size samples; use a multiple "
            f"of {world_size}, e.g. {max(world_size, global_batch // world_size * world_size)}")
    return global_batch // world_size


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    """Full global batches in an epoch (the remainder is dropped).

    Raises:
        ValueError: fewer samples than one global batch, which would leave
            ranks without data.
    """
    if n_samples < global_batch:
        raise ValueError(
            f"the training split has {n_samples:,} samples, fewer than one global batch of "
            f"--batch-size {global_batch:,}: some rank would get no data; lower --batch-size")
    return n_samples // global_batch


def epoch_order(n_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of an epoch: int64 [N].

    The same permutation as :func:`dien_tutorial.train.fit` (through
    :meth:`DienDataset.batches`) visits, drawn from ``seed * 1000 + epoch``;
    every rank draws the same one.
    """
    return np.random.default_rng(seed * 1000 + epoch).permutation(n_samples)


def shard(order: np.ndarray, global_batch: int, world_size: int,
          rank: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This rank's batches of one epoch.

    Rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of ``order``, cut
    into batches of ``b = B / W``; the last ``len(order) mod B`` positions
    are dropped, so every rank yields the same number of batches, each of
    exactly ``b`` samples.

    Yields:
        ``(local [b], global_ [B])``: sample indices of this rank's batch and
        of the whole global batch it is part of (which every rank knows,
        since the order is shared).
    """
    per_rank_batch(global_batch, world_size)  # B divisible by W
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0 .. {world_size - 1}")
    for k in range(steps_per_epoch(len(order), global_batch)):
        global_ = order[k * global_batch:(k + 1) * global_batch]  # [B]
        # Position k*B + r + j*W of the order is rank r's j-th sample.
        yield global_[rank::world_size], global_  # [b], [B]


def aux_pairs(hist_len: np.ndarray) -> int:
    """Number of auxiliary-loss pairs of samples with these history lengths.

    :class:`~dien_tutorial.layers.AuxiliaryLoss` scores one pair per history
    step after the first: ``max(L - 1, 0)`` per sample.
    """
    return int(np.maximum(np.asarray(hist_len, dtype=np.int64) - 1, 0).sum())


# ---------------------------------------------------------------------------
# Dice with the statistics of the global batch
# ---------------------------------------------------------------------------


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` that gradients flow through.

    The sum's gradient with respect to each rank's term is the incoming
    gradient summed over the ranks, so the backward is an all-reduce too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 (see class)
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncDice(Dice):
    """:class:`~dien_tutorial.layers.Dice` whose training statistics cover all ranks.

    In training, the mean and (biased) variance are those of the global
    batch: sums over the ranks' rows divided by the total row count, with
    gradients flowing to every rank's rows. In eval mode, or without a
    process group, it is plain Dice. Same parameters and buffers as Dice, so
    a checkpoint loads into the ordinary model.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply Dice with global-batch statistics.

        Args:
            x: ``[b, A]``, this rank's rows.

        Returns:
            ``[b, A]``.
        """
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        # One all-reduce of [sum x, sum x^2, rows], in float64 so that
        # E[x^2] - E[x]^2 loses nothing to cancellation.
        x64 = x.double()  # [b, A]
        rows = x64.new_full((1,), float(x.shape[0]))  # [1]
        totals = _SumOverRanks.apply(torch.cat([x64.sum(dim=0), x64.square().sum(dim=0), rows]))  # [2A + 1]
        width, count = x.shape[1], totals[-1]
        mean64 = totals[:width] / count  # [A]
        mean = mean64.to(x.dtype)  # [A]
        var = (totals[width:2 * width] / count - mean64.square()).clamp_min(0).to(x.dtype)  # [A]
        centred = x - mean  # [b, A]
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        p = torch.sigmoid(centred * torch.rsqrt(var + self.eps))  # [b, A]
        return x * torch.addcmul(self.alpha, p, 1 - self.alpha)  # [b, A]


def sync_dice(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every :class:`Dice` in ``model`` by a :class:`SyncDice`, in place.

    Call before creating the optimiser (the parameters are new objects).

    Returns:
        ``model``.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Dice:
                replacement = SyncDice(child.alpha.numel(), eps=child.eps, momentum=child.momentum)
                replacement.load_state_dict(child.state_dict())
                setattr(parent, name, replacement.to(child.alpha.device))
    return model


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def needs_unused_parameters(model: torch.nn.Module) -> bool:
    """Whether DDP must look for parameters without a gradient each step.

    Every model from :func:`~dien_tutorial.model.build_model` uses all of its
    modules in the training forward pass: ``din``, ``gru_att`` and
    ``dien_no_aux`` build no auxiliary network at all, and ``dien`` runs it
    because the negatives are passed. Only a model that has the auxiliary
    network but weights it 0 leaves it idle.
    """
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "use_aux", False)) and float(getattr(cfg, "alpha", 0.0)) == 0.0


def aux_weight(model: torch.nn.Module) -> float:
    """``alpha`` of a model with the auxiliary loss, else 0 (as ``fit`` uses it)."""
    cfg = getattr(model, "config", None)
    return float(cfg.alpha) if getattr(cfg, "use_aux", False) else 0.0


def sharded_train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch,
                       alpha: float, pair_share: float, world_size: int,
                       max_grad_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on this rank's part of the global batch.

    :func:`dien_tutorial.train.train_step` with the auxiliary term weighted
    by this rank's share of the global batch's pairs; at world size 1
    (``pair_share`` 1) it computes exactly what ``train_step`` does.

    Args:
        model: the DDP-wrapped model (or the plain model at world size 1).
        opt: its optimiser.
        batch: this rank's ``b`` samples.
        alpha: weight of the auxiliary loss; 0 skips it.
        pair_share: ``pairs_r / pairs_global`` (1 for a single process).
        world_size: ``W``; DDP divides the summed gradients by it.
        max_grad_norm: clip the (averaged) gradient norm to this if set.

    Returns:
        ``(main, aux_part)``, detached: this rank's mean click loss and its
        part of the global batch's auxiliary loss (the parts of all ranks
        add up to the global auxiliary loss).
    """
    out = model(**model_inputs(batch, alpha > 0))
    main = F.binary_cross_entropy_with_logits(out.logit, batch.label)  # mean over b
    aux = out.aux_loss if alpha > 0 else torch.zeros((), device=out.logit.device)
    aux_part = aux * pair_share  # this rank's share of the global pair mean
    # DDP averages over W ranks: scaling by W turns the average into a sum.
    loss = main + alpha * (aux_part * world_size)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return main.detach(), aux_part.detach()


# DDP's switch for "do not broadcast buffers before every forward" was
# renamed in recent PyTorch; both spellings still sync them once at start.
_NO_BUFFER_BROADCAST = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False})


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return batch if device.type == "cpu" else Batch(*(t.to(device, non_blocking=True) for t in batch))


def _on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself on the CPU, else a CPU copy (for evaluation and saving)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).cpu()


def _broadcast_float(world: World, value: float) -> float:
    """Rank 0's ``value`` on every rank."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)  # [1]
    dist.broadcast(t, src=0)
    return float(t.item())


def weights_in_sync(world: World, model: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters and buffers.

    Compares the element-wise maximum and minimum over the ranks: they are
    equal exactly when all ranks agree.
    """
    if not world.distributed:
        return True
    flat = torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values()])  # [n]
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))


def fit_sharded(
    model: torch.nn.Module,
    train: DienDataset,
    valid: DienDataset,
    config: TrainConfig,
    world: World,
    checkpoint: str | Path | None = None,
    model_name: str = "dien",
    log: Callable[[str], None] | None = print,
) -> tuple[History, dict]:
    """:func:`dien_tutorial.train.fit` for ``W`` data-parallel ranks.

    Same early stopping on validation AUC, same history records, same
    checkpoint of the best epoch; no resuming. ``config.batch_size`` is the
    global batch. Every rank calls this with identically built data and an
    identically seeded model; the process group (if any) must be joined.

    Args:
        model: a model from :func:`~dien_tutorial.model.build_model`, on
            ``world.device``. Its Dice layers become :class:`SyncDice`.
        train, valid: the full splits (every rank holds all of them).
        config: training settings.
        world: this rank's :class:`World`.
        checkpoint: where rank 0 keeps the best model.
        model_name: stored in the checkpoint.
        log: one line per epoch, on rank 0 only; None for silence.

    Returns:
        ``(history, info)``; on rank 0 ``model`` ends holding the best
        weights. ``info`` has the sharding figures and whether the ranks
        ended with identical weights.
    """
    W = world.world_size
    b = per_rank_batch(config.batch_size, W)
    steps = steps_per_epoch(len(train), config.batch_size)
    alpha = aux_weight(model)
    model_config = model.config.to_dict()
    if world.distributed:
        sync_dice(model)
    opt = make_optimizer(model, config)
    net: torch.nn.Module = model
    if world.distributed:
        # DDP broadcasts rank 0's parameters and buffers here; SyncDice keeps
        # the Dice buffers equal afterwards, so no per-step buffer broadcast.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
            find_unused_parameters=needs_unused_parameters(model), **_NO_BUFFER_BROADCAST)
        if not weights_in_sync(world, model):
            raise RuntimeError("ranks hold different weights after DistributedDataParallel's broadcast")
    # Same generators as fit on rank 0; other ranks differ, for dropout masks.
    seed_everything(config.seed + world.rank)
    log = log if world.is_main else None

    history = History()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bad_epochs, seen, busy = 0, 0, 0.0
    checked_pairs = False
    for epoch in range(config.epochs):
        net.train()
        sums = torch.zeros(2, dtype=torch.float64, device=world.device)  # [main * b, aux part * B]
        t0 = time.perf_counter()
        batches = shard(epoch_order(len(train), config.seed, epoch), config.batch_size, W, world.rank)
        bar = tqdm(batches, total=steps, disable=not (config.progress and world.is_main),
                   desc=f"epoch {epoch}", leave=False)
        for local, global_ in bar:
            pairs_global = aux_pairs(train.data.hist_len[global_])
            pairs_local = aux_pairs(train.data.hist_len[local])
            share = pairs_local / pairs_global if pairs_global else 0.0
            if not checked_pairs and alpha > 0:
                _check_pair_count(model, train.batch(local), pairs_local)
                checked_pairs = True
            batch = _to_device(train.batch(local), world.device)
            main, aux_part = sharded_train_step(net, opt, batch, alpha, share, W, config.max_grad_norm)
            sums += torch.stack([main.double() * b, aux_part.double() * config.batch_size])
        if world.distributed:
            dist.all_reduce(sums)
        elapsed = time.perf_counter() - t0
        n = steps * config.batch_size
        seen += n
        busy += elapsed
        main_loss, aux_loss = (float(v) / n for v in sums.cpu())

        valid_auc = float("nan")
        valid_m: dict = {}
        if world.is_main:
            valid_m = evaluate(_on_cpu(model), valid, config.eval_batch_size)
            valid_auc = valid_m["auc"]
        valid_auc = _broadcast_float(world, valid_auc)  # every rank decides alike
        record = {
            "epoch": epoch,
            "main_loss": main_loss,
            "aux_loss": aux_loss,
            "alpha": alpha,
            "total_loss": main_loss + alpha * aux_loss,
            "valid_auc": valid_auc,
            "valid_gauc": valid_m.get("gauc", float("nan")),
            "valid_logloss": valid_m.get("logloss", float("nan")),
            "train_seconds": elapsed,
            "samples_per_s": n / elapsed if elapsed > 0 else float("nan"),
        }
        history.epochs.append(record)
        improved = valid_auc > history.best_valid_auc
        if improved:
            history.best_valid_auc = valid_auc
            history.best_epoch = epoch
            bad_epochs = 0
            if world.is_main:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if checkpoint is not None:
                    save_checkpoint(checkpoint, _on_cpu(model), model_name, model_config,
                                    extra={"epoch": epoch, "valid": valid_m, "world_size": W})
        else:
            bad_epochs += 1
        if log is not None:
            log(f"epoch {epoch:2d}  loss {record['total_loss']:.4f} = main {main_loss:.4f}"
                f" + {alpha:g} * aux {aux_loss:.4f}  valid auc {valid_auc:.4f}"
                f" gauc {record['valid_gauc']:.4f} logloss {record['valid_logloss']:.4f}"
                f"  {record['samples_per_s']:,.0f} samples/s on {W} rank(s){'  *' if improved else ''}")
        if bad_epochs > config.patience:
            history.stopped_early = True
            break
    in_sync = weights_in_sync(world, model)
    if not in_sync:
        raise RuntimeError("ranks ended training with different weights; the run is not data-parallel")
    if world.is_main:
        model.load_state_dict(best_state)
    history.train_samples_per_s = seen / busy if busy > 0 else float("nan")
    info = {
        "world_size": W,
        "backend": world.backend or "none",
        "per_rank_batch_size": b,
        "global_batch_size": config.batch_size,
        "steps_per_epoch": steps,
        "dropped_train_samples_per_epoch": len(train) - steps * config.batch_size,
        "ranks_identical_weights": in_sync,
    }
    return history, info


def _check_pair_count(model: torch.nn.Module, batch: Batch, expected: int) -> None:
    """Check once that the model counts the auxiliary pairs as :func:`aux_pairs` does."""
    with torch.no_grad():
        was_training = model.training
        model.eval()  # no Dice statistics update, no collective
        plain = _on_cpu(model)
        counted = int(plain(**model_inputs(batch, True)).aux_row_pairs.sum())
        model.train(was_training)
    if counted != expected:
        raise RuntimeError(f"the auxiliary loss scored {counted} pairs where the sharding "
                           f"expected {expected}: aux_pairs() no longer matches AuxiliaryLoss")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``train``, plus ``--backend``."""
    from dien_tutorial.cli import _add_train_args
    from dien_tutorial.model import MODEL_NAMES

    p = argparse.ArgumentParser(
        prog="torchrun --standalone --nproc_per_node N -m dien_tutorial.distributed",
        description="Train one model on N data-parallel processes (or plainly as one). "
                    "--batch-size is the global batch: each process trains on batch-size / N samples.")
    _add_train_args(p)
    p.add_argument("--model", choices=MODEL_NAMES, default="dien")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--out", required=True, help="folder for metrics.json and model.pt (rank 0 writes)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="collective backend under torchrun (default: nccl with CUDA, else gloo); "
                        "nccl trains on the GPUs, gloo on the CPU")
    return p


OUTPUT_FILES = ("model.pt", "metrics.json")  # what rank 0 writes into --out


def check_outputs(out: Path) -> None:
    """Check, before any training, that rank 0 will be able to write its files into ``out``.

    ``out`` is created if needed; it must be a folder we can create files
    in, and ``model.pt`` and ``metrics.json`` in it, if they exist, must
    not be folders (an old file is replaced).

    Raises:
        ValueError: ``out`` or one of the files is of the wrong kind.
        OSError: ``out`` cannot be created or written to (naming it).
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: rank 0 writes {' and '.join(OUTPUT_FILES)} "
                         "into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create --out {out}: {err.strerror or err}") from err
    for name in OUTPUT_FILES:
        target = out / name
        if target.is_dir():
            raise ValueError(f"{target} is a folder: rank 0 writes the file {name} there; move it away "
                             "or choose another --out")
    try:
        with tempfile.TemporaryFile(dir=out):  # the way to know: create a file, as the run will
            pass
    except OSError as err:
        raise OSError(f"cannot write in --out {out}: {err.strerror or err}") from err


def _write_json(path: Path, data: dict) -> None:
    """Write strict JSON atomically (:func:`dien_tutorial.train.write_atomically`); NaN becomes null."""
    text = json_text(data)
    write_atomically(path, lambda fh: fh.write(text.encode()))


def run(args: argparse.Namespace, world: World) -> dict | None:
    """Build data and model, train, and (rank 0) write the two files.

    Returns:
        The metrics on rank 0, None on the others.
    """
    from dien_tutorial.cli import _prepare, run_record
    from dien_tutorial.config import DIENConfig
    from dien_tutorial.model import build_model

    out = Path(args.out)
    error: BaseException | None = None
    try:
        if world.is_main:  # fail before any work, not after the last epoch
            check_outputs(out)
    except BAD_INPUT as err:
        error = err
    agree(world, error, "checking the output folder")

    samples = None
    try:
        samples = _prepare(args)
        steps_per_epoch(len(samples.dataset("train")), args.batch_size)
    except BAD_INPUT as err:
        error = err
    agree(world, error, "building the samples")
    _check_same_data(world, samples)

    preset = getattr(DIENConfig, args.preset)
    config = preset(n_items=len(samples.item_vocab), n_cates=len(samples.cate_vocab))
    seed_everything(args.seed)  # the same initial weights on every rank
    model = build_model(args.model, config).to(world.device)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       patience=args.patience, seed=args.seed, progress=not args.no_progress)
    t0 = time.perf_counter()
    history, info = fit_sharded(model, samples.dataset("train"), samples.dataset("valid"), tcfg,
                                world, checkpoint=out / "model.pt", model_name=args.model)
    wall = time.perf_counter() - t0
    if not world.is_main:
        return None
    test = evaluate(_on_cpu(model), samples.dataset("test"), tcfg.eval_batch_size)
    result = {**run_record(args, samples, args.model, args.seed, model, tcfg, history, test, wall), **info}
    _write_json(out / "metrics.json", result)
    return result


def _check_same_data(world: World, samples) -> None:
    """Every rank must have built the same samples, or the shards overlap and miss."""
    if not world.distributed:
        return
    train = samples.splits["train"]
    mine = torch.tensor([len(train), len(samples.splits["valid"]), len(samples.splits["test"]),
                         len(samples.item_vocab), len(samples.cate_vocab),
                         int(train.item.sum()), int(train.hist_start.sum())],
                        dtype=torch.int64, device=world.device)  # [7]
    everyone = [torch.zeros_like(mine) for _ in range(world.world_size)]
    dist.all_gather(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, everyone[0]):
            raise ValueError(
                f"rank {rank} built different samples from rank 0 (train samples "
                f"{int(theirs[0]):,} vs {int(everyone[0][0]):,}, item vocabulary "
                f"{int(theirs[3]):,} vs {int(everyone[0][3]):,}): every rank must read the "
                "same data with the same --source, --path, --data-seed and --max-len")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    world = World()
    try:
        world = plan_world(args.backend)
        per_rank_batch(args.batch_size, world.world_size)  # before any network setup
        init_world(world)
        result = run(args, world)
    except BAD_INPUT as err:
        prefix = f"rank {world.rank}: " if world.distributed else ""
        print(f"error: {prefix}{err}", file=sys.stderr)
        return 2
    finally:
        close_world()
    if result is not None:
        print(f"{args.model} on {result['world_size']} rank(s), backend {result['backend']}: "
              f"test auc {result['test_auc']:.4f}  gauc {result['test_gauc']:.4f}  "
              f"logloss {result['test_logloss']:.4f}  {result['train_samples_per_s']:,.0f} "
              f"train samples/s  {result['wall_seconds']:.1f} s")
        print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'model.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
