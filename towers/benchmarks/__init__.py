"""Benchmarks behind ``scripts/bench_*.py``: ratios measured within one run."""
