"""Throughput benchmarks: 24-byte records from a producer to a consumer that sleeps.

A producer sends N records (the ring's 24-byte ABI records of 8-byte
writes) to this thread, which sleeps whenever nothing is there: in
``CoalescedBuffer.wait()`` for kvmcoal, in the peer's blocking receive for
the others (see ``kvmcoal.bench.transfer.Transfer`` and its subclasses for
how each one batches).  Two groups: "transfer: cross-process" (the producer is
a spawned process) and "transfer: cross-thread" (a thread of this process,
running the same code).  Producer start-up is in ``setup``, not timed;
every record of every transfer is checked, in order, and the producer must
exit 0.  ``extra_info`` has ``records``, ``records_per_s`` and
``ns_per_record`` (from the median transfer), and ``receive_calls`` (of the
last transfer).

A peer whose package does not import (faster-fifo and pyzmq come with the
``bench`` extra) is skipped, the reason naming the package; a transfer
whose producer was too slow to start or to exit (a busy machine) is
skipped as unmeasured.  Targets (judged by ``kvmcoal bench --only
transfer``, which interleaves the mechanisms): cross-process, kvmcoal at
least 10x ``multiprocessing.Queue``'s records/s and at least 2x
faster-fifo's.

    python -m pytest benchmarks/test_transfer.py --benchmark-only
    python -m pytest benchmarks/test_transfer.py --benchmark-disable   # smoke

``KVMCOAL_BENCH_RECORDS`` (default 200000) sets the records per transfer.
"""

from __future__ import annotations

import sys

import pytest

from kvmcoal.bench.knobs import RECORDS, SMOKE_RECORDS
from kvmcoal.bench.reporting import InvalidSample
from kvmcoal.bench.transfer import RECORD_BYTES, TRANSFERS, PeerMissing

TRANSFER_ROUNDS = 3          # timed transfers per benchmark


@pytest.fixture
def records(benchmark) -> int:
    return SMOKE_RECORDS if benchmark.disabled else RECORDS


def _transfer(benchmark, mechanism: str, records: int, *, thread: bool) -> None:
    try:
        transfer = TRANSFERS[mechanism](records, thread=thread)
    except PeerMissing as exc:
        pytest.skip(str(exc))
    with transfer:
        rounds = 1 if benchmark.disabled else TRANSFER_ROUNDS
        try:
            got = benchmark.pedantic(transfer.run, setup=transfer.prepare, rounds=rounds,
                                     iterations=1)
            assert got == records
            transfer.finish()          # every record of the last transfer, in order
        except InvalidSample as exc:   # timing, not data: the machine is too busy
            pytest.skip(f"unmeasured: {exc}")
        assert transfer.transfers == rounds
        benchmark.extra_info["mechanism"] = transfer.label
        benchmark.extra_info["records"] = records
        benchmark.extra_info["record_bytes"] = RECORD_BYTES
        benchmark.extra_info["receive_calls"] = transfer.batches
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            median = stats.stats.median
            benchmark.extra_info["records_per_s"] = records / median
            benchmark.extra_info["ns_per_record"] = median / records * 1e9


@pytest.mark.benchmark(group="transfer: cross-process")
@pytest.mark.parametrize("mechanism", list(TRANSFERS))
def test_transfer_cross_process(benchmark, records, mechanism):
    """A spawned producer process sends every record; this process receives them."""
    _transfer(benchmark, mechanism, records, thread=False)


@pytest.mark.benchmark(group="transfer: cross-thread")
@pytest.mark.parametrize("mechanism", list(TRANSFERS))
def test_transfer_cross_thread(benchmark, records, mechanism):
    """A producer thread sends every record; this thread receives them."""
    _transfer(benchmark, mechanism, records, thread=True)


@pytest.mark.parametrize("mechanism", ["faster_fifo", "zmq"])
def test_a_peer_that_does_not_import_is_missing(monkeypatch, mechanism):
    """Not a benchmark: a peer whose module does not import raises PeerMissing, named by package."""
    cls = TRANSFERS[mechanism]
    monkeypatch.setitem(sys.modules, cls.module, None)     # import raises ImportError
    with pytest.raises(PeerMissing, match=f"^{cls.package} does not import: ") as caught:
        cls(10)
    assert caught.value.package == cls.package
