"""The emulated CUDA kernels: loaded only in the process ``make test-emu`` starts.

That process has libasan (and libstdc++, which ASan's exception interceptor needs) preloaded and
FASTMARGIN_EMU_LIB naming the library tests/emu/build_emu.py built; any other pytest run skips
these tests (the library is sanitizer-instrumented and cannot load without the preload).
"""

from __future__ import annotations

import os

import pytest
import torch

EMU_LIB = os.environ.get("FASTMARGIN_EMU_LIB")


def pytest_collection_modifyitems(config, items):
    if EMU_LIB:
        torch.ops.load_library(EMU_LIB)
        return
    skip = pytest.mark.skip(reason="emulated CUDA kernels: run by `make test-emu`")
    for item in items:
        if "tests/emu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
