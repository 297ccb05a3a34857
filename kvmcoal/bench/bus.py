"""The bus section: what a Bus costs with hundreds of devices, and per delivered entry.

All on one EmulatedVm; each timed call makes CALLS (1000) calls of the
operation, or delivers one full VM ring (169 entries on 4 KiB pages):

- ``bus.read()`` of a plain device with every ring empty, with one
  own-buffer device mapped and with 500 (the flush before the read must
  not cost more for the 500);
- ``Bus.flush()`` with every ring empty, against a Python loop calling
  ``len(ring)`` once per ring (the VM ring and every own buffer's), with
  one own-buffer device and with 500;
- delivering a full ring to a Python device through ``Bus.flush()``
  (``write(offset, size, value)`` per entry), against a plain Python loop
  calling the same device's ``write`` with constant arguments as often; and
  to a batch device (``write_many``), for comparison.  The ring is refilled
  (``push_many``, untimed) before each timed flush, which checks that the
  device got every entry.

The poller figure is a count, not a timing: the threads a Bus with 500
own-buffer devices runs after ``start_pollers(threads=1)``.

The targets: the read with 500 devices at most 1.5x the read with one; an
empty flush at most 2x the len() loop; per-entry delivery at most 1.5x the
plain loop; at most threads + 1 threads in the process.
"""

from __future__ import annotations

import resource
import threading
from typing import Any

from kvmcoal import Bus, EmulatedVm
from kvmcoal.devices import Doorbell

from .baselines import ENTRY
from .reporting import Progress, Section, noop, ratio, time_blocks, timing_figures

CALLS = 1000
MANY = 500
BASE = 0x100000
PLAIN = 0x2000
REG = 0x3000
VALUE = 7


class Register:
    """A device that counts what it gets: the cheapest a Python device can be."""

    def __init__(self) -> None:
        self.count = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.count += 1


class BatchRegister(Register):
    def write_many(self, records: Any) -> None:
        self.count += memoryview(records).nbytes // ENTRY.size   # numpy or not


class BusWorkload:
    """Buses with 1 and MANY own-buffer devices, and one delivering a full ring."""

    def __init__(self) -> None:
        self.vms: list[EmulatedVm] = []
        self.buses: dict[int, Bus] = {}
        self.rings: dict[int, list[Any]] = {}
        for n in (1, MANY):
            vm = EmulatedVm()
            bus = Bus(vm)
            for i in range(n):
                bus.map(Doorbell(), BASE + 16 * i, 4, coalesced=True, own_buffer=True)
            bus.map(Register(), PLAIN, 4)
            self.vms.append(vm)
            self.buses[n] = bus
            self.rings[n] = [vm.ring] + [m.buffer.ring for m in bus.mappings if m.buffer]
        self.vm = EmulatedVm()
        self.bus = Bus(self.vm)
        self.device = Register()
        self.batch_device = BatchRegister()
        self.bus.map(self.device, REG, 4, coalesced=True)
        self.bus.map(self.batch_device, REG + 0x10, 4, coalesced=True)
        ring = self.vm.ring
        self.entries = ring.capacity
        self.records = {addr: b"".join(ENTRY.pack(addr, 4, 0, VALUE.to_bytes(8, "little"))
                                       for _ in range(self.entries))
                        for addr in (REG, REG + 0x10)}
        self.expected = 0

    def reader(self, n: int) -> Any:
        bus = self.buses[n]

        def read() -> None:
            for _ in range(CALLS):
                bus.read(PLAIN, 4)
        return read

    def flusher(self, n: int) -> Any:
        flush = self.buses[n].flush

        def run() -> None:
            for _ in range(CALLS):
                flush()
        return run

    def len_loop(self, n: int) -> Any:
        rings = self.rings[n]

        def run() -> None:
            for _ in range(CALLS):
                for ring in rings:
                    len(ring)
        return run

    def _fill(self, addr: int, device: Register) -> None:
        self.check()
        if self.vm.ring.push_many(self.records[addr]) != self.entries:
            raise AssertionError("the VM ring refused a batch that fits")
        self.watched = device
        self.expected = device.count + self.entries

    def fill_plain(self) -> None:
        self._fill(REG, self.device)

    def fill_batch(self) -> None:
        self._fill(REG + 0x10, self.batch_device)

    def check(self) -> None:
        if self.expected and self.watched.count != self.expected:
            raise AssertionError(f"the device got {self.watched.count} entries, "
                                 f"not {self.expected}")
        self.expected = 0

    def deliver(self) -> None:
        self.bus.flush()

    def plain_loop(self) -> None:
        write = self.device.write
        for _ in range(self.entries):
            write(0, 4, VALUE)

    def threads_with_pollers(self) -> int:
        """Threads in the process once the MANY-device bus has started its pollers."""
        before = threading.active_count()
        self.buses[MANY].start_pollers(threads=1)
        return threading.active_count() - before + 1

    def close(self) -> None:
        self.check()
        for bus in [*self.buses.values(), self.bus]:
            bus.close()
        for vm in [*self.vms, self.vm]:
            vm.close()


def _enough_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * MANY + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise RuntimeError(f"the bus section needs {need} fds; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def measure(repeat: int, blocks: int, progress: Progress | None = None) -> Section:
    """Time reads, empty flushes and deliveries on buses of 1 and 500 devices."""
    (progress or noop)(f"bus: {repeat} timings per method, {MANY} own-buffer devices")
    _enough_fds()
    w = BusWorkload()
    try:
        methods: list[tuple[Any, ...]] = [
            ("read_1", f"bus.read() x{CALLS}, 1 own-buffer device", w.reader(1), noop),
            ("read_many", f"bus.read() x{CALLS}, {MANY} own-buffer devices", w.reader(MANY),
             noop),
            ("flush_1", f"Bus.flush() x{CALLS}, empty, 2 rings", w.flusher(1), noop),
            ("len_1", f"len(ring) loop x{CALLS}, 2 rings", w.len_loop(1), noop),
            ("flush_many", f"Bus.flush() x{CALLS}, empty, {MANY + 1} rings", w.flusher(MANY),
             noop),
            ("len_many", f"len(ring) loop x{CALLS}, {MANY + 1} rings", w.len_loop(MANY), noop),
            ("deliver", "Bus.flush() of a full ring to device.write", w.deliver, w.fill_plain),
            ("deliver_batch", "Bus.flush() of a full ring to device.write_many", w.deliver,
             w.fill_batch),
            ("plain", "plain loop: device.write(0, 4, 7) as often", w.plain_loop, w.check),
        ]
        per_block, times, block_best = time_blocks(methods, repeat, blocks, rotate=True)
        threads = w.threads_with_pollers()
        many = w.buses[MANY].stats()
        stats = {"delivery_bus": w.bus.stats(), "delivery_vm": w.vm.stats(),
                 f"bus_of_{MANY}": {k: v for k, v in many.items() if k != "mappings"}}
    finally:
        w.close()
    entry_methods = ("deliver", "deliver_batch", "plain")
    results = {key: timing_figures(label, times[key], "entries_per_call" if key in entry_methods
                                   else "calls", w.entries if key in entry_methods else CALLS,
                                   "call", "entry" if key in entry_methods else "op")
               for key, label, *_ in methods}
    pooled = {"best": "best_us_per_call", "pooled": "median_us_per_call"}
    return {
        "caption": [f"EmulatedVm; {CALLS} calls per timed call, or one full ring of "
                    f"{w.entries} entries; best of {per_block * blocks} timings in {blocks} "
                    f"interleaved blocks; refills not timed",
                    f"threads with {MANY} own-buffer devices after start_pollers(threads=1): "
                    f"{threads} (the target: at most 2)"],
        "repeat": per_block * blocks, "blocks": blocks, "entries": w.entries,
        "poller_threads_total": threads,
        "stats": stats,
        "methods": results,
        "ratios": [
            ratio(f"bus.read: {MANY} devices / 1", results, "read_many", "read_1", block_best,
                  "<=", 1.5, pooled),
            ratio("empty Bus.flush / len() loop, 2 rings", results, "flush_1", "len_1",
                  block_best, "<=", 2.0, pooled),
            ratio(f"empty Bus.flush / len() loop, {MANY + 1} rings", results, "flush_many",
                  "len_many", block_best, "<=", 2.0, pooled),
            ratio("Bus delivery / plain write() loop, per entry", results, "deliver", "plain",
                  block_best, "<=", 1.5, pooled),
            ratio("batch delivery / plain write() loop, per entry", results, "deliver_batch",
                  "plain", block_best, None, None, pooled),
            # A count against its bound, in the shape of a ratio so that the
            # verdict and --check judge it with the rest.
            {"name": f"threads with {MANY} devices, 1 poller / 2", "op": "<=", "target": 1.0,
             "blocks": threads / 2, "blocks_min": threads / 2, "blocks_max": threads / 2,
             "met": threads <= 2},
        ],
    }
