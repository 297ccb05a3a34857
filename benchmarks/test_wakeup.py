"""Wakeup benchmarks: wake latency of a sleeping consumer.

Wake latency (see ``kvmcoal.bench.wakeup``): paced round trips in which
a producer makes one write while the consumer sleeps, 200 µs after the
consumer went to sleep; latency = the consumer's wait() return - the
producer's clock read just before the write.  Between two threads
(``time.perf_counter_ns``) and between this process and a producer
subprocess attached to the buffer by its fds (``time.monotonic_ns``, the
timestamp carried with the write).  Each timed round is a block of round
trips, so pytest-benchmark's time is the block's (pacing included); the
figures are ``p50_us`` and ``p99_us`` in ``extra_info`` (``--benchmark-json``),
also printed after pytest-benchmark's tables.
Target: kvmcoal's p50 at most 1.2x a bare eventfd's.

The target is judged by ``kvmcoal bench --only wakeup``, which interleaves
the mechanisms round trip by round trip so that they are measured under
the same conditions; these tests run each alone.  A round trip whose write
came before the consumer slept (a busy machine) is made again; a mechanism
whose round trips keep failing that check is skipped as unmeasured.  The throughput benchmarks
are in ``test_transfer.py``.

Why kvmcoal can be slower between threads: ``Ring.push`` runs the ring's
producer, including the eventfd ``write(2)`` that wakes the consumer, with
the GIL held (``Ring.push`` in src/ring.pyx calls ``self._produce``
without ``with nogil``; ``EmulatedVm.write`` in src/zone_bus.pxi releases
it).  When the woken consumer preempts the producer on the same CPU it
finds the GIL taken and sleeps again until the producer blocks: two more
context switches.  ``os.eventfd_write`` releases the GIL around its write,
as does ``EmulatedVm.write`` (the ``vm_write`` mode, for reference).
Whether the scheduler lets the consumer preempt depends on how much each
thread runs, which is why the consumer's loop is kept lean.

    python -m pytest benchmarks/test_wakeup.py --benchmark-only
    python -m pytest benchmarks/test_wakeup.py --benchmark-disable   # smoke

``KVMCOAL_BENCH_ROUND_TRIPS`` (default 2000) sets the work.
"""

from __future__ import annotations

import pytest

from kvmcoal.bench.knobs import ROUND_TRIPS
from kvmcoal.bench.wakeup import (
    PROCESS_MODES, THREAD_MODES, WARMUP_ROUND_TRIPS, ProcessWakeups, ThreadWakeups)

from . import WAKE_FIGURES

LATENCY_ROUNDS = 20          # timed blocks per latency benchmark


def _latency(benchmark, harness, mode: str) -> None:
    harness.run([mode] * WARMUP_ROUND_TRIPS)
    harness.reset_samples()
    per_round = 1 if benchmark.disabled else max(1, ROUND_TRIPS // LATENCY_ROUNDS)
    rounds = 1 if benchmark.disabled else LATENCY_ROUNDS
    n = benchmark.pedantic(harness.run, args=([mode] * per_round,), rounds=rounds,
                           iterations=1)
    if mode in harness.unmeasured:          # timing, not data: the machine is too busy
        pytest.skip(f"unmeasured: {harness.unmeasured[mode]}")
    assert n == per_round
    # run() checked every round trip: one write, received whole, made while
    # the consumer was asleep in its wait.
    assert len(harness.latencies[mode]) == per_round * rounds
    summary = harness.summary(mode)
    assert summary["min_lead_us"] > 0
    if not benchmark.disabled:
        WAKE_FIGURES.append((benchmark.name, summary))
    benchmark.extra_info["round_trips"] = summary["samples"]
    benchmark.extra_info["round_trips_per_round"] = per_round
    for key in ("p50_us", "p99_us", "min_us", "max_us", "min_lead_us", "retried"):
        benchmark.extra_info[key] = summary[key]


@pytest.mark.benchmark(group="wake latency, threads")
@pytest.mark.parametrize("mode", list(THREAD_MODES))
def test_wake_latency_threads(benchmark, mode):
    """A producer thread's one write wakes the consumer (this thread) from its wait."""
    with ThreadWakeups() as harness:
        _latency(benchmark, harness, mode)


@pytest.mark.benchmark(group="wake latency, processes")
@pytest.mark.parametrize("mode", list(PROCESS_MODES))
def test_wake_latency_processes(benchmark, mode):
    """A producer subprocess's one write wakes this process from its wait."""
    with ProcessWakeups() as harness:
        _latency(benchmark, harness, mode)
