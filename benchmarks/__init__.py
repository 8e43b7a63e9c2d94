"""Benchmarks: ratios measured within one run, reports in ``docs/benchmarks/``.

Run from the checkout as ``twotower bench NAME`` or ``python scripts/bench_NAME.py``;
they are not in the wheel.
"""
