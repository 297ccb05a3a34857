"""The benchmarks' terminal summary.

It adds the one-way wake latencies of test_wakeup.py (p50, p99), which
pytest-benchmark's tables do not show.
"""

from __future__ import annotations

import pytest

from . import WAKE_FIGURES


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter) -> None:
    """The wake latencies of test_wakeup.py, which pytest-benchmark's table does not show."""
    if not WAKE_FIGURES:
        return
    tr = terminalreporter
    tr.section("wake latency (one-way, consumer asleep)")
    tr.write_line(f"{'benchmark':<44} {'round trips':>11} {'p50 µs':>8} {'p99 µs':>8} "
                  f"{'min µs':>8} {'retried':>8}")
    for name, s in WAKE_FIGURES:
        tr.write_line(f"{name:<44} {s['samples']:>11} {s['p50_us']:>8.1f} {s['p99_us']:>8.1f} "
                      f"{s['min_us']:>8.1f} {s['retried']:>8}")
    tr.write_line("Targets are judged by kvmcoal bench --only wakeup, which interleaves "
                  "the mechanisms.")
