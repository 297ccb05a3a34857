"""Producer benchmarks: ``EmulatedVm.write`` from Python against ``Ring.push``.

Each timed round is a plain ``for`` loop of 4096 4-byte writes into a zone
whose ring is a 1 MiB CoalescedBuffer (43689 entries); ``Ring.push`` writes
the same data to the same addresses of the same ring.  The ring is reset in
pytest-benchmark's ``setup``, outside the timing, and that setup first
checks that the previous round published exactly one batch; the last batch
is checked byte for byte (see ``kvmcoal.bench.producer``).  Target (judged
by ``kvmcoal bench --only producer``, which interleaves the methods):
``EmulatedVm.write`` within 2x of ``Ring.push``.

    python -m pytest benchmarks/test_producer.py --benchmark-only
    python -m pytest benchmarks/test_producer.py --benchmark-disable   # smoke

``KVMCOAL_BENCH_PRODUCER_ROUNDS`` (default 1000) sets the timed rounds.
"""

from __future__ import annotations

import pytest

from kvmcoal.bench.knobs import PRODUCER_ROUNDS
from kvmcoal.bench.producer import ProducerWorkload

WARMUP_ROUNDS = 50

pytestmark = pytest.mark.benchmark(group="producer")


@pytest.fixture
def producer():
    """A ProducerWorkload whose two write paths were each checked once, untimed."""
    with ProducerWorkload() as p:
        p.check_each_path()
        yield p


def _run(benchmark, producer: ProducerWorkload, fn, *, setup) -> None:
    benchmark.pedantic(fn, setup=setup, rounds=PRODUCER_ROUNDS, warmup_rounds=WARMUP_ROUNDS,
                       iterations=1)
    benchmark.extra_info["writes_per_call"] = producer.batch
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ns_per_write"] = stats.stats.median / producer.batch * 1e9


def _check_rounds(benchmark, producer: ProducerWorkload) -> None:
    """One reset per round, each after a call that wrote a whole batch."""
    expected = 1 if benchmark.disabled else PRODUCER_ROUNDS + WARMUP_ROUNDS
    assert producer.resets == expected
    producer.check_contents()


def test_emulated_vm_write(benchmark, producer):
    """``EmulatedVm.write``: the zone lookup, then the ring's producer (without the GIL)."""
    _run(benchmark, producer, producer.vm_write_batch, setup=producer.reset)
    _check_rounds(benchmark, producer)


def test_ring_push(benchmark, producer):
    """``Ring.push`` on the same ring, with the same data."""
    _run(benchmark, producer, producer.ring_push_batch, setup=producer.reset)
    _check_rounds(benchmark, producer)


def test_ring_push_many(benchmark, producer):
    """``Ring.push_many``: the same writes as raw records, in one call."""
    _run(benchmark, producer, producer.ring_push_many_batch, setup=producer.reset)
    _check_rounds(benchmark, producer)


def test_loop_alone_reference(benchmark, producer):
    """Reference only: the same loop with no write, the floor of both figures."""
    _run(benchmark, producer, producer.empty_loop, setup=None)
    assert len(producer.ring) == 0
