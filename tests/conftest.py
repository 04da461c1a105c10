"""Shared test set-up: CUDA tests carry @pytest.mark.cuda and skip without a GPU."""

from __future__ import annotations

import pytest
import torch
from _hypothesis_fallback import install_if_missing, uninstall

install_if_missing()  # before the test modules import it

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_finish(session):
    uninstall()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _validation_on():
    """Every test starts with target validation on (tests that turn it off are isolated)."""
    import fastmargin as fm

    fm.set_validation(True)
    yield
    fm.set_validation(True)
