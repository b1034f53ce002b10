"""Chapters 3 and 4: the steps the notebooks build by hand equal the package's.

Chapter 3 writes an AUGRU cell on a hand-written GRU step and compares it
with ``layers.InterestEvolving`` and ``layers.evolve_interest``; chapter 4
writes the auxiliary loss pair by pair and compares it with
``layers.AuxiliaryLoss`` and ``DIEN.auxiliary_loss``. Each notebook glues the
largest difference it found (``myst_nb.glue``).

These tests run each notebook in a fresh kernel with nbclient, on an
in-memory copy (the file on disk is not written), and read the glued values
from the executed outputs. No notebook code runs in the test process
itself: the values are parsed as floats, never evaluated.

A glued value is a ``display_data`` output whose metadata is
``{"scrapbook": {"name": <name>, ...}}``; with ``glue(..., display=False)``
its text sits under the MIME type
``application/papermill.record/text/plain``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
GLUE_TEXT = "application/papermill.record/text/plain"

AUGRU_NOTEBOOK = "03_attention_and_augru.ipynb"
AUX_NOTEBOOK = "04_auxiliary_loss.ipynb"


@functools.lru_cache(maxsize=None)
def executed_glue(notebook: str) -> dict[str, str]:
    """Run ``notebooks/<notebook>`` once; map every glued name to its text."""
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    glued: dict[str, str] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            data = output.get("data", {})
            glued[name] = data.get(GLUE_TEXT, data.get("text/plain"))
    return glued


def glued_number(notebook: str, name: str) -> float:
    """The glued value ``name`` of ``notebook`` as a float."""
    glued = executed_glue(notebook)
    assert name in glued, f"{notebook} glues no value named {name!r}; it glues {sorted(glued)}"
    return float(glued[name])


def test_notebook_03_hand_written_augru_equals_the_package() -> None:
    """Hand-written AUGRU == InterestEvolving("augru") == evolve_interest."""
    assert glued_number(AUGRU_NOTEBOOK, "augru_vs_package_max_diff") <= 1e-6
    # The masked softmax the notebook shows gives padding no weight ...
    assert glued_number(AUGRU_NOTEBOOK, "att_on_padding") == 0.0
    # ... while the naive softmax it warns about really does.
    assert glued_number(AUGRU_NOTEBOOK, "naive_padding_share") > 0.1


def test_notebook_04_hand_written_aux_loss_equals_the_package() -> None:
    """Hand-written auxiliary loss == AuxiliaryLoss == DIEN.auxiliary_loss."""
    assert glued_number(AUX_NOTEBOOK, "aux_vs_package_max_diff") <= 1e-6
    # Lengths [0, 1, 2, 5] give sum(max(L - 1, 0)) = 5 pairs.
    assert glued_number(AUX_NOTEBOOK, "small_batch_pairs") == 5
