"""Consumer benchmarks: kvmcoal against pure-Python and C baselines, full ring and partial batches.

One pytest-benchmark group per question: how fast is a full one-page ring
(``RING_MAX - 1`` entries, 169 on 4 KiB pages) drained, and a batch of 1,
of 8 and of 64 entries, where the cost of the call itself weighs more.  In
each group, every method of ``kvmcoal.bench.consumer``: ``drain_into``
(numpy and bytearray), ``drain``, ``consume`` with an empty handler, a
``pop()`` loop, iteration, the pure-Python baselines (QEMU-style, ctypes,
``struct.iter_unpack``, rust-vmm-style), the C consumer
(``kvmcoal/bench/c/cconsumer.c``; skipped, saying why, where it cannot be
built) and the plain loop calling the empty handler as often with
constant arguments, the yardstick for ``consume``.

Each timed round drains one batch; the ring is refilled in
pytest-benchmark's ``setup``, outside the timing.  Each test checks that the
work happened: once, untimed, that the method delivers exactly what
``Ring.consume`` delivers (values, types, order); then, for the timed
rounds, the count returned, the content where the output is kept, one
refill per round (a refill refuses to run on a ring the previous round did
not empty) and the ring empty at the end.

``extra_info``: ``entries`` per call and, when timing is enabled,
``us_per_call``, ``ns_per_entry`` and ``entries_per_s``, from the median
round.  ``KVMCOAL_BENCH_ROUNDS`` (default 5000) and ``KVMCOAL_BENCH_WARMUP``
(default 200) set the rounds per benchmark.

    python -m pytest benchmarks/test_consumer.py --benchmark-only      # timed
    python -m pytest benchmarks/test_consumer.py --benchmark-disable   # smoke, one call each

``kvmcoal bench --only consumer`` gives the same figures interleaved, with
the ratios the targets are judged on.
"""

from __future__ import annotations

import pytest

from kvmcoal.bench.consumer import BATCHES, METHOD_KEYS, RefilledRing, consumer_methods
from kvmcoal.bench.knobs import ROUNDS, WARMUP_ROUNDS

# None: the full ring.
BATCH_SIZES = (*BATCHES, None)


@pytest.mark.parametrize("key", METHOD_KEYS)
@pytest.mark.parametrize("batch", BATCH_SIZES,
                         ids=lambda b: "full" if b is None else f"batch{b}")
def test_consumer(benchmark, batch, key):
    rr = RefilledRing(batch)
    method = {m.key: m for m in consumer_methods(rr)}[key]
    if method.missing is not None:
        pytest.skip(f"missing here: {method.missing}")
    benchmark.group = f"consumer: {rr.title}"
    method.verify()

    refills_before = rr.refills
    result = benchmark.pedantic(method.call, setup=method.setup, rounds=ROUNDS,
                                warmup_rounds=WARMUP_ROUNDS, iterations=1)
    method.check(result)
    if method.uses_ring:
        # One refill per round: each refill checked that the round before it
        # emptied the ring; the last round is checked here.
        rounds = 1 if benchmark.disabled else ROUNDS + WARMUP_ROUNDS
        assert rr.refills - refills_before == rounds
        rr.assert_empty()

    benchmark.extra_info["entries"] = rr.batch
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info["us_per_call"] = median * 1e6
        benchmark.extra_info["ns_per_entry"] = median / rr.batch * 1e9
        benchmark.extra_info["entries_per_s"] = rr.batch / median
