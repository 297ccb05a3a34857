"""Benchmarks of the kvmcoal consumer against pure-Python baselines.

This is a package so that its test modules get unique names
(``benchmarks.test_consumer``) and cannot clash with a same-named module in
``tests/`` when both directories are collected in one pytest run.

Run with ``python -m pytest benchmarks/ --benchmark-only`` (timed) or
``python -m pytest benchmarks/ --benchmark-disable`` (smoke: each benchmark
runs once), and ``python benchmarks/report.py`` for the table the README
cites.
"""
