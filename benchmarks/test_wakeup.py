"""Wakeup benchmarks: wake latency of a sleeping consumer, and cross-process throughput.

Wake latency (see ``buffers_workload._Wakeups``): paced round trips in which
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

Throughput: a producer subprocess sends N 24-byte records to this process,
through a CoalescedBuffer ring (the consumer sleeps in ``wait()`` and drains
with ``drain_into``) or a ``multiprocessing.Queue`` (one put and one get per
record).  Producer start-up is in ``setup``, not timed; every record is
checked, in order.  Target: kvmcoal at least 10x the Queue's records/s.

The targets are judged by ``report_buffers.py``, which interleaves the
mechanisms (round trip by round trip, transfer by transfer) so that they
are measured under the same conditions; these tests run each alone.

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

``KVMCOAL_BENCH_ROUND_TRIPS`` (default 2000) and ``KVMCOAL_BENCH_RECORDS``
(default 200000) set the work.
"""

from __future__ import annotations

import pytest

from .buffers_workload import (
    PROCESS_MODES, RECORDS, ROUND_TRIPS, SMOKE_RECORDS, THREAD_MODES, WAKE_FIGURES,
    KvmcoalTransfer, ProcessWakeups, QueueTransfer, ThreadWakeups)

LATENCY_ROUNDS = 20          # timed blocks per latency benchmark
WARMUP_ROUND_TRIPS = 20      # untimed, not in the figures
TRANSFER_ROUNDS = 3          # timed transfers per throughput benchmark


def _latency(benchmark, harness, mode: str) -> None:
    harness.run([mode] * WARMUP_ROUND_TRIPS)
    harness.reset_samples()
    per_round = 1 if benchmark.disabled else max(1, ROUND_TRIPS // LATENCY_ROUNDS)
    rounds = 1 if benchmark.disabled else LATENCY_ROUNDS
    n = benchmark.pedantic(harness.run, args=([mode] * per_round,), rounds=rounds,
                           iterations=1)
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
    for key in ("p50_us", "p99_us", "min_us", "max_us", "min_lead_us"):
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


def _throughput(benchmark, transfer) -> None:
    rounds = 1 if benchmark.disabled else TRANSFER_ROUNDS
    got = benchmark.pedantic(transfer.run, setup=transfer.prepare, rounds=rounds, iterations=1)
    assert got == transfer.records
    transfer.finish()              # every record of the last transfer, in order
    assert transfer.transfers == rounds
    benchmark.extra_info["records"] = transfer.records
    benchmark.extra_info["record_bytes"] = 24
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["records_per_s"] = transfer.records / stats.stats.median


@pytest.fixture
def records(benchmark) -> int:
    return SMOKE_RECORDS if benchmark.disabled else RECORDS


@pytest.mark.benchmark(group="cross-process throughput, 24-byte records")
@pytest.mark.parametrize("ring_bytes", [None, 65536], ids=["one-page-ring", "64KiB-ring"])
def test_throughput_kvmcoal(benchmark, records, ring_bytes):
    """A producer subprocess pushes to an attached buffer; this process waits and drain_into()s."""
    with KvmcoalTransfer(records, ring_bytes) as transfer:
        _throughput(benchmark, transfer)
        benchmark.extra_info["ring_entries"] = transfer.buf.ring.capacity


@pytest.mark.benchmark(group="cross-process throughput, 24-byte records")
def test_throughput_multiprocessing_queue(benchmark, records):
    """Baseline: the same records as bytes through a multiprocessing.Queue, put/get each."""
    with QueueTransfer(records) as transfer:
        _throughput(benchmark, transfer)
