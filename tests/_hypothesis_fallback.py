"""A stand-in for ``hypothesis`` where it is not installed (a GPU machine without network, say).

The test modules import hypothesis at the top, so without it they would not even be collected
and every other test in them (the CUDA tests included) would be lost. With this stand-in the
property-based tests are collected and skipped, saying why, and every other test runs.
"""

from __future__ import annotations

import sys
import types

import pytest

REASON = "hypothesis is not installed: property-based test skipped"


class _Strategy:
    """Any strategy expression (calls, .map, .filter, ...) evaluates to another stand-in."""

    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        if name.startswith("__"):  # introspection (pickling, paths, ...) must not see one
            raise AttributeError(name)
        return self


def _any_strategy(name: str) -> _Strategy:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Strategy()


def _given(*_args, **_kwargs):
    def decorate(fn):
        def skipped():
            pytest.skip(REASON)

        skipped.__name__, skipped.__doc__ = fn.__name__, fn.__doc__
        # keep marks such as cuda; drop parametrize (the stand-in takes no arguments)
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name != "parametrize"]
        skipped.pytestmark = marks
        return skipped

    return decorate


def _settings(*_args, **_kwargs):
    return lambda fn: fn


def install_if_missing() -> None:
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        pass
    else:
        return
    strategies = types.ModuleType("hypothesis.strategies")
    strategies.__getattr__ = _any_strategy  # st.integers, st.composite, ...
    module = types.ModuleType("hypothesis")
    module.given = _given
    module.settings = _settings
    module.HealthCheck = _Strategy()
    module.strategies = strategies
    sys.modules["hypothesis"] = module
    sys.modules["hypothesis.strategies"] = strategies


def uninstall() -> None:
    """After collection: libraries that probe for hypothesis (torch's op checks do) must find
    it absent, as it is, not this stand-in."""
    if getattr(sys.modules.get("hypothesis"), "given", None) is _given:
        del sys.modules["hypothesis"], sys.modules["hypothesis.strategies"]
