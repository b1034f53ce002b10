"""Steps the notebooks build by hand equal the package's versions.

A notebook writes some pieces of DIEN itself (a GRU step, later the AUGRU
step and the auxiliary-loss pairs) and compares them with
``dien_tutorial`` in a cell. These tests run the notebook from a fresh
kernel with nbclient, on an in-memory copy (the file on disk is never
written), and read the compared values from the notebook's glued outputs
(``myst_nb.glue``). No notebook code is executed here outside the kernel.

Each test is independent: a notebook runs at most once per test session
(:func:`glued_values` caches by file name), so several tests may read the
same notebook at the cost of one run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
GLUE_MIME_PREFIX = "application/papermill.record/"  # myst_nb's glue(..., display=False)


@functools.lru_cache(maxsize=None)
def glued_values(notebook: str) -> dict[str, str]:
    """Run ``notebooks/<notebook>`` and return every glued name -> its text/plain.

    The text is what the notebook's reader sees, for a float ``repr(x)``;
    callers convert it with ``float`` and the like.
    """
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    client = NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    values: dict[str, str] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            data = output["data"]
            text = data.get(GLUE_MIME_PREFIX + "text/plain", data.get("text/plain"))
            values[name] = text
    return values


def glued_float(notebook: str, name: str) -> float:
    """The glued value ``name`` of ``notebook`` as a float (fails if it was not glued)."""
    values = glued_values(notebook)
    assert name in values, f"{notebook} glues no value named {name!r}; found {sorted(values)}"
    return float(values[name])


# ---------------------------------------------------------------------------
# Chapter 2: the GRU from scratch
# ---------------------------------------------------------------------------

GRU_NOTEBOOK = "02_gru_from_scratch.ipynb"


def test_notebook_02_hand_gru_equals_torch_and_package_cell() -> None:
    """The notebook's hand-written GRU step matches nn.GRU and layers.GRUCell."""
    assert glued_float(GRU_NOTEBOOK, "gru_vs_torch_max_diff") <= 1e-6
    assert glued_float(GRU_NOTEBOOK, "gru_vs_cell_max_diff") <= 1e-6
    assert glued_float(GRU_NOTEBOOK, "gru_vs_package_max_diff") <= 1e-6


def test_notebook_02_padded_batch_last_states() -> None:
    """Gather, freeze-in-the-loop, packing and InterestExtractor all give the
    state at each row's true last step, while the last column does not."""
    assert glued_float(GRU_NOTEBOOK, "masked_last_state_max_diff") <= 1e-6
    # The naive answer must really be wrong, or the notebook shows nothing.
    assert glued_float(GRU_NOTEBOOK, "padded_last_column_max_error") > 1e-3


# Chapters 3 and 4: an AUGRU cell on a hand-written GRU step, compared with
# layers.InterestEvolving and layers.evolve_interest; the auxiliary loss
# written pair by pair, compared with layers.AuxiliaryLoss and
# DIEN.auxiliary_loss.


def test_notebook_03_hand_written_augru_equals_the_package() -> None:
    """Hand-written AUGRU == InterestEvolving("augru") == evolve_interest."""
    assert glued_float("03_attention_and_augru.ipynb", "augru_vs_package_max_diff") <= 1e-6
    # The masked softmax the notebook shows gives padding no weight ...
    assert glued_float("03_attention_and_augru.ipynb", "att_on_padding") == 0.0
    # ... while the naive softmax it warns about really does.
    assert glued_float("03_attention_and_augru.ipynb", "naive_padding_share") > 0.1


def test_notebook_04_hand_written_aux_loss_equals_the_package() -> None:
    """Hand-written auxiliary loss == AuxiliaryLoss == DIEN.auxiliary_loss."""
    assert glued_float("04_auxiliary_loss.ipynb", "aux_vs_package_max_diff") <= 1e-6
    # Lengths [0, 1, 2, 5] give sum(max(L - 1, 0)) = 5 pairs.
    assert glued_float("04_auxiliary_loss.ipynb", "small_batch_pairs") == 5
