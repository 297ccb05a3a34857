"""The producer section: EmulatedVm.write against Ring.push on the same ring.

Each timed call is a plain for loop of PRODUCER_BATCH (4096) 4-byte writes
into a zone bound to a 1 MiB CoalescedBuffer (43689 entries), through
EmulatedVm.write or Ring.push, to the same addresses of the same ring; the
same writes as raw records in one Ring.push_many call, and the loop alone,
for reference.  The ring is reset by the untimed setup, which first checks
that the previous call published exactly one batch; the last batch is
checked byte for byte.  Nothing consumes the ring, so its wakeup stays
signalled and neither path makes the eventfd system call in the timed
region (it happens once, at the very first write).

The target: EmulatedVm.write within 2x of Ring.push.
"""

from __future__ import annotations

import os
from typing import Any

import kvmcoal
from kvmcoal import EmulatedVm, Zone

from .baselines import ENTRY
from .reporting import Progress, Section, noop, ratio, time_blocks, timing_figures

PRODUCER_BATCH = 4096             # writes per timed producer call
PRODUCER_RING_NBYTES = 1 << 20     # 43689 entries: a batch fits ten times over
PRODUCER_DATA = b"\x2a\x00\x00\x00"
ZONE_BASE = 0xFE00_0000


class ProducerWorkload:
    """PRODUCER_BATCH 4-byte writes into a zone whose ring is a 1 MiB buffer.

    vm_write_batch (EmulatedVm.write) and ring_push_batch (Ring.push) make
    the same writes, to the same addresses, into the same ring, in the same
    plain for loop; empty_loop is that loop alone; ring_push_many_batch
    pushes the same writes as raw records in one Ring.push_many call.
    reset is the untimed setup before each call: it checks that the
    previous call published exactly one batch (first == 0, last ==
    PRODUCER_BATCH), then empties the ring.
    """

    def __init__(self, batch: int = PRODUCER_BATCH, nbytes: int = PRODUCER_RING_NBYTES) -> None:
        self.vm = EmulatedVm()
        self.buf = self.vm.create_coalesced_buffer(nbytes=nbytes)
        self.ring = self.buf.ring
        if batch > self.ring.capacity:
            raise ValueError(f"a batch of {batch} does not fit a ring of {self.ring.capacity}")
        self.batch = batch
        self.vm.register_coalesced_mmio2(Zone(ZONE_BASE, 4 * batch), self.buf)
        self.addrs = [ZONE_BASE + 4 * i for i in range(batch)]
        self.data = PRODUCER_DATA
        self.expected = b"".join(ENTRY.pack(a, 4, 0, self.data) for a in self.addrs)
        self.resets = 0
        self._armed = False

    def vm_write_batch(self) -> None:
        write, data = self.vm.write, self.data
        for addr in self.addrs:
            write(addr, data)

    def ring_push_batch(self) -> None:
        push, data = self.ring.push, self.data
        for addr in self.addrs:
            push(addr, data)

    def ring_push_many_batch(self) -> None:
        """The same writes as raw records, in one Ring.push_many call."""
        if self.ring.push_many(self.expected) != self.batch:
            raise AssertionError("push_many refused part of a batch that fits the ring")

    def empty_loop(self) -> None:
        for _addr in self.addrs:
            pass

    def check_batch(self) -> None:
        """The ring holds exactly one batch, from slot 0 (i.e. the last call wrote it all)."""
        first, last = self.ring.first, self.ring.last
        if (first, last) != (0, self.batch):
            raise AssertionError(f"the timed call left first={first} last={last}, not one "
                                 f"batch of {self.batch} writes from slot 0")

    def reset(self) -> None:
        """Untimed setup: check the previous timed call, then empty the ring."""
        if self._armed:
            self.check_batch()
        self.ring.reset()
        self._armed = True
        self.resets += 1

    def check_contents(self) -> None:
        """Untimed: every write of the last batch is in the ring, in order, byte for byte."""
        self.check_batch()
        memfd, _ = self.buf.fds()
        got = os.pread(memfd, len(self.expected), kvmcoal.RING_HEADER_SIZE)
        if got != self.expected:
            raise AssertionError("the ring does not hold the batch's writes")

    def check_each_path(self) -> None:
        """Untimed: both paths accept every write of a batch and record it exactly."""
        for name, one in (("EmulatedVm.write", self.vm.write), ("Ring.push", self.ring.push)):
            self.ring.reset()
            for addr in self.addrs:
                if one(addr, self.data) is not True:
                    raise AssertionError(f"{name} refused a write at {addr:#x}")
            self.check_contents()
        self.ring.reset()
        self.ring_push_many_batch()
        self.check_contents()
        if self.vm.write(ZONE_BASE + 4 * self.batch, self.data) is not False:
            raise AssertionError("EmulatedVm.write took a write outside every zone")
        self.ring.reset()
        self._armed = False

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> ProducerWorkload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def measure(repeat: int, blocks: int, progress: Progress | None = None) -> Section:
    """Time the four producer methods in interleaved blocks; figures and ratios."""
    (progress or noop)(f"producer: {repeat} timings of {PRODUCER_BATCH} writes per method")
    with ProducerWorkload() as p:
        p.check_each_path()
        methods: list[tuple[Any, ...]] = [
            ("vm_write", "EmulatedVm.write (zone -> ring)", p.vm_write_batch, p.reset),
            ("ring_push", "Ring.push (same ring)", p.ring_push_batch, p.reset),
            ("ring_push_many", "Ring.push_many (same writes, one call)",
             p.ring_push_many_batch, p.reset),
            ("empty_loop", "the loop alone (reference)", p.empty_loop, noop),
        ]
        resets_before = p.resets
        per_block, times, block_best = time_blocks(methods, repeat, blocks, rotate=True)
        # Each reset after the first checked the call before it; check the last one.
        p.check_contents()
        resets = sum(setup == p.reset for _key, _label, _fn, setup in methods) * per_block * blocks
        if p.resets - resets_before != resets:
            raise AssertionError(f"{p.resets - resets_before} resets for {resets} timed calls")
        batch, ring_entries = p.batch, p.ring.capacity

    results = {key: timing_figures(label, times[key], "writes_per_call", batch, "call", "write")
               for key, label, *_ in methods}
    pooled = {"best": "best_us_per_call", "pooled": "median_us_per_call"}
    return {
        "caption": [f"{batch} 4-byte writes per timed call into one {ring_entries}-entry "
                    f"ring; best of {per_block * blocks} timings in {blocks} interleaved "
                    "blocks; reset not timed"],
        "batch": batch, "ring_entries": ring_entries, "repeat": per_block * blocks,
        "blocks": blocks, "methods": results,
        "ratios": [ratio("EmulatedVm.write / Ring.push", results, "vm_write", "ring_push",
                         block_best, "<=", 2.0, pooled),
                   ratio("Ring.push_many / Ring.push", results, "ring_push_many", "ring_push",
                         block_best, pooled=pooled)],
    }
