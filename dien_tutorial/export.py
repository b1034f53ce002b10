"""Export a trained model to ONNX, and check that the file computes what PyTorch computes.

Why the obvious export is wrong
-------------------------------
``torch.onnx.export(model, example_inputs)`` with the TorchScript exporter
works by *tracing*: it runs the model once on the example inputs and records
every tensor operation it sees. Python itself is not recorded. The interest
evolving layer (:func:`dien_tutorial.layers.evolve_interest`) is a Python
``for`` loop over the ``T`` history steps, so the trace holds ``T`` copies
of the GRU step, one after the other. The loop is *unrolled* and ``T``, the
length of the example history, is frozen into the graph. Declaring ``T``
dynamic in ``dynamic_axes`` does not help: the file then accepts histories
of any length, but the graph still performs exactly ``T`` steps. At any
other length the exported model either fails (our loop splits the history
with ``unbind``, and ONNX Runtime refuses to split 53 steps into 50 pieces)
or, for a loop that reads ``x[:, t]`` for ``t in range(T)``, silently reads
the first ``T`` steps only and returns a wrong click probability, with no
error at all. ``tests/test_export.py`` shows both (:func:`export_naive`
writes the unrolled graph so the book can show it too).

The cure is to compile the loop with ``torch.jit.script`` before export. A
scripted function is translated, not traced, so its ``for`` becomes one
ONNX ``Loop`` node whose trip count is read from the input at run time.
While tracing, :func:`export_onnx` makes the interest evolving layer call a
scripted :func:`~dien_tutorial.layers.evolve_interest` (written to be
scriptable for this purpose). The first GRU (the interest extractor) is
exported from its ``torch.nn.GRU``, a single ONNX ``GRU`` node that runs
over any length by itself.

Which exporter
--------------
Torch 2.13 has two. The default one (``dynamo=True``, built on
``torch.export``) does not turn a Python loop into a graph loop either.
When we tried it on this model it either fixed ``T`` to the example's
length (the file's input shape read ``[batch, 10]`` although ``T`` was
declared dynamic) and unrolled the steps, or, on the model's packed
training path, stopped with a data-dependent-shape error. Keeping the loop
would need it rewritten with one of ``torch.export``'s control-flow
operators. We use the TorchScript exporter, ``dynamo=False``, which
understands scripted functions. Torch 2.13 marks it and ``torch.jit.script``
deprecated; both still work, and their deprecation warnings are silenced
around the two calls only (nothing is silenced globally).

What is exported
----------------
The inference path: inputs ``item [B]``, ``cate [B]``, ``hist_item [B, T]``,
``hist_cate [B, T]``, ``length [B]`` (int64), outputs ``prob [B]`` and
``attention [B, T]``, with ``B`` and ``T`` dynamic. The auxiliary loss only
matters in training and is not exported. The model is exported in eval
mode (Dice uses its running statistics).

Checks on the exported graph (:func:`check_graph`)
--------------------------------------------------
- Every ONNX ``GRU`` node has ``linear_before_reset=1``. PyTorch's GRU
  applies the reset gate after the hidden projection, ``r * (W_hn h +
  b_hn)``; ONNX's default (0) applies it before, ``W_hn (r * h) + b_hn``,
  a different cell.
- DIEN's evolving layer is a ``Loop`` (or ``Scan``) node, and no ``Tanh``
  (one per unrolled GRU step) sits outside a loop.

Two repairs after export (:func:`_repair`)
------------------------------------------
- The exporter writes ``unbind`` as ``SplitToSequence`` with an explicit
  ``split`` of 1 and ``keepdims=0``. The ONNX specification says
  ``keepdims`` is ignored when ``split`` is given, so each piece would keep
  a length-1 step axis; ONNX Runtime drops the axis anyway, which is what
  PyTorch means. We remove the explicit ``split`` (1 is the default), so the
  node means the same to every runtime and to ONNX's shape inference.
- The shapes stored in the file were computed with the extra axis (and the
  loop state's width was labelled ``T``), which made ONNX Runtime warn at
  every loop step. We drop the stored intermediate shapes and let ONNX
  infer them again.

Then :func:`verify_onnx` runs the file in ONNX Runtime against the PyTorch
model at several batch sizes and history lengths, including lengths the
export never saw.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from dien_tutorial import layers
from dien_tutorial.config import DIEN_EVOLVING_KINDS, DIENConfig

INPUT_NAMES = ("item", "cate", "hist_item", "hist_cate", "length")
OUTPUT_NAMES = ("prob", "attention")
# Rank of every input and output, to check the axes of ``dynamic_axes``.
_RANKS = {"item": 1, "cate": 1, "hist_item": 2, "hist_cate": 2, "length": 1, "prob": 1, "attention": 2}

# Batch and history length free, everything else fixed.
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "item": {0: "batch"},
    "cate": {0: "batch"},
    "hist_item": {0: "batch", 1: "T"},
    "hist_cate": {0: "batch", 1: "T"},
    "length": {0: "batch"},
    "prob": {0: "batch"},
    "attention": {0: "batch", 1: "T"},
}

# ONNX opset 17: every operator used here has been stable since, and
# ONNX Runtime has run it since version 1.12.
OPSET = 17
LOOP_OPS = ("Loop", "Scan")


class ExportError(ValueError):
    """The exported graph is wrong, or does not match PyTorch.

    A ``ValueError`` so that ``python -m dien_tutorial export`` reports it as
    a one-line error instead of a traceback.
    """


# ---------------------------------------------------------------------- #
# Inputs and the module that is exported
# ---------------------------------------------------------------------- #
class InferenceGraph(nn.Module):
    """What the ONNX file computes: ``model.forward`` returning ``(prob, attention)``.

    Args:
        model: a :class:`dien_tutorial.model.DIEN`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, item: Tensor, cate: Tensor, hist_item: Tensor, hist_cate: Tensor,
                length: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(item, cate, hist_item, hist_cate, length)
        return out.prob, out.attention  # [B], [B, T]


def random_inputs(config: DIENConfig, batch: int, steps: int, seed: int = 0,
                  device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """A seeded batch that follows the data pipeline's contract.

    Ids are drawn from ``1 .. n - 1`` (1 = unknown, real ids from 2) and
    histories are right-padded with 0. The first rows have lengths ``steps``,
    0, 1 and 2 (a full history, an empty one and two short ones); the others
    are uniform in ``0 .. steps``.

    Args:
        config: supplies the vocabulary sizes.
        batch: ``B``.
        steps: ``T``.
        seed: seed of the generator.
        device: where to put the tensors.

    Returns:
        The five model inputs, by name, in :data:`INPUT_NAMES` order.
    """
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(0, steps + 1, (batch,), generator=g)  # [B]
    special = torch.tensor([steps, 0, 1, 2]).clamp(max=steps)[:batch]
    length[: len(special)] = special
    valid = torch.arange(steps) < length.unsqueeze(1)  # [B, T]

    def ids(vocab: int, shape: tuple[int, ...]) -> Tensor:
        return torch.randint(1, vocab, shape, generator=g)

    inputs = {
        "item": ids(config.n_items, (batch,)),
        "cate": ids(config.n_cates, (batch,)),
        "hist_item": ids(config.n_items, (batch, steps)) * valid,
        "hist_cate": ids(config.n_cates, (batch, steps)) * valid,
        "length": length,
    }
    return {name: value.to(device) for name, value in inputs.items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit.

    Export, verification and timing need eval mode, and the exporter sets
    the flags of the module it exports on its own as well; the caller's
    model should come back as it was.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


# ---------------------------------------------------------------------- #
# The scripted recurrence
# ---------------------------------------------------------------------- #
@contextlib.contextmanager
def _scripted_recurrence() -> Iterator[None]:
    """Make :class:`~dien_tutorial.layers.InterestEvolving` call a scripted loop.

    ``InterestEvolving.forward`` calls ``layers.evolve_interest``; for the
    duration of the block that name points to a scripted version. Not
    thread-safe: do not run the model in another thread while exporting.
    """
    eager = layers.evolve_interest
    scripted = eager if isinstance(eager, torch.jit.ScriptFunction) else layers.scripted(eager)

    def evolve_for_export(*args: Any, **kwargs: Any) -> Tensor:
        final = scripted(*args, **kwargs)  # [B, H]
        # The exporter does not know the rank of a Loop's result, and the
        # concatenation that follows in the model refuses to export without
        # it ("All tensors must have the same rank"). Flatten to 2-D is a
        # no-op here and tells it: rank 2.
        return final.flatten(1)  # [B, H]

    layers.evolve_interest = evolve_for_export
    try:
        yield
    finally:
        layers.evolve_interest = eager


# ---------------------------------------------------------------------- #
# Export
# ---------------------------------------------------------------------- #
def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"ONNX export needs the package {name!r}: pip install 'dien-tutorial[export]'") from err


def _check_dynamic_axes(dynamic_axes: Mapping[str, Any]) -> dict[str, dict[int, str]]:
    """Validate ``dynamic_axes`` against our input and output names.

    The exporter ignores a name it does not know, so a typo would silently
    freeze an axis. Axes may be a ``{axis: name}`` dict or a list of axes.

    Raises:
        ValueError: an unknown name, an axis out of range, or a bad axis name.
    """
    known = (*INPUT_NAMES, *OUTPUT_NAMES)
    checked: dict[str, dict[int, str]] = {}
    for key, axes in dynamic_axes.items():
        if key not in known:
            raise ValueError(
                f"dynamic_axes names {key!r}, which is not an input or output of the exported "
                f"model; inputs are {INPUT_NAMES}, outputs are {OUTPUT_NAMES}"
            )
        if not isinstance(axes, Mapping):
            axes = {axis: f"{key}_dim{axis}" for axis in axes}
        for axis, label in axes.items():
            if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < _RANKS[key]:
                raise ValueError(f"dynamic_axes[{key!r}] has axis {axis!r}; {key} has axes 0..{_RANKS[key] - 1}")
            if not isinstance(label, str) or not label:
                raise ValueError(f"dynamic_axes[{key!r}][{axis}] must be a non-empty string, got {label!r}")
        checked[key] = dict(axes)
    return checked


def _trace_to_onnx(model: nn.Module, dynamic_axes: Mapping[str, Any], example_batch: int,
                   example_steps: int, opset: int, scripted: bool) -> Any:
    """Run the TorchScript exporter; return the ONNX ``ModelProto`` (not yet repaired)."""
    onnx = _require("onnx")
    axes = _check_dynamic_axes(dynamic_axes)
    example = random_inputs(model.config, example_batch, example_steps, device=_device(model))
    buffer = io.BytesIO()
    wrapper = InferenceGraph(model)
    recurrence = _scripted_recurrence() if scripted else contextlib.nullcontext()
    with _kept_modes(model), recurrence, warnings.catch_warnings():
        wrapper.eval()
        # Known, harmless warnings of this export, silenced here only:
        # - torch 2.13 deprecates the TorchScript exporter (see the module
        #   docstring for why we still use it) and warns on every call, also
        #   from a context manager inside it.
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed\. Please remove usage",
                                category=DeprecationWarning)
        # - Every nn.GRU export warns that the initial state may be tied to the
        #   example's batch size. nn.GRU builds its zero state from the
        #   input's batch dimension, which the trace records as dynamic;
        #   verify_onnx checks batch sizes 1, 7 and 64.
        warnings.filterwarnings("ignore", message=r"Exporting a model to ONNX with a batch_size other than 1",
                                category=UserWarning)
        # - nn.GRU checks the state's size with a Python comparison of two
        #   shapes, both read from the same input; the trace may keep it as a
        #   constant because it only guards against misuse. Warnings from
        #   torch's rnn module only: one from our own code would still show.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.modules\.rnn")
        torch.onnx.export(
            wrapper,
            tuple(example.values()),
            buffer,
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    # Whether the substitute was used shows in the graph: check_graph
    # requires the evolving layer's Loop.
    return onnx.load_from_string(buffer.getvalue())


def export_onnx(model: nn.Module, path: str | Path, *, dynamic_axes: Mapping[str, Any] | None = None,
                example_batch: int = 3, example_steps: int = 8, opset: int = OPSET) -> Path:
    """Export the inference path of a model to an ONNX file.

    The interest evolving recurrence is scripted (an ONNX ``Loop``) and the
    extractor is an ONNX ``GRU``, so the file runs at any batch size and
    history length; the graph is checked with :func:`check_graph` before it
    is written. Run :func:`verify_onnx` to compare it with PyTorch.

    Args:
        model: a :class:`dien_tutorial.model.DIEN` (any variant or baseline);
            exported in eval mode, its train/eval flags are left as they were.
        path: the ``.onnx`` file to write (atomically; parent folders are
            created).
        dynamic_axes: ``{input or output name: {axis: label}}``; default
            :data:`DYNAMIC_AXES` (batch and history length).
        example_batch: batch size of the example traced. Not 1, so that no
            broadcasting over a batch of one can be mistaken for the rule.
        example_steps: history length of the example traced; the graph does
            not depend on it.
        opset: ONNX opset.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``dynamic_axes`` names something that is not an input or
            output (checked before anything runs).
        ExportError: the graph failed a check of :func:`check_graph`.
    """
    onnx = _require("onnx")
    axes = DYNAMIC_AXES if dynamic_axes is None else dynamic_axes
    proto = _repair(_trace_to_onnx(model, axes, example_batch, example_steps, opset, scripted=True))
    check_graph(proto, model.config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from dien_tutorial.train import write_atomically  # train pulls in scikit-learn and tqdm

    data = proto.SerializeToString()
    write_atomically(path, lambda fh: fh.write(data))
    return path


def export_naive(model: nn.Module, path: str | Path, example_steps: int = 8) -> Path:
    """The wrong way, kept for the book: trace the plain Python loop.

    Same exporter, same dynamic axes, but the evolving layer's ``for`` loop
    is traced as it is, so the file holds ``example_steps`` copies of the
    GRU step and only works for histories of exactly that length. No checks,
    no repairs.

    Args:
        model: a :class:`dien_tutorial.model.DIEN`.
        path: the ``.onnx`` file to write.
        example_steps: the history length that gets frozen into the graph.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    onnx = _require("onnx")
    proto = _trace_to_onnx(model, DYNAMIC_AXES, 3, example_steps, OPSET, scripted=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    return path


# ---------------------------------------------------------------------- #
# Graph surgery and checks
# ---------------------------------------------------------------------- #
def _subgraphs(node: Any) -> Iterator[Any]:
    onnx = _require("onnx")
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(graph: Any, depth: int = 0) -> Iterator[tuple[Any, int]]:
    """Every node of ``graph`` and of its subgraphs, with its nesting depth."""
    for node in graph.node:
        yield node, depth
        for sub in _subgraphs(node):
            yield from _walk(sub, depth + 1)


def _constant_value(name: str, constants: Mapping[str, Any]) -> np.ndarray | None:
    onnx = _require("onnx")
    source = constants.get(name)
    if source is None:
        return None
    if isinstance(source, onnx.TensorProto):
        return onnx.numpy_helper.to_array(source)
    for attr in source.attribute:
        if attr.name == "value":
            return onnx.numpy_helper.to_array(attr.t)
    return None


def _drop_unit_splits(graph: Any, constants: dict[str, Any]) -> None:
    """``SplitToSequence(x, split=1, keepdims=0)`` -> ``SplitToSequence(x, keepdims=0)``."""
    onnx = _require("onnx")
    constants = dict(constants)
    constants.update({init.name: init for init in graph.initializer})
    constants.update({n.output[0]: n for n in graph.node if n.op_type == "Constant"})
    for node in graph.node:
        if node.op_type == "SplitToSequence" and len(node.input) == 2:
            keepdims = next((onnx.helper.get_attribute_value(a) for a in node.attribute
                             if a.name == "keepdims"), 1)
            split = _constant_value(node.input[1], constants)
            if keepdims == 0 and split is not None and split.ndim == 0 and int(split) == 1:
                del node.input[1]
        for sub in _subgraphs(node):
            _drop_unit_splits(sub, constants)


def _used_names(graph: Any) -> set[str]:
    """Names read by any node or returned by any graph, subgraphs included."""
    used = {out.name for out in graph.output}
    for node, _ in _walk(graph):
        used.update(node.input)
        for sub in _subgraphs(node):
            used.update(out.name for out in sub.output)
    return used


def _drop_unused_constants(graph: Any, used: set[str]) -> None:
    keep = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    for node in graph.node:
        for sub in _subgraphs(node):
            _drop_unused_constants(sub, used)


def _forget_shapes(graph: Any, top: bool = True) -> None:
    """Drop stored intermediate shapes, for shape inference to redo.

    Inputs of a subgraph keep their rank (ONNX Runtime needs it for a
    loop's step counter and condition) but lose their sizes and labels;
    outputs of a subgraph lose their shape entirely.
    """
    del graph.value_info[:]
    if not top:
        for value in graph.input:
            for dim in value.type.tensor_type.shape.dim:
                dim.Clear()
        for value in graph.output:
            value.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for sub in _subgraphs(node):
            _forget_shapes(sub, top=False)


def _repair(proto: Any) -> Any:
    """Make the exported graph say what ONNX Runtime runs (see the module docstring)."""
    onnx = _require("onnx")
    _drop_unit_splits(proto.graph, {})
    _drop_unused_constants(proto.graph, _used_names(proto.graph))
    _forget_shapes(proto.graph)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    return proto


class GraphStats(NamedTuple):
    """Node counts of an ONNX graph.

    Attributes:
        top_level: nodes of the main graph.
        total: nodes including those inside loop bodies.
        ops: ``Counter`` of operator types over all nodes.
        loops: ``Loop`` plus ``Scan`` nodes.
        grus: ``GRU`` nodes.
        in_loops: nodes inside loop bodies.
    """

    top_level: int
    total: int
    ops: Counter
    loops: int
    grus: int
    in_loops: int


def graph_stats(model: Any) -> GraphStats:
    """Count the nodes of an ONNX model (a path or a ``ModelProto``)."""
    onnx = _require("onnx")
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    nodes = list(_walk(proto.graph))
    ops = Counter(node.op_type for node, _ in nodes)
    top = sum(1 for _, depth in nodes if depth == 0)
    return GraphStats(top, len(nodes), ops, sum(ops[op] for op in LOOP_OPS), ops["GRU"], len(nodes) - top)


def check_graph(proto: Any, config: DIENConfig) -> GraphStats:
    """Check an exported graph against the model's recurrences.

    Args:
        proto: the ONNX ``ModelProto``.
        config: the exported model's config.

    Returns:
        The graph's :class:`GraphStats`.

    Raises:
        ExportError: a GRU node with PyTorch-incompatible gates, a GRU node
            too many or too few, or an evolving layer that was unrolled.
    """
    onnx = _require("onnx")
    stats = graph_stats(proto)
    for node, _ in _walk(proto.graph):
        if node.op_type == "GRU":
            lbr = next((onnx.helper.get_attribute_value(a) for a in node.attribute
                        if a.name == "linear_before_reset"), 0)
            if lbr != 1:
                raise ExportError(
                    f"ONNX GRU node {node.name!r} has linear_before_reset={lbr}; PyTorch's GRU "
                    "applies the reset gate after the hidden projection, which is "
                    "linear_before_reset=1. This file would compute a different GRU."
                )
    expected_grus = 1 if config.has_extractor else 0
    if stats.grus != expected_grus:
        raise ExportError(f"expected {expected_grus} ONNX GRU node(s) (the interest extractor), found {stats.grus}")
    if config.evolving in DIEN_EVOLVING_KINDS and stats.loops == 0:
        raise ExportError(
            "the interest evolving layer has no Loop or Scan node in the graph: its recurrence was "
            "unrolled at the example's history length. export_onnx substitutes a scripted "
            "dien_tutorial.layers.evolve_interest while tracing (_scripted_recurrence in "
            "dien_tutorial/export.py); if InterestEvolving no longer calls it, update that function"
        )
    unrolled = sum(1 for node, depth in _walk(proto.graph) if node.op_type == "Tanh" and depth == 0)
    if unrolled:
        raise ExportError(
            f"{unrolled} Tanh node(s) outside any loop: a GRU recurrence was unrolled step by step"
        )
    return stats


# ---------------------------------------------------------------------- #
# Verification and latency
# ---------------------------------------------------------------------- #
def _session(path: str | Path, threads: int | None = None) -> Any:
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(inputs: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    return {name: inputs[name].detach().cpu().numpy() for name in INPUT_NAMES}


def _max_abs_diff(expected: Tensor, got: np.ndarray) -> float:
    expected_np = expected.detach().cpu().numpy()
    if expected_np.shape != got.shape:
        return float("inf")
    if expected_np.size == 0:
        return 0.0
    return float(np.abs(expected_np.astype(np.float64) - got.astype(np.float64)).max())


class ParityRow(NamedTuple):
    """One batch size and history length of :func:`verify_onnx`.

    ``max_abs_diff`` is the larger of the two outputs' differences; NaN if
    either side produced a NaN (which never passes).
    """

    batch: int
    steps: int
    max_abs_diff: float
    prob_diff: float
    attention_diff: float


@dataclass
class VerifyReport:
    """Every comparison :func:`verify_onnx` made."""

    rows: list[ParityRow]
    atol: float

    @property
    def max_abs_diff(self) -> float:
        """Largest difference over all rows (NaN if any row had one)."""
        diffs = [row.max_abs_diff for row in self.rows]
        return float("nan") if any(np.isnan(diffs)) else max(diffs, default=0.0)

    @property
    def ok(self) -> bool:
        """Whether every row is within ``atol`` (NaN never is)."""
        return all(row.max_abs_diff <= self.atol for row in self.rows)

    def lines(self) -> list[str]:
        """A table, one line per (batch, T)."""
        out = [f"  {'batch':>5}  {'T':>4}  {'prob':>9}  {'attention':>9}  {'max |diff|':>10}"]
        for row in self.rows:
            verdict = "ok" if row.max_abs_diff <= self.atol else "FAIL"
            out.append(f"  {row.batch:>5}  {row.steps:>4}  {row.prob_diff:>9.2e}  {row.attention_diff:>9.2e}"
                       f"  {row.max_abs_diff:>10.2e}  {verdict}")
        return out


def verify_onnx(model: nn.Module, path: str | Path, max_len: int, batches: Sequence[int] = (1, 7, 64),
                lengths: Sequence[int] | None = None, atol: float = 1e-5, seed: int = 0) -> VerifyReport:
    """Compare an exported file with the PyTorch model, in ONNX Runtime.

    Both run on the same seeded inputs (:func:`random_inputs`: mixed
    lengths with 0, 1 and 2 among them) at every batch size and history
    length; ``prob`` and ``attention`` are compared. PyTorch runs in eval
    mode (the model's flags are restored afterwards).

    Args:
        model: the model that was exported.
        path: the ``.onnx`` file.
        max_len: the history length the model was trained with.
        batches: batch sizes to check.
        lengths: history lengths ``T`` to check; default ``(3, max_len,
            max_len + 3)``, so one is longer than any the model saw.
        atol: largest allowed absolute difference.
        seed: seed of the inputs.

    Returns:
        A :class:`VerifyReport` with one row per (batch, T).

    Raises:
        ExportError: some difference exceeds ``atol`` (the message holds the
            whole table).
    """
    steps_list = list(dict.fromkeys(lengths if lengths is not None else (3, max_len, max_len + 3)))
    session = _session(path)
    reference = InferenceGraph(model)
    rows = []
    with _kept_modes(model), torch.inference_mode():
        model.eval()
        for batch in batches:
            for steps in steps_list:
                inputs = random_inputs(model.config, batch, steps, seed=seed + 1009 * batch + steps,
                                       device=_device(model))
                prob, attention = reference(**inputs)
                got_prob, got_attention = session.run(list(OUTPUT_NAMES), _feeds(inputs))
                prob_diff = _max_abs_diff(prob, got_prob)
                attention_diff = _max_abs_diff(attention, got_attention)
                worst = float("nan") if np.isnan([prob_diff, attention_diff]).any() else max(prob_diff, attention_diff)
                rows.append(ParityRow(batch, steps, worst, prob_diff, attention_diff))
    report = VerifyReport(rows, atol)
    if not report.ok:
        raise ExportError(f"{path}: ONNX Runtime differs from PyTorch by more than {atol:g}:\n"
                          + "\n".join(report.lines()))
    return report


def _time_once(run: Callable[[], Any], timings: list[float]) -> None:
    start = time.perf_counter()
    run()
    timings.append((time.perf_counter() - start) * 1e3)


def benchmark_latency(model: nn.Module, path: str | Path, batches: Sequence[int] = (1, 256), T: int = 50,
                      repeats: int = 30, warmup: int = 3, seed: int = 0) -> dict[int, dict[str, float]]:
    """Median latency of one forward pass, PyTorch vs ONNX Runtime, on CPU.

    Both use ``torch.get_num_threads()`` intra-op threads. PyTorch runs the
    eager model under ``torch.inference_mode()``; ONNX Runtime runs the file
    with its default graph optimisations. Medians resist the odd slow run,
    but on a busy machine compare numbers taken together only.

    Args:
        model: the exported model.
        path: its ``.onnx`` file.
        batches: batch sizes to time.
        T: history length of the inputs.
        repeats: timed runs per batch size and framework.
        warmup: untimed runs first.
        seed: seed of the inputs.

    Returns:
        ``{batch: {"torch_ms": ..., "onnxruntime_ms": ..., "threads": ...}}``.
    """
    threads = torch.get_num_threads()
    session = _session(path, threads)
    reference = InferenceGraph(model)
    result: dict[int, dict[str, float]] = {}
    with _kept_modes(model), torch.inference_mode():
        model.eval()
        for batch in batches:
            inputs = random_inputs(model.config, batch, T, seed=seed, device=_device(model))
            feeds = _feeds(inputs)

            def run_torch() -> Any:
                return reference(**inputs)

            def run_ort() -> Any:
                return session.run(list(OUTPUT_NAMES), feeds)

            torch_ms: list[float] = []
            ort_ms: list[float] = []
            # One framework after the other, not alternating: ONNX Runtime's
            # threads keep spinning for a moment after each run, and would
            # slow down a PyTorch run started right after it.
            for run, timings in ((run_torch, torch_ms), (run_ort, ort_ms)):
                for _ in range(warmup):
                    run()
                for _ in range(repeats):
                    _time_once(run, timings)
            result[batch] = {"torch_ms": statistics.median(torch_ms),
                             "onnxruntime_ms": statistics.median(ort_ms), "threads": threads}
    return result


# ---------------------------------------------------------------------- #
# From a checkpoint
# ---------------------------------------------------------------------- #
@dataclass
class ExportReport:
    """What :func:`export_checkpoint` did."""

    path: Path
    checkpoint: Path
    model_name: str
    evolving: str
    opset: int
    file_bytes: int
    graph: GraphStats
    parity: VerifyReport
    latency: dict[int, dict[str, float]]
    max_len: int

    def summary(self) -> str:
        """A readable multi-line report."""
        g = self.graph
        lines = [
            f"wrote {self.path} ({self.file_bytes / 1024:,.1f} KiB) from {self.checkpoint}",
            f"model {self.model_name} (evolving={self.evolving}), ONNX opset {self.opset}, "
            "TorchScript exporter (dynamo=False), batch and T dynamic",
            f"graph: {g.top_level} nodes, {g.total} including loop bodies; "
            f"GRU {g.grus}, Loop/Scan {g.loops} ({g.in_loops} nodes inside)",
            f"parity with PyTorch, onnxruntime CPU, atol {self.parity.atol:g} "
            f"(max |diff| {self.parity.max_abs_diff:.2e}):",
            *self.parity.lines(),
        ]
        if self.latency:
            threads = next(iter(self.latency.values()))["threads"]
            lines.append(f"latency, median ms per batch (T={self.max_len}, {threads:g} threads):")
            lines.append(f"  {'batch':>5}  {'PyTorch':>9}  {'ONNX Runtime':>12}  {'speed-up':>8}")
            for batch, row in self.latency.items():
                speedup = row["torch_ms"] / row["onnxruntime_ms"] if row["onnxruntime_ms"] > 0 else float("nan")
                lines.append(f"  {batch:>5}  {row['torch_ms']:>9.3f}  {row['onnxruntime_ms']:>12.3f}"
                             f"  {speedup:>7.2f}x")
        return "\n".join(lines)


def model_for_export(checkpoint: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint, after checking every field of the file.

    The checks are those of :func:`dien_tutorial.train.model_from_checkpoint`
    (the one loading path of the package), so nothing is built before the
    file is known to describe a model that can be exported:

    - ``model_name`` is a string, ``model_config`` a dict that
      :meth:`DIENConfig.from_dict` accepts, ``model_state`` a dict of
      tensors;
    - every tensor of ``model_state`` has the name and shape the config
      asks for. The expected shapes come from the model built on PyTorch's
      ``meta`` device, which allocates no memory, so a config with absurd
      sizes (``n_items = 2**40``) is reported, not allocated;
    - every weight is finite and no running variance is negative: such a
      model would export, then fail the parity check with NaN everywhere.

    Args:
        checkpoint: a file written by :func:`dien_tutorial.train.save_checkpoint`.

    Returns:
        ``(model, state)``: the model in eval mode, and the checkpoint's dict.

    Raises:
        FileNotFoundError: no checkpoint file.
        ValueError: an unreadable file, or a field that is missing, of the
            wrong type, or disagrees with the config (the message names the
            file and the field).
    """
    from dien_tutorial.train import model_from_checkpoint

    return model_from_checkpoint(checkpoint)


def _check_out_path(checkpoint: Path, out: Path) -> None:
    """Refuse an ``out`` that is the checkpoint itself, or a folder.

    Raises:
        ValueError: naming both paths.
    """
    same = out.resolve() == checkpoint.resolve()
    if not same and out.exists() and checkpoint.exists():
        same = os.path.samefile(out, checkpoint)  # a hard link, or another path to the same file
    if same:
        raise ValueError(f"out {out} is the checkpoint {checkpoint} itself: writing the ONNX file there would "
                         f"destroy the checkpoint; choose another path, e.g. {checkpoint.with_suffix('.onnx')}")
    if out.is_dir():
        raise ValueError(f"out {out} is a folder: give the path of the .onnx file to write, "
                         f"e.g. {out / (checkpoint.stem + '.onnx')}")


def export_checkpoint(checkpoint: str | Path, out: str | Path, max_len: int = 50, *,
                      batches: Sequence[int] = (1, 7, 64), atol: float = 1e-5,
                      latency_batches: Sequence[int] = (1, 256), repeats: int = 30) -> ExportReport:
    """Export a checkpoint written by ``train``, verify it and time it.

    Args:
        checkpoint: a file written by :func:`dien_tutorial.train.save_checkpoint`
            (read with ``weights_only=True``).
        out: the ``.onnx`` file to write.
        max_len: the history length the model was trained with; parity is
            checked at ``T = 3, max_len, max_len + 3`` and latency at
            ``T = max_len``.
        batches: batch sizes of the parity check.
        atol: largest allowed difference to PyTorch.
        latency_batches: batch sizes to time (empty: no timing).
        repeats: timed runs per batch size.

    Returns:
        An :class:`ExportReport`; ``print(report.summary())``.

    The file is written under a temporary name next to ``out`` and renamed
    to ``out`` only once the parity check has passed: a file that fails it
    is deleted, and an existing ``out`` stays as it was.

    Raises:
        FileNotFoundError: no checkpoint file.
        ValueError: an unreadable checkpoint, a field of it that is missing,
            of the wrong type, non-finite or disagrees with its config
            (see :func:`model_for_export`), or ``out`` is the checkpoint
            itself or a folder.
        ExportError: a graph check or the parity check failed.
    """
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    _check_out_path(checkpoint, out)
    try:
        model, state = model_for_export(checkpoint)
    except RuntimeError as err:  # load_state_dict: a weight that does not fit after all
        raise ValueError(f"{checkpoint}: the weights do not fit the model it names ({err})") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, unverified = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".unverified", dir=out.parent)
    os.close(fd)
    try:
        export_onnx(model, unverified)
        graph = graph_stats(unverified)
        try:
            parity = verify_onnx(model, unverified, max_len, batches=batches, atol=atol)
        except ExportError as err:  # name the file asked for, not the temporary one
            raise ExportError(f"{out} not written: " + str(err).removeprefix(f"{unverified}: ")) from err
        os.replace(unverified, out)
    except BaseException:
        Path(unverified).unlink(missing_ok=True)
        raise
    path = out
    latency = benchmark_latency(model, path, batches=latency_batches, T=max_len, repeats=repeats) \
        if latency_batches else {}
    return ExportReport(path=path, checkpoint=checkpoint, model_name=str(state["model_name"]),
                        evolving=model.config.evolving, opset=OPSET, file_bytes=path.stat().st_size,
                        graph=graph, parity=parity, latency=latency, max_len=max_len)
