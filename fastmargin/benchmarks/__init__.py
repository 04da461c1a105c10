"""Benchmark cases (one source of truth for the CLI and the bench/ pytest-benchmark suites)
and the runner that times them against the eager and compiled references."""
