"""pytest-benchmark suites over the cases in fastmargin.benchmarks.cases (one source of truth
with ``python -m fastmargin bench``). Run: ``.venv/bin/python -m pytest bench`` (GPU when
present, small CPU shapes otherwise)."""
