"""Fixtures for the consumer benchmarks.

``full_ring`` gives a :class:`~benchmarks.workload.FullRing`: a
``bytearray(kvmcoal.PAGE_SIZE)`` ring (``kvmcoal.Ring``) whose ``refill``
fills it to capacity (``RING_MAX - 1`` entries of widths 1, 2, 4, 8) with
``Ring.push``.  Benchmarks pass ``refill`` as pytest-benchmark's ``setup``,
so every timed round drains one full ring and the refill is not timed.

``KVMCOAL_BENCH_ROUNDS`` (default 5000) and ``KVMCOAL_BENCH_WARMUP``
(default 200) set the rounds per benchmark.

The terminal summary adds the one-way wake latencies of ``test_wakeup.py``
(p50, p99), which pytest-benchmark's tables do not show.
"""

from __future__ import annotations

import pytest

from .buffers_workload import WAKE_FIGURES
from .workload import ROUNDS, WARMUP_ROUNDS, FullRing


@pytest.fixture
def full_ring() -> FullRing:
    """A one-page ring, empty; ``.refill()`` fills it to capacity."""
    return FullRing()


@pytest.fixture
def run_full_ring(benchmark, full_ring):
    """Time ``fn(*args)`` on a ring refilled to capacity before each round.

    Returns the value of the last call.  Records ``entries`` (per timed
    call) and, when timing is enabled, ``ns_per_entry`` and ``us_per_ring``
    (from the mean) in ``benchmark.extra_info``.
    """

    def run(fn, *args, setup=full_ring.refill, entries=None):
        result = benchmark.pedantic(
            fn, args=args, setup=setup, rounds=ROUNDS,
            warmup_rounds=WARMUP_ROUNDS, iterations=1)
        n = full_ring.capacity if entries is None else entries
        benchmark.extra_info["entries"] = n
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            mean = stats.stats.mean
            benchmark.extra_info["us_per_ring"] = mean * 1e6
            benchmark.extra_info["ns_per_entry"] = mean / n * 1e9
        return result

    return run


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter) -> None:
    """The wake latencies of test_wakeup.py, which pytest-benchmark's table does not show."""
    if not WAKE_FIGURES:
        return
    tr = terminalreporter
    tr.section("wake latency (one-way, consumer asleep)")
    tr.write_line(f"{'benchmark':<44} {'round trips':>11} {'p50 µs':>8} {'p99 µs':>8} "
                  f"{'min µs':>8}")
    for name, s in WAKE_FIGURES:
        tr.write_line(f"{name:<44} {s['samples']:>11} {s['p50_us']:>8.1f} {s['p99_us']:>8.1f} "
                      f"{s['min_us']:>8.1f}")
    tr.write_line("Targets are judged by benchmarks/report_buffers.py, which interleaves "
                  "the mechanisms.")
