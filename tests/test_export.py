"""ONNX export: parity with PyTorch, the shape of the graph, and the pitfall it avoids."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dien_tutorial.cli import main  # noqa: E402
from dien_tutorial.config import DIENConfig  # noqa: E402
from dien_tutorial.export import (  # noqa: E402
    DYNAMIC_AXES,
    INPUT_NAMES,
    ExportError,
    check_graph,
    export_checkpoint,
    export_naive,
    export_onnx,
    graph_stats,
    random_inputs,
    verify_onnx,
)
from dien_tutorial.model import MODEL_NAMES, build_model  # noqa: E402
from dien_tutorial.train import save_checkpoint  # noqa: E402

MAX_LEN = 6  # parity is checked at T = 3, 6 and 9
EVOLVING = ("augru", "agru", "aigru")
CASES = [(name, None) for name in MODEL_NAMES if name not in ("dien", "dien_no_aux")] + [
    (name, kind) for name in ("dien", "dien_no_aux") for kind in EVOLVING
]


def case_id(case: tuple[str, str | None]) -> str:
    return case[0] if case[1] is None else f"{case[0]}-{case[1]}"


def tiny_model(name: str, evolving: str | None = None, seed: int = 0) -> nn.Module:
    """A tiny model with every parameter and Dice statistic away from its initial value.

    At initialisation Dice's alpha is 0 and its statistics are 0 and 1, which
    would hide a mistake in how the export handles them.
    """
    config = DIENConfig.tiny(**({"evolving": evolving} if evolving else {}))
    torch.manual_seed(seed)
    model = build_model(name, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.5)
        for buf_name, buf in model.named_buffers():
            if buf_name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif buf_name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name, evolving) -> (model, path)``, each exported once per module."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("onnx")

    def get(name: str, evolving: str | None = None):
        key = (name, evolving)
        if key not in cache:
            model = tiny_model(name, evolving)
            cache[key] = (model, export_onnx(model, folder / f"{name}-{evolving}.onnx"))
        return cache[key]

    return get


def gru_nodes(path) -> list:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "GRU"]


# ---------------------------------------------------------------------- #
# Parity and graph shape, for every model and variant
# ---------------------------------------------------------------------- #
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_onnxruntime_matches_pytorch_at_every_batch_and_length(case, exported):
    model, path = exported(*case)
    report = verify_onnx(model, path, max_len=MAX_LEN)
    assert [(r.batch, r.steps) for r in report.rows] == [
        (b, t) for b in (1, 7, 64) for t in (3, MAX_LEN, MAX_LEN + 3)
    ]
    assert report.ok and report.max_abs_diff <= 1e-5
    for row in report.rows:
        assert 0 <= row.prob_diff <= 1e-5 and 0 <= row.attention_diff <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_graph_has_pytorch_grus_and_a_loop_for_dien(case, exported):
    model, path = exported(*case)
    grus = gru_nodes(path)
    assert len(grus) == (0 if case[0] == "din" else 1)
    for node in grus:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["linear_before_reset"] == 1
    stats = graph_stats(path)
    if case[1] is not None:  # DIEN: the evolving layer is a loop, not unrolled
        assert stats.loops >= 1 and stats.in_loops > 0
        loop_ops = [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in ("Loop", "Scan")]
        assert loop_ops
    else:
        assert stats.loops == 0
    # inputs and outputs carry the dynamic labels
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}
    assert dims == {"item": ["batch"], "cate": ["batch"], "hist_item": ["batch", "T"],
                    "hist_cate": ["batch", "T"], "length": ["batch"], "prob": ["batch"],
                    "attention": ["batch", "T"]}


def test_check_graph_rejects_a_gru_with_the_onnx_default_gates(exported):
    model, path = exported("dien", "augru")
    proto = onnx.load(str(path))
    check_graph(proto, model.config)  # the real file passes
    (node,) = [n for n in proto.graph.node if n.op_type == "GRU"]
    for attr in node.attribute:
        if attr.name == "linear_before_reset":
            attr.i = 0
    with pytest.raises(ExportError, match="linear_before_reset=0"):
        check_graph(proto, model.config)
    # absent attribute = the ONNX default, 0: also rejected
    keep = [a for a in node.attribute if a.name != "linear_before_reset"]
    del node.attribute[:]
    node.attribute.extend(keep)
    with pytest.raises(ExportError, match="linear_before_reset=0"):
        check_graph(proto, model.config)


@pytest.mark.parametrize("name", ["dien", "gru_att", "din"])
def test_graph_does_not_grow_with_the_example_length(name, tmp_path):
    model = tiny_model(name)
    short = graph_stats(export_onnx(model, tmp_path / "short.onnx", example_steps=4))
    long = graph_stats(export_onnx(model, tmp_path / "long.onnx", example_steps=11))
    assert short.total == long.total and short.ops == long.ops
    assert short.ops["Tanh"] == long.ops["Tanh"] <= 1  # one GRU step, inside the loop


# ---------------------------------------------------------------------- #
# Errors, side effects, warnings
# ---------------------------------------------------------------------- #
def test_unknown_dynamic_axis_name_is_a_value_error_naming_it(tmp_path):
    model = tiny_model("dien")
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="'histitem'"):
        export_onnx(model, out, dynamic_axes={**DYNAMIC_AXES, "histitem": {1: "T"}})
    with pytest.raises(ValueError, match=r"dynamic_axes\['item'\] has axis 1"):
        export_onnx(model, out, dynamic_axes={"item": {1: "batch"}})
    assert not out.exists()


def test_export_restores_train_flags_and_warns_about_nothing(tmp_path):
    model = tiny_model("dien")
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, tmp_path / "m.onnx")
    assert [str(w.message) for w in caught] == []
    assert all(module.training for module in model.modules())


def test_verify_runs_without_onnxruntime_warnings(exported, capfd):
    model, path = exported("dien", "aigru")
    verify_onnx(model, path, max_len=MAX_LEN, batches=(5,))
    err = capfd.readouterr().err
    assert "onnxruntime" not in err, err  # e.g. "VerifyOutputSizes" on the loop state


def test_verify_raises_with_the_table_when_the_file_is_stale(tmp_path):
    model = tiny_model("dien", "agru")
    path = export_onnx(model, tmp_path / "m.onnx")
    with torch.no_grad():
        model.evolving.cell.weight_hh.add_(0.5)  # the model moves on; the file does not
    with pytest.raises(ExportError, match="differs from PyTorch") as err:
        verify_onnx(model, path, max_len=MAX_LEN, batches=(7,))
    assert "FAIL" in str(err.value) and "batch" in str(err.value)


# ---------------------------------------------------------------------- #
# The pitfall: tracing a Python loop
# ---------------------------------------------------------------------- #
def test_naive_export_unrolls_the_loop_and_freezes_T(tmp_path):
    model = tiny_model("dien", "augru")
    four = graph_stats(export_naive(model, tmp_path / "four.onnx", example_steps=4))
    six = graph_stats(export_naive(model, tmp_path / "six.onnx", example_steps=6))
    assert four.loops == six.loops == 0
    assert (four.ops["Tanh"], six.ops["Tanh"]) == (4, 6)  # one GRU step per traced step
    assert six.total > four.total

    # Run the T=6 file on a history of 7 steps: an error, or wrong numbers.
    session = ort.InferenceSession(str(tmp_path / "six.onnx"), providers=["CPUExecutionProvider"])
    inputs = random_inputs(model.config, 5, 7)
    with torch.no_grad():
        expected = model(**inputs).prob.numpy()
    try:
        (got,) = session.run(["prob"], {k: v.numpy() for k, v in inputs.items()})
    except Exception as err:  # today: Split cannot cut 7 steps into 6 pieces
        assert "Split" in str(err)
    else:
        assert np.abs(got - expected).max() > 1e-3


class RunningSum(nn.Module):
    """``h_t = tanh(h_{t-1} + x_t)`` with a Python loop that indexes ``x[:, t]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            h = torch.tanh(h + x[:, t])
        return h


def test_traced_python_loop_silently_reads_only_the_traced_steps(tmp_path):
    path = tmp_path / "sum.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice, and the tracer's
        # warning that range(x.shape[1]) is frozen: that freezing is the
        # point of this test.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(RunningSum(), (torch.randn(2, 4, 3),), str(path), dynamo=False,
                          input_names=["x"], output_names=["h"], dynamic_axes={"x": {0: "b", 1: "t"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 9, 3)
    (got,) = session.run(None, {"x": x.numpy()})  # accepted without complaint...
    assert np.allclose(got, RunningSum()(x[:, :4]).numpy(), atol=1e-6)  # ...but only 4 steps were read
    assert np.abs(got - RunningSum()(x).numpy()).max() > 1e-2


# ---------------------------------------------------------------------- #
# From a checkpoint, and from the command line
# ---------------------------------------------------------------------- #
@pytest.fixture()
def checkpoint(tmp_path):
    model = tiny_model("dien", "augru")
    return save_checkpoint(tmp_path / "model.pt", model, "dien", model.config.to_dict())


def test_export_checkpoint_end_to_end(checkpoint, tmp_path):
    report = export_checkpoint(checkpoint, tmp_path / "out" / "model.onnx", max_len=5, repeats=3)
    assert report.path.is_file() and report.file_bytes == report.path.stat().st_size
    assert report.model_name == "dien" and report.evolving == "augru"
    assert report.graph.grus == 1 and report.graph.loops == 1
    assert [(r.batch, r.steps) for r in report.parity.rows] == [(b, t) for b in (1, 7, 64) for t in (3, 5, 8)]
    assert set(report.latency) == {1, 256}
    for row in report.latency.values():
        assert row["torch_ms"] > 0 and row["onnxruntime_ms"] > 0 and row["threads"] == torch.get_num_threads()
    text = report.summary()
    for needle in ("wrote", "opset 17", "GRU 1", "Loop/Scan 1", "parity", "latency", "ONNX Runtime"):
        assert needle in text
    assert sum(line.rstrip().endswith(" ok") for line in text.splitlines()) == 9


def test_cli_export_exits_0_and_prints_the_parity_table(checkpoint, tmp_path):
    out = tmp_path / "cli.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "dien_tutorial", "export", "--checkpoint", str(checkpoint),
         "--out", str(out), "--max-len", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    parity = [line.split() for line in done.stdout.splitlines() if line.rstrip().endswith(" ok")]
    assert [(int(p[0]), int(p[1])) for p in parity] == [(b, t) for b in (1, 7, 64) for t in (3, 4, 7)]
    assert "parity with PyTorch" in done.stdout and "latency" in done.stdout


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        export_checkpoint(bad, tmp_path / "m.onnx")
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "model.pt: not a readable checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoint_with_weights_of_another_model_is_a_value_error(tmp_path):
    model = tiny_model("dien")
    path = save_checkpoint(tmp_path / "model.pt", model, "din", model.config.to_dict())
    with pytest.raises(ValueError, match="do not fit"):
        export_checkpoint(path, tmp_path / "m.onnx")


def test_random_inputs_follow_the_batch_contract():
    config = DIENConfig.tiny()
    inputs = random_inputs(config, 6, 5, seed=3)
    assert list(inputs) == list(INPUT_NAMES)
    assert inputs["length"][:4].tolist() == [5, 0, 1, 2]
    valid = torch.arange(5) < inputs["length"].unsqueeze(1)
    assert bool((inputs["hist_item"][~valid] == 0).all()) and bool((inputs["hist_item"][valid] >= 1).all())
    assert random_inputs(config, 1, 2)["length"].tolist() == [2]


# ---------------------------------------------------------------------- #
# Checkpoints that must not be exported, and outputs that must not be written
# ---------------------------------------------------------------------- #
def _folder_listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("how", ["same-path", "dotdot-path", "symlink", "hard-link"])
def test_out_that_is_the_checkpoint_itself_is_refused(how, checkpoint, tmp_path, capsys):
    before = checkpoint.read_bytes()
    (tmp_path / "sub").mkdir()
    out = {"same-path": lambda: checkpoint,
           "dotdot-path": lambda: tmp_path / "sub" / ".." / checkpoint.name,
           "symlink": lambda: (tmp_path / "link.onnx").symlink_to(checkpoint) or tmp_path / "link.onnx",
           "hard-link": lambda: (tmp_path / "hard.onnx").hardlink_to(checkpoint) or tmp_path / "hard.onnx"}[how]()
    with pytest.raises(ValueError, match="is the checkpoint .* itself: writing the ONNX file there would "
                                         "destroy the checkpoint"):
        export_checkpoint(checkpoint, out)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "choose another path, e.g. " + str(checkpoint.with_suffix(".onnx")) in capsys.readouterr().err
    assert checkpoint.read_bytes() == before


def test_out_that_is_a_folder_is_refused(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"is a folder: give the path of the \.onnx file to write"):
        export_checkpoint(checkpoint, tmp_path)


def _save_raw(path, **fields):
    """A checkpoint dict as save_checkpoint writes it, with some fields replaced."""
    model = tiny_model("dien", "augru")
    state = {"format": 1, "model_name": "dien", "model_config": model.config.to_dict(),
             "model_state": model.state_dict(), "optimizer_state": None, "extra": {}}
    state.update(fields)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("fields, message", [
    ({"model_config": None}, "the field 'model_config' must be a dict of DIENConfig fields, got NoneType"),
    ({"model_config": [1, 2]}, "the field 'model_config' must be a dict of DIENConfig fields, got list"),
    ({"model_state": None}, "the field 'model_state' must be a dict of weight tensors, got NoneType"),
    ({"model_state": {}}, "the field 'model_state' must be a dict of weight tensors, got an empty dict"),
    ({"model_name": ["dien"]}, "the field 'model_name' must be a string such as 'dien', got a list"),
], ids=["config-None", "config-list", "state-None", "state-empty", "name-list"])
def test_checkpoint_field_of_the_wrong_type_exits_2_naming_it(fields, message, tmp_path, capsys):
    path = _save_raw(tmp_path / "model.pt", **fields)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        export_checkpoint(path, tmp_path / "m.onnx")
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == f"error: {path}: {message}\n"
    assert _folder_listing(tmp_path) == ["model.pt"]


def test_config_with_an_absurd_vocabulary_is_named_without_allocating_it(tmp_path, monkeypatch):
    model = tiny_model("dien", "augru")
    config = {**model.config.to_dict(), "n_items": 2**40}  # 2**40 x 4 float32 = 16 TiB if built
    path = _save_raw(tmp_path / "model.pt", model_config=config)

    def no_real_model(*args, **kwargs):
        raise AssertionError("a model was built on a real device before the shapes were checked")

    import dien_tutorial.model

    real_build = dien_tutorial.model.build_model

    def build_on_meta_only(name, cfg):
        if torch.empty(0).device.type != "meta":
            no_real_model()
        return real_build(name, cfg)

    monkeypatch.setattr(dien_tutorial.model, "build_model", build_on_meta_only)
    n_items = model.config.n_items
    with pytest.raises(ValueError, match=(
            rf"model_state\['embedding.item.weight'\] has shape \[{n_items:,}, 4\], but model_config asks "
            r"for \[1,099,511,627,776, 4\]; axis 0 follows model_config's n_items = 1,099,511,627,776")):
        export_checkpoint(path, tmp_path / "m.onnx")
    assert _folder_listing(tmp_path) == ["model.pt"]


def test_weights_that_disagree_with_the_config_name_the_tensor_and_field(tmp_path):
    model = tiny_model("dien", "augru")
    weights = dict(model.state_dict())
    weights["evolving.cell.weight_hh"] = torch.zeros(12, 4)  # the config's hidden is 8: [24, 8]
    path = _save_raw(tmp_path / "model.pt", model_state=weights)
    with pytest.raises(ValueError, match=(
            r"model_state\['evolving.cell.weight_hh'\] has shape \[12, 4\], but model_config asks for \[24, 8\]; "
            r"axis 0 follows model_config's (.* or )?3 x hidden = 3 x 8")):  # n_cates is 8 as well
        export_checkpoint(path, tmp_path / "m.onnx")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(value, tmp_path, capsys):
    model = tiny_model("dien", "augru")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["attention.first.bias"][3] = value
    path = _save_raw(tmp_path / "model.pt", model_state=weights)
    message = (f"{path}: model_state['attention.first.bias'] holds 1 NaN or infinite value(s) of 8: the "
               "training diverged or the file is damaged")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        export_checkpoint(path, tmp_path / "m.onnx")
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert _folder_listing(tmp_path) == ["model.pt"]


def test_a_file_that_fails_parity_is_never_left_at_out(checkpoint, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    out = folder / "model.onnx"
    out.write_bytes(b"the previous, verified export")
    with pytest.raises(ExportError, match=r"model\.onnx not written: ONNX Runtime differs from PyTorch by more "
                                          r"than -1:\n  batch"):
        export_checkpoint(checkpoint, out, max_len=4, atol=-1.0, batches=(2,), latency_batches=())
    assert out.read_bytes() == b"the previous, verified export"  # untouched
    assert _folder_listing(folder) == ["model.onnx"]  # and no temporary file left behind
    fresh = folder / "fresh.onnx"
    with pytest.raises(ExportError, match="fresh.onnx not written"):
        export_checkpoint(checkpoint, fresh, max_len=4, atol=-1.0, batches=(2,), latency_batches=())
    assert _folder_listing(folder) == ["model.onnx"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_exported_file_gets_the_mode_of_a_normal_new_file(checkpoint, tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        report = export_checkpoint(checkpoint, tmp_path / "out" / "m.onnx", max_len=4, batches=(2,),
                                   latency_batches=())
    finally:
        os.umask(before)
    assert report.path.stat().st_mode & 0o777 == mode
    assert report.parity.ok and _folder_listing(tmp_path / "out") == ["m.onnx"]


def test_negative_running_variance_is_refused_at_load_naming_the_buffer(tmp_path, capsys):
    model = tiny_model("dien", "augru")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in weights if k.endswith("running_var"))
    weights[key].fill_(-1.0)
    path = _save_raw(tmp_path / "model.pt", model_state=weights)
    message = (f"{path}: model_state[{key!r}] holds {weights[key].numel()} negative value(s) of "
               f"{weights[key].numel()} (smallest -1): a running variance cannot be negative")
    with pytest.raises(ValueError, match=re.escape(message)):
        export_checkpoint(path, tmp_path / "m.onnx")
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert _folder_listing(tmp_path) == ["model.pt"]


def test_config_that_fails_validation_names_the_checkpoint(tmp_path, capsys):
    model = tiny_model("dien", "augru")
    path = _save_raw(tmp_path / "model.pt", model_config={**model.config.to_dict(), "item_dim": "4"})
    message = (f"{path}: the field 'model_config' is not a valid config: DIENConfig.item_dim must be a "
               "positive int, got '4'")
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
