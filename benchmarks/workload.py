"""The workload shared by the consumer benchmarks and ``report.py``.

A one-page ring (``bytearray(kvmcoal.PAGE_SIZE)``) refilled with a batch of
writes of mixed widths (1, 2, 4 and 8 bytes) and a mix of MMIO and PIO,
through ``Ring.push`` (the kernel's producer model).  The batch is either
the full ring (``RING_MAX - 1`` entries, 169 on 4 KiB pages) or a partial
one (``BATCHES``: 1, 8, 64), because a VMM that drains after every exit
often finds only a few entries, and then the cost per call, not per entry,
decides.  Refilling happens outside the timed region: each timed call
drains exactly one batch.

The ring is never reset between rounds, so successive rounds start at
successive slots (a drain leaves ``first == last``; a later fill wraps
around the end), and a batch is sometimes split by the end of the ring.
"""

from __future__ import annotations

import struct

import kvmcoal

if __package__:
    from .knobs import env_count
else:  # imported by a script run from benchmarks/
    from knobs import env_count

# Rounds per pytest benchmark (each round drains one full ring).
ROUNDS = env_count("KVMCOAL_BENCH_ROUNDS", 5000)
WARMUP_ROUNDS = env_count("KVMCOAL_BENCH_WARMUP", 200, least=0)

# The partial batches, besides the full ring.
BATCHES = (1, 8, 64)

WIDTHS = (1, 2, 4, 8)
MMIO_BASE = 0xFE00_0000
PIO_BASE = 0x3F8
PIO_EVERY = 5                     # every 5th entry is a port write

_RECORD = struct.Struct("<QII8s")


def empty_handler(a, d, p):
    """The 3-argument handler that does nothing."""


def make_entries(n: int) -> list[tuple[int, bytes, bool]]:
    """*n* ``(phys_addr, data, pio)`` writes of widths 1, 2, 4, 8 in turn."""
    entries = []
    for i in range(n):
        width = WIDTHS[i % len(WIDTHS)]
        data = bytes((i + k) & 0xFF for k in range(width))
        pio = i % PIO_EVERY == 0
        addr = PIO_BASE + (i % 8) if pio else MMIO_BASE + 8 * i
        entries.append((addr, data, pio))
    return entries


class RefilledRing:
    """A one-page ring, refilled with *batch* entries per round, and what draining it must give.

    *batch* is the number of entries each refill pushes, the ring's
    capacity (``RING_MAX - 1``, a full ring) by default.
    """

    def __init__(self, batch: int | None = None, nbytes: int | None = None) -> None:
        self.buf = bytearray(kvmcoal.PAGE_SIZE if nbytes is None else nbytes)
        self.ring = kvmcoal.Ring(self.buf)
        self.max = self.ring.max
        self.capacity = self.ring.capacity
        self.batch = self.capacity if batch is None else batch
        if not 1 <= self.batch <= self.capacity:
            raise ValueError(f"batch={batch} is not 1 to {self.capacity} entries")
        self.is_full = self.batch == self.capacity
        self.entries = make_entries(self.batch)
        # What a drain of one batch must produce, in each output form.
        self.expected_entries = [kvmcoal.Entry(a, d, p) for a, d, p in self.entries]
        self.expected_records = b"".join(
            _RECORD.pack(a, len(d), int(p), d) for a, d, p in self.entries)
        self.expected_triples = [(a, d, p) for a, d, p in self.entries]
        self.refills = 0

    @property
    def title(self) -> str:
        """``full ring (169 entries)`` or ``batch of 8``."""
        return f"full ring ({self.batch} entries)" if self.is_full else f"batch of {self.batch}"

    def refill(self) -> None:
        """Push one batch; the ring must be empty (fully drained) first.

        Used as pytest-benchmark's ``setup`` and as timeit's setup, so it
        also checks, outside the timed region, that the previous timed call
        consumed the whole batch.
        """
        ring = self.ring
        left = len(ring)
        if left:
            raise AssertionError(
                f"the previous timed call left {left} of {self.batch} entries "
                "in the ring: the benchmark did not drain it")
        push = ring.push
        for addr, data, pio in self.entries:
            if not push(addr, data, pio=pio):
                raise AssertionError("push refused a write into a ring being refilled")
        if len(ring) != self.batch:
            raise AssertionError(f"refill left {len(ring)} entries, not {self.batch}")
        self.refills += 1

    def assert_empty(self) -> None:
        left = len(self.ring)
        assert left == 0, f"{left} entries left in the ring after a drain of the whole batch"
        assert self.ring.first == self.ring.last
