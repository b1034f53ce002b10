"""nbval settings for the notebooks.

Chapter 8 trains on the real Amazon Toys & Games data, which is not part of
the repository. Where the data is absent its cells are skipped, with the
reason in pytest's summary; everything else runs on the embedded simulator.
"""

from __future__ import annotations

import pytest

from dien_tutorial.data.amazon import default_data_dir

REAL_DATA_NOTEBOOKS = ("08_real_amazon_reviews.ipynb",)


def _toys_present() -> bool:
    root = default_data_dir()
    return root is not None and (root / "amazon_toys_5core").is_dir()


def pytest_collection_modifyitems(config, items):
    if _toys_present():
        return
    skip = pytest.mark.skip(
        reason="needs the Amazon Toys 5-core data in ../shared/data/amazon_toys_5core "
        "(or DIEN_DATA_DIR): real data absent")
    for item in items:
        if item.path.name in REAL_DATA_NOTEBOOKS:
            item.add_marker(skip)
