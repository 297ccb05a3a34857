"""The router section: routing the kernel ring into buffers, against drain_into.

The router (kvmcoal.kvm._router) is what runs on a vCPU thread after every
KVM_RUN when zones are bound to buffers.  Each timed call routes ROUTE_BATCH
(4096) entries out of a 1 MiB ring standing in for the kernel's (the same
code runs on the real one; a one-page ring would make each call too short
to time), through one Router.route() call, into 1 MiB buffers:

- one buffer: every entry belongs to one buffer's zone;
- two buffers: the entries alternate between two buffers' zones (a run of
  one entry per push: the router's worst case);
- with Vm.ring's: the entries alternate between a buffer's zone and a
  VM-wide zone, whose entries stay, compacted, in the kernel ring.

The baseline is ``drain_into`` of the same 4096 entries from the same ring
into a bytearray: the cheapest way to take them out at all.  The untimed
setup refills the ring (and empties the buffers) after checking that the
call before it moved exactly what it should.

The target: routing at most 1.5x drain_into, per entry.
"""

from __future__ import annotations

from typing import Any

from kvmcoal import CoalescedBuffer, Ring, _zone_bus
from kvmcoal.kvm._router import Router

from .baselines import ENTRY
from .reporting import Progress, Section, noop, ratio, time_blocks, timing_figures

ROUTE_BATCH = 4096
RING_NBYTES = 1 << 20
ZONE_A, ZONE_B, ZONE_VM = 0x10_0000, 0x20_0000, 0x30_0000
ZONE_SIZE = 0x10_0000


class RouterWorkload:
    """A stand-in kernel ring with a router, two buffers and one VM-wide zone."""

    def __init__(self, batch: int = ROUTE_BATCH) -> None:
        self.memory = bytearray(RING_NBYTES)
        self.ring = Ring(self.memory)
        self.buffers = [CoalescedBuffer(RING_NBYTES), CoalescedBuffer(RING_NBYTES)]
        self.router = Router(self.ring)
        mmio = _zone_bus._ZoneTable([(ZONE_A, ZONE_SIZE, self.buffers[0].ring),
                                     (ZONE_B, ZONE_SIZE, self.buffers[1].ring),
                                     (ZONE_VM, ZONE_SIZE, None)])
        self.router.install(mmio, _zone_bus._ZoneTable([]))
        self.router.attach()
        self.batch = batch
        # drain_into's own ring: on the router's, it would route first.
        self.plain = Ring(bytearray(RING_NBYTES))
        self.out = bytearray(batch * ENTRY.size)

        def records(zones: list[int]) -> bytes:
            return b"".join(ENTRY.pack(zones[i % len(zones)] + 4 * (i // len(zones)), 4, 0,
                                       i.to_bytes(4, "little") + bytes(4))
                            for i in range(batch))
        self.workloads = {"one": records([ZONE_A]), "two": records([ZONE_A, ZONE_B]),
                          "mixed": records([ZONE_A, ZONE_VM])}
        self.expect: tuple[int, int, int] | None = None   # buffer A, buffer B, kept
        self.calls = 0

    def _check(self) -> None:
        if self.expect is None:
            return
        got = (len(self.buffers[0].ring), len(self.buffers[1].ring),
               len(self.ring) + len(self.plain))
        if got != self.expect:
            raise AssertionError(f"the timed call left {got} entries (buffer A, buffer B, "
                                 f"kernel ring), not {self.expect}")
        self.calls += 1

    def _fill(self, name: str, expect: tuple[int, int, int], ring: Ring | None = None) -> None:
        self._check()
        for buf in self.buffers:
            buf.ring.reset()
        self.ring.reset()
        self.plain.reset()
        ring = self.ring if ring is None else ring
        if ring.push_many(self.workloads[name]) != self.batch:
            raise AssertionError("the stand-in kernel ring refused a batch that fits")
        self.expect = expect

    def setup_one(self) -> None:
        self._fill("one", (self.batch, 0, 0))

    def setup_two(self) -> None:
        self._fill("two", (self.batch // 2, self.batch // 2, 0))

    def setup_mixed(self) -> None:
        self._fill("mixed", (self.batch // 2, 0, self.batch // 2))

    def setup_drain(self) -> None:
        self._fill("one", (0, 0, 0), self.plain)

    def route(self) -> None:
        self.router.route()

    def drain_into(self) -> None:
        if self.plain.drain_into(self.out) != self.batch:
            raise AssertionError("drain_into took less than the batch")

    def close(self) -> None:
        self._check()
        self.router.stop()
        for buf in self.buffers:
            buf.close()
        self.ring.release()
        self.plain.release()


def measure(repeat: int, blocks: int, progress: Progress | None = None) -> Section:
    """Time routing three mixes of entries against drain_into; figures and ratios."""
    (progress or noop)(f"router: {repeat} timings of {ROUTE_BATCH} entries per method")
    w = RouterWorkload()
    try:
        methods: list[tuple[Any, ...]] = [
            ("drain_into", "drain_into (the same entries, into a bytearray)", w.drain_into,
             w.setup_drain),
            ("route_one", "Router.route: one buffer", w.route, w.setup_one),
            ("route_two", "Router.route: two buffers, alternating", w.route, w.setup_two),
            ("route_mixed", "Router.route: a buffer and Vm.ring's, alternating", w.route,
             w.setup_mixed),
        ]
        per_block, times, block_best = time_blocks(methods, repeat, blocks, rotate=True)
    finally:
        w.close()
    if w.calls < len(methods) * per_block * blocks - 1:
        raise AssertionError(f"{w.calls} timed calls were checked, of "
                             f"{len(methods) * per_block * blocks}")
    results = {key: timing_figures(label, times[key], "entries_per_call", ROUTE_BATCH, "call",
                                   "entry") for key, label, *_ in methods}
    pooled = {"best": "best_ns_per_entry", "pooled": "median_ns_per_entry"}
    return {
        "caption": [f"{ROUTE_BATCH} entries per timed call out of a 1 MiB stand-in for the "
                    f"kernel ring; best of {per_block * blocks} timings in {blocks} "
                    "interleaved blocks; refills not timed"],
        "batch": ROUTE_BATCH, "repeat": per_block * blocks, "blocks": blocks,
        "methods": results,
        "ratios": [ratio(f"{label.split(': ')[1]}: route / drain_into", results, key,
                         "drain_into", block_best, "<=", 1.5, pooled)
                   for key, label, *_ in methods[1:]],
    }
