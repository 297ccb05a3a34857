"""Full-ring consumer benchmarks: kvmcoal against pure-Python baselines.

Every benchmark drains one full one-page ring (``RING_MAX - 1`` entries, 169
on 4 KiB pages) per timed round; the ring is refilled in pytest-benchmark's
``setup``, outside the timing.  Each test checks that the work happened:
the count returned, the ring empty afterwards, one refill per round (the
refill itself refuses to run on a ring the previous round did not empty)
and, where the output is kept, its content.

    python -m pytest benchmarks/ --benchmark-only      # timed
    python -m pytest benchmarks/ --benchmark-disable   # smoke, one call each
"""

from __future__ import annotations

import numpy as np
import pytest

import kvmcoal

from . import baselines
from .workload import ROUNDS, WARMUP_ROUNDS, empty_handler

CAPACITY = kvmcoal.RING_MAX - 1
GROUP = f"full-ring consumer ({CAPACITY} entries)"

pytestmark = pytest.mark.benchmark(group=GROUP)


def _check_rounds(benchmark, full_ring):
    """One refill per round: the timed call drained every round."""
    expected = 1 if benchmark.disabled else ROUNDS + WARMUP_ROUNDS
    assert full_ring.refills == expected
    full_ring.assert_empty()


def test_drain_into_numpy(benchmark, run_full_ring, full_ring):
    """``Ring.drain_into`` into a preallocated ``ENTRY_DTYPE`` numpy array."""
    out = np.zeros(full_ring.capacity, dtype=kvmcoal.ENTRY_DTYPE)
    count = run_full_ring(full_ring.ring.drain_into, out)
    assert count == full_ring.capacity
    _check_rounds(benchmark, full_ring)
    assert out.tobytes() == full_ring.expected_records


def test_drain_into_bytearray(benchmark, run_full_ring, full_ring):
    """``Ring.drain_into`` into a preallocated bytearray of raw records."""
    out = bytearray(full_ring.capacity * kvmcoal.ENTRY_SIZE)
    count = run_full_ring(full_ring.ring.drain_into, out)
    assert count == full_ring.capacity
    _check_rounds(benchmark, full_ring)
    assert bytes(out) == full_ring.expected_records


def test_drain_entries(benchmark, run_full_ring, full_ring):
    """``Ring.drain``: a list of ``Entry`` objects."""
    entries = run_full_ring(full_ring.ring.drain)
    assert len(entries) == full_ring.capacity
    _check_rounds(benchmark, full_ring)
    assert entries == full_ring.expected_entries


def test_consume_empty_handler(benchmark, run_full_ring, full_ring):
    """``Ring.consume`` with an empty 3-argument handler."""
    count = run_full_ring(full_ring.ring.consume, empty_handler)
    assert count == full_ring.capacity
    _check_rounds(benchmark, full_ring)


def test_qemu_style_python_loop(benchmark, run_full_ring, full_ring):
    """Baseline: QEMU's flush loop in pure Python (struct, one store per entry)."""
    # Untimed: the baseline delivers exactly what Ring.consume delivers.
    full_ring.refill()
    seen = []
    assert baselines.qemu_style_drain(
        full_ring.buf, full_ring.max, lambda a, d, p: seen.append((a, d, p))) == full_ring.capacity
    assert seen == full_ring.expected_triples
    full_ring.assert_empty()
    full_ring.refills = 0

    count = run_full_ring(baselines.qemu_style_drain, full_ring.buf, full_ring.max, empty_handler)
    assert count == full_ring.capacity
    _check_rounds(benchmark, full_ring)


def test_plain_python_loop_baseline(benchmark, run_full_ring, full_ring):
    """Baseline for consume: a plain ``for`` loop calling the empty handler."""
    args = full_ring.expected_triples[0]
    calls = []
    assert baselines.plain_handler_loop(
        lambda *a: calls.append(a), full_ring.capacity, args) == full_ring.capacity
    assert calls == [args] * full_ring.capacity

    count = run_full_ring(baselines.plain_handler_loop, empty_handler, full_ring.capacity, args,
                          setup=None)
    assert count == full_ring.capacity


def test_plain_python_loop_star_args_reference(benchmark, run_full_ring, full_ring):
    """Reference only: the plain loop written ``handler(*args)`` (slower per call)."""
    args = full_ring.expected_triples[0]
    count = run_full_ring(baselines.plain_handler_loop_star, empty_handler, full_ring.capacity,
                          args, setup=None)
    assert count == full_ring.capacity
