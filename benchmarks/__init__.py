"""Benchmarks of fusedres: the pytest-benchmark suites (``pytest benchmarks/``) and the
side-by-side runner (``python -m benchmarks.run``, the same as ``fusedres bench``)."""
