"""Benchmarks of qseg against the field; run them as modules: `python -m benchmarks.NAME`."""
