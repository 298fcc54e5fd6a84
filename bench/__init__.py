"""Benchmarks: each `python -m bench.NAME` prints its figures; results go in docs/performance.md."""
