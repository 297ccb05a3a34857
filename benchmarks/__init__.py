"""The pytest-benchmark suites of kvmcoal, over the measuring code of kvmcoal.bench.

The workloads, baselines, checks and C yardsticks live in the installed
package (kvmcoal/bench/: consumer.py, producer.py, wakeup.py, transfer.py,
vmm.py); these suites time the same calls one method at a time with
pytest-benchmark, and check them the same way.  The comparisons the
targets are judged on interleave the methods, and are kvmcoal bench's
(docs/BENCHMARKS.md).

This is a package so that its test modules get unique names
(benchmarks.test_consumer) and cannot clash with a same-named module in
tests/ when both directories are collected in one pytest run.

    python -m pytest benchmarks/ --benchmark-only      # timed
    python -m pytest benchmarks/ --benchmark-disable   # smoke: each benchmark runs once
"""

from __future__ import annotations

from typing import Any

# (test id, latency summary) of each timed wake-latency benchmark in this
# pytest session, printed by conftest.py's terminal summary: pytest-benchmark's
# own table shows the time of each block of round trips, not the latencies.
WAKE_FIGURES: list[tuple[str, dict[str, Any]]] = []
