"""A device bus that knows about coalescing.

Device models keep the convention of unicorn, avatar2 and QEMU:
``read(offset, size) -> int`` and ``write(offset, size, value)``,
little-endian, the offset relative to the mapping.  The bus maps them at MMIO
or port ranges and dispatches accesses.  A mapping made with
``coalesced=True`` gets a zone in the bus's *producer* (an
:class:`~kvmcoal.EmulatedVm` or a real :class:`kvmcoal.kvm.Vm`), so guest
writes there go through a ring; the bus drains those rings into the devices,
in ring order, before anything could observe them:

- before every read;
- before any access to a ``flush_on_access`` mapping (the data register of
  an index/data pair, a UART's status register);
- before a coalesced write takes the exit path (its ring was full);
- before a coalesced mapping is unmapped;
- and, on real KVM, before every exit (:meth:`Bus.run`, which is
  ``Vcpu.run_loop(bus.deliver, bus.load, drain=bus.flush)``).

Drain rings into the bus through :meth:`Bus.flush` (or ``drain=bus.flush``),
not with ``ring.consume(bus.deliver)`` directly: flush takes the bus's
delivery lock before a ring's consumer lock, and a device that reads the
bus from its write handler needs that order, or two threads deadlock.

A flush never restarts itself: a device that touches the bus while it is
being replayed does not start a nested flush (QEMU's flush-in-progress rule),
and every entry is delivered exactly once.

Delivery is C (:mod:`kvmcoal._dispatch`): the flush finds each entry's
mapping, computes the offset and value and calls the device's ``write``
itself, or hands a run of entries at once to a *batch device*, one with a
``write_many(records)`` method (see :class:`BatchDevice`).  A flush
with nothing pending costs no system call and does not look at every
buffer: producers mark the buffers they fill.

>>> from kvmcoal import Bus, EmulatedVm
>>> from kvmcoal.devices import IndexDataPair
>>> vm = EmulatedVm()
>>> bus = Bus(vm)
>>> pci = IndexDataPair({0x80000000: 0x12345678})
>>> _ = bus.map(pci.index, 0xCF8, 4, pio=True, coalesced=True)
>>> _ = bus.map(pci.data, 0xCFC, 4, pio=True, flush_on_access=True)
>>> bus.write(0xCF8, 4, 0x80000000, pio=True)     # coalesced: no exit
>>> hex(bus.read(0xCFC, 4, pio=True))              # flushes the index first
'0x12345678'
>>> vm.close()
"""

from __future__ import annotations

import asyncio
import functools
import os
import select
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _dispatch
from ._ring import Ring
from .buffers import FDS_PER_BUFFER, CoalescedBuffer
from .errors import BusError, MappingOverlapError, RingCorruptedError, UnmappedAccessError
from .zones import Zone

__all__ = ["BATCH_LIMIT", "BATCH_MIN", "BatchDevice", "Bus", "Device", "Mapping"]

BATCH_LIMIT = _dispatch.BATCH_LIMIT
"""The most records one ``write_many`` call receives (a longer run comes in several)."""
BATCH_MIN = _dispatch.BATCH_MIN
"""The fewest: a shorter run of a batch device's entries comes through ``write``."""


class Device(Protocol):
    """A device model: little-endian accesses at offsets into its mapping."""

    def read(self, offset: int, size: int) -> int:
        """The value of a *size*-byte load at *offset* into the mapping."""

    def write(self, offset: int, size: int, value: int) -> None:
        """A *size*-byte store of *value* (an int, little-endian) at *offset*."""


class BatchDevice(Device, Protocol):
    """A device that takes a flush's run of its coalesced writes in one call.

    ``write_many(records)`` receives consecutive entries of one ring that
    are all this device's (through any of its mappings) as ABI records
    (``struct kvm_coalesced_mmio``, 24 bytes each) whose ``phys_addr`` is
    rebased to the device's offset, the ``offset`` that ``write`` would get:
    a read-only numpy array of :data:`kvmcoal.ENTRY_DTYPE` when numpy is
    installed, else a read-only memoryview of the bytes (both support the
    buffer protocol, so ``numpy.frombuffer(records, ENTRY_DTYPE)``,
    ``bytes(records)`` and :data:`kvmcoal.ENTRY_STRUCT` ``.iter_unpack`` work
    on either).  ``pio`` tells a device mapped at ports and MMIO which
    window a record is from.  Entries for other devices between its own
    split the run, so every device still sees the ring's order; a run holds
    at most :data:`BATCH_LIMIT` records, and one of fewer than
    :data:`BATCH_MIN` (8) comes through ``write``, entry by entry, which
    costs less than making the records (a device whose writes interleave
    with another's one for one gets no batches at all).  A run is consumed
    before the call: if write_many raises, the whole run counts as
    delivered and the entries after it stay queued.  ``write_many`` (like
    ``write``) is looked up when the device is mapped; one that is not
    callable is ignored.  Writes that exit (not coalesced,
    or refused by a full ring) still arrive through ``write``.  The records
    are a copy: the device may keep them.
    """

    def write_many(self, records: Any) -> None:
        """A run of this device's coalesced writes, oldest first."""


class Producer(Protocol):
    """What the bus needs of an EmulatedVm or a kvm.Vm."""

    def register_coalesced_mmio(self, zone: Zone) -> None: ...

    def unregister_coalesced_mmio(self, zone: Zone) -> None: ...

    @property
    def ring(self) -> Ring: ...

    @property
    def closed(self) -> bool: ...


@dataclass(eq=False, slots=True)
class Mapping:
    """One device mapped on the bus, as :meth:`Bus.map` made it.

    Attributes:
        device: the device model.
        base, size: the range ``[base, base + size)``, MMIO or (``pio``) ports.
        coalesced: writes go through a ring; ``flush_on_access``: every access
            delivers the pending writes first.
        device_offset: the offset the device sees at ``base``.
        buffer: the mapping's own CoalescedBuffer (``own_buffer=True``), or None.
        end, delta: derived: ``base + size``, and what an address minus gives
            the device's offset.
    """

    device: Device
    base: int
    size: int
    pio: bool = False
    coalesced: bool = False
    flush_on_access: bool = False
    device_offset: int = 0
    buffer: CoalescedBuffer | None = None
    end: int = field(init=False, repr=False)
    delta: int = field(init=False, repr=False)
    # What delivery in C knows of it (kvmcoal._dispatch.Target).
    _target: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.end = self.base + self.size
        self.delta = self.base - self.device_offset

    @property
    def zone(self) -> Zone:
        return Zone(self.base, self.size, pio=self.pio)

    def contains(self, addr: int, size: int) -> bool:
        return self.base <= addr and addr + size <= self.end

    def stats(self) -> dict[str, Any]:
        """Counters of this mapping, as plain values.

        ``delivered``: coalesced writes delivered from rings; ``direct``:
        writes delivered at once (exits, or :meth:`Bus.write` on a
        non-coalesced mapping or a full ring; reads are not counted);
        ``flushes``: flushes (and poller passes) that found entries for it;
        ``largest_batch``: the most entries it received in one of those,
        whether one by one or in batches; ``batches``: write_many calls (a
        batch device's, see :class:`BatchDevice`; counted on the mapping of
        a run's first entry); ``buffer``: its own buffer's
        :meth:`~kvmcoal.CoalescedBuffer.stats`, or None.
        """
        out: dict[str, Any] = {"device": type(self.device).__name__, "base": self.base,
                               "size": self.size, "pio": self.pio, "coalesced": self.coalesced}
        out.update(self._target.stats() if self._target is not None else
                   {"delivered": 0, "direct": 0, "flushes": 0, "largest_batch": 0, "batches": 0})
        out["buffer"] = None
        if self.buffer is not None:
            try:
                out["buffer"] = self.buffer.stats()
            except ValueError:       # closed meanwhile (unmapped on another thread)
                pass
        return out

    def __str__(self) -> str:
        kind = "port" if self.pio else "MMIO"
        return (f"{type(self.device).__name__} at {kind} "
                f"[{self.base:#x}, {self.base + self.size:#x})")


@functools.cache
def _records_view() -> Any:
    """What write_many receives for a run's bytes: a numpy view, or a memoryview."""
    try:
        import numpy

        from . import ENTRY_DTYPE
    except ImportError:
        return memoryview
    return functools.partial(numpy.frombuffer, dtype=ENTRY_DTYPE)


def _records(data: bytes) -> Any:
    # numpy is imported at the first batch, not with the Bus.
    return _records_view()(data)


# Buses alive in this process: a forked child gets fresh locks (a poller
# thread of the parent may have held one at the fork, and it does not exist
# in the child).
_live_buses: weakref.WeakSet[Bus] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for bus in list(_live_buses):
        bus._dispatch._after_fork()
        bus._maps_lock = threading.Lock()
        bus._pollers = None          # the parent's threads are not here


os.register_at_fork(after_in_child=_after_fork_in_child)


class Bus:
    """Maps devices at MMIO and port ranges and keeps coalesced writes in order.

    *producer* is an EmulatedVm or a kvm.Vm (or None for a bus without
    coalescing).  *unmapped* says what an access to nothing does: ``"raise"``
    (UnmappedAccessError) or ``"ones"`` (reads return all-ones and writes are
    dropped, like an open bus); either way it is counted in
    :attr:`unmapped_accesses`.
    """

    def __init__(self, producer: Producer | None = None, *, unmapped: str = "raise") -> None:
        if unmapped not in ("raise", "ones"):
            raise ValueError(f"unmapped must be 'raise' or 'ones', not {unmapped!r}")
        if producer is not None and not all(
                hasattr(type(producer), name) for name in ("register_coalesced_mmio",
                                                     "unregister_coalesced_mmio", "ring")):
            raise TypeError(f"producer must be an EmulatedVm or a kvmcoal.kvm.Vm (or None), "
                            f"not {type(producer).__name__!r}")
        self.producer = producer
        self._closed = False
        self.unmapped = unmapped
        self.unmapped_accesses = 0
        self._direct_writes = 0
        self._maps: dict[bool, list[Mapping]] = {False: [], True: []}
        # Every delivery from a ring happens under the dispatcher's lock,
        # taken before any ring's consumer lock: a device that reads the bus
        # while a poller delivers to it then cannot deadlock against another
        # poller (or the vCPU thread) taking the rings in the other order.
        # It holds the bus weakly: a Bus nobody holds is still collected.
        self._dispatch = _dispatch.Dispatcher(_unmapped_entry(weakref.ref(self)),
                                              _records)
        if producer is not None:
            ring_or_none = getattr(producer, "_ring_or_none", None)
            if ring_or_none is not None:      # a kvm.Vm maps its ring with its first vCPU
                self._dispatch.set_vm_ring(None, ring_or_none)
            else:
                self._dispatch.set_vm_ring(producer.ring)
        # The hot paths go straight to C: these shadow the methods below,
        # which say what they do.
        self.flush = self._dispatch.flush         # type: ignore[method-assign]
        self.deliver = self._dispatch.deliver     # type: ignore[method-assign]
        self._maps_lock = threading.Lock()   # map()/unmap() replace _maps one at a time
        self._pollers: _Pollers | None = None
        _live_buses.add(self)
        self.poller_errors: list[tuple[Mapping, BaseException]] = []
        """Exceptions device models raised on poller threads (the pollers go on)."""

    # -- mapping --

    def map(self, device: Device, base: int, size: int, *, pio: bool = False,
            coalesced: bool = False, flush_on_access: bool = False, own_buffer: bool = False,
            device_offset: int = 0) -> Mapping:
        """Map *device* at ``[base, base + size)``; offsets start at *device_offset*.

        ``coalesced`` registers a zone so writes go through a ring (the
        producer's VM-wide ring, or with ``own_buffer`` a CoalescedBuffer of
        the mapping's own, drained by :meth:`start_pollers` or
        :meth:`poll_async` as writes arrive, for doorbell-style devices).
        A device with a ``write_many`` method gets its coalesced writes in
        batches (:class:`BatchDevice`).
        """
        if self._closed:
            raise ValueError("operation on a closed Bus")
        _check_flags(pio=pio, coalesced=coalesced, flush_on_access=flush_on_access,
                     own_buffer=own_buffer)
        if not (callable(getattr(device, "read", None)) and callable(getattr(device, "write", None))):
            raise TypeError(f"{type(device).__name__} is not a device: it needs read(offset, size) "
                            f"and write(offset, size, value) (see kvmcoal.devices.adapters)")
        mapping = Mapping(device, base, size, pio, coalesced, flush_on_access, device_offset)
        zone = mapping.zone   # validates base and size
        if size == 0:
            raise ValueError("a mapping needs a size of at least 1")
        if not 0 <= mapping.delta < 1 << 64:
            raise ValueError(f"device_offset={device_offset:#x} is past base={base:#x}: "
                             f"the device's offsets would be negative")
        for other in self._maps[mapping.pio]:
            if other.base < base + size and base < other.base + other.size:
                raise MappingOverlapError(f"{mapping} overlaps {other}")
        if own_buffer and not coalesced:
            raise ValueError("own_buffer needs coalesced=True")
        if coalesced and (size >= 1 << 31 or base + size >= 1 << 64):
            # The kernel (and EmulatedVm, which follows it) compares a zone's
            # length as an int and its end without wrapping: such a zone could
            # be registered but never unregistered, so unmap() could not work.
            raise ValueError(f"a coalesced mapping of {size:#x} bytes at {base:#x} could never "
                             f"be unregistered: coalesced mappings must be under 2 GiB and end "
                             f"below 2**64")
        if coalesced:
            producer = self._need_producer()
            if own_buffer:
                create = getattr(producer, "create_coalesced_buffer", None)
                if create is None:
                    raise BusError(f"{type(producer).__name__} has no per-device buffers "
                                   f"(the v2 API); use an EmulatedVm or a kvmcoal.kvm.Vm")
                mapping.buffer = create()
                try:
                    producer.register_coalesced_mmio2(zone, mapping.buffer)  # type: ignore[attr-defined]
                except BaseException:
                    mapping.buffer.close()
                    raise
            else:
                producer.register_coalesced_mmio(zone)
        mapping._target = _dispatch.Target(
            mapping, device, base, size, pio, mapping.delta,
            mapping.buffer.ring if mapping.buffer is not None else None)
        # A new list, not an append: code on another thread may be walking
        # the old one (copy-on-write; the replacement is one atomic store).
        with self._maps_lock:
            added = not self._closed     # close() marks itself under this lock
            if added:
                self._maps[mapping.pio] = self._maps[mapping.pio] + [mapping]
                self._dispatch.set_targets(pio, [m._target for m in self._maps[pio]])
                if mapping.buffer is not None:
                    self._dispatch.add_buffer(mapping._target)
                    if self._pollers is not None:
                        self._pollers.add(mapping)
        if not added:                    # closed meanwhile: undo the registration
            if coalesced and not self._producer_closed():
                producer = self._need_producer()
                if mapping.buffer is not None:
                    producer.unregister_coalesced_mmio2(zone, mapping.buffer)  # type: ignore[attr-defined]
                else:
                    producer.unregister_coalesced_mmio(zone)
            if mapping.buffer is not None:
                mapping.buffer.close()
            raise ValueError("operation on a closed Bus")
        return mapping

    def unmap(self, mapping: Mapping) -> None:
        """Remove *mapping*, first delivering every write still pending for it.

        From a device that a flush is delivering to, it stops the mapping's
        writes from coalescing at once, and the flush still delivers the
        entries already queued for it, in order, before letting it go.
        """
        if mapping not in self._maps[mapping.pio]:
            raise BusError(f"{mapping} is not mapped on this bus")
        if (mapping.buffer is not None and not mapping.buffer.closed
                and mapping.buffer.ring._consuming_here()):
            raise RuntimeError(f"unmap({mapping}) from a handler its own buffer's delivery is "
                               f"calling (its poller, or a flush draining it): unmap it after "
                               f"that delivery returns")
        if mapping.coalesced and self._producer_closed():
            # Closing the producer unbound its zones and released its rings:
            # there is nothing left to unregister or deliver.
            self._remove_mapping(mapping)
            if mapping.buffer is not None:
                mapping.buffer.close()
        elif mapping.coalesced:
            # Stop new writes coalescing first, then deliver what is queued,
            # and only then let go of the mapping and its buffer.
            producer = self._need_producer()
            if mapping.buffer is not None:
                producer.unregister_coalesced_mmio2(mapping.zone, mapping.buffer)  # type: ignore[attr-defined]
            else:
                producer.unregister_coalesced_mmio(mapping.zone)
            if mapping.buffer is None and self._dispatch.flushing_here():
                # A device unmapping this mapping from the flush delivering to
                # it: that flush, further up this thread's stack, still
                # delivers what is queued for it, in order, then lets it go.
                self._remove_mapping(mapping, retire=True)
                return
            try:
                self.flush()
                if mapping.buffer is not None:
                    self._dispatch.drain(mapping._target)
            finally:
                # Even if the flush raised (a device failed, a ring is corrupted),
                # the mapping goes: otherwise it could never be removed.
                self._remove_mapping(mapping)
                if mapping.buffer is not None:
                    # Under the delivery lock: a poller that is delivering
                    # from it finishes first.
                    with self._dispatch:
                        mapping.buffer.close()
        else:
            self._remove_mapping(mapping)

    def _remove_mapping(self, mapping: Mapping, *, retire: bool = False) -> None:
        # Copy-on-write, as in map().  The pollers forget its buffer first:
        # its eventfd is about to be closed.
        with self._maps_lock:
            if retire:
                self._dispatch.retire(mapping._target)
            if mapping.buffer is not None:
                if self._pollers is not None:
                    self._pollers.remove(mapping)
                self._dispatch.remove_buffer(mapping._target)
            self._maps[mapping.pio] = [m for m in self._maps[mapping.pio] if m is not mapping]
            self._dispatch.set_targets(mapping.pio, [m._target for m in self._maps[mapping.pio]])

    def find(self, addr: int, size: int = 1, *, pio: bool = False) -> Mapping | None:
        """The mapping that holds ``[addr, addr + size)``, or None."""
        if pio is not True and pio is not False:
            _check_flags(pio=pio)
        return self._dispatch.find(addr, size, pio)   # type: ignore[no-any-return]

    @property
    def mappings(self) -> list[Mapping]:
        """Every mapping, MMIO first, then port I/O."""
        return self._maps[False] + self._maps[True]

    # -- accesses from the CPU side --

    def read(self, addr: int, size: int, *, pio: bool = False) -> int:
        """A load: flushes pending coalesced writes, then reads the device."""
        if pio is not True and pio is not False:
            _check_flags(pio=pio)
        if type(size) is not int or not 0 < size <= 8:
            _check_access(size)
        self.flush()
        mapping = self._dispatch.find(addr, size, pio)
        if mapping is None:
            return self._unmapped(addr, size, pio, "read")
        return mapping.device.read(addr - mapping.delta, size)  # type: ignore[no-any-return]

    def write(self, addr: int, size: int, value: int, *, pio: bool = False) -> None:
        """A store of the int *value* (little-endian, *size* bytes): coalesced where the
        mapping is, else delivered now (in order)."""
        # The checks cost a few type tests on the common path: this runs per access.
        if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"Bus.write() takes the value written as an int, not "
                            f"{type(value).__name__!r} (EmulatedVm.write and Ring.push take "
                            f"bytes)")
        if type(size) is not int or not 0 < size <= 8:
            _check_access(size)
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"value={value:#x} does not fit a {size}-byte write")
        if pio is not True and pio is not False:
            _check_flags(pio=pio)
        target = self._dispatch.target(addr, size, pio)
        if target is None:
            self._unmapped(addr, size, pio, "write")
            return
        mapping = target.mapping
        if mapping.flush_on_access:
            self.flush()
        if mapping.coalesced:
            write = getattr(self.producer, "write", None)
            if write is not None and write(addr, value.to_bytes(size, "little"), pio=pio):
                return
            self.flush()   # refused (ring full): the exit path, after what is queued
        self._direct_writes += 1
        target.count_direct()
        mapping.device.write(addr - mapping.delta, size, value)

    # -- the consumer side --

    def deliver(self, addr: int, data: bytes, pio: bool) -> None:
        """Deliver one write now, as an exit brings it: *data* is its bytes.

        The handler the run loop gives exits (:meth:`run`).  Draining a ring
        with ``ring.consume(bus.deliver)`` yourself skips the bus's delivery
        lock (see the module docstring); each call counts as a direct
        access of its mapping.
        """
        self._dispatch.deliver(addr, data, pio)

    def load(self, addr: int, size: int, pio: bool) -> int:
        """Answer a guest load or ``in`` (the run loop's read handler)."""
        return self.read(addr, size, pio=pio)

    def flush(self) -> int:
        """Deliver every pending coalesced write to its device, in ring order.

        Each ring is delivered in its own order: the producer's VM-wide ring
        first, then the mappings' own buffers that hold entries.  Returns
        how many entries were delivered.  A flush called while one is in
        progress on this thread (a device touching the bus during replay)
        returns 0 at once; the outer flush delivers the rest in order.  On
        real KVM, draining the VM ring first routes it: entries a full
        buffer held back move once draining it made room, so a flush ends
        with the kernel ring empty (or holding only entries for a buffer
        that is not this bus's).  With nothing pending it makes no system
        call and touches no buffer.
        """
        return self._dispatch.flush()   # type: ignore[no-any-return]

    def run(self, vcpu: Any) -> Any:
        """Run a kvm.Vcpu to HLT with this bus as its devices (flushing before every exit)."""
        return vcpu.run_loop(self.deliver, self.load, drain=self.flush)

    # -- pollers for own-buffer mappings --

    def start_pollers(self, threads: int = 1) -> None:
        """Deliver every own-buffer mapping's writes as they arrive, from *threads* threads.

        The threads sleep in one epoll set holding every own buffer's
        eventfd (mappings made later join it, unmapped ones leave it), so a
        bus of hundreds of doorbells needs *threads* threads and two fds
        more than its buffers.  Called again, it starts threads up to
        *threads* (never stops any).  A device that
        raises is recorded in :attr:`poller_errors` and the pollers go on;
        a buffer whose ring is corrupted is recorded once and no longer
        polled.
        """
        if self._closed:
            raise ValueError("operation on a closed Bus")
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise TypeError(f"threads must be an int, not {type(threads).__name__!r}")
        if threads < 1:
            raise ValueError(f"threads={threads}: start at least one poller thread")
        pollers = self._need_pollers()
        pollers.start(threads)

    @property
    def poller_threads(self) -> int:
        """How many poller threads run."""
        pollers = self._pollers
        return 0 if pollers is None else sum(t.is_alive() for t in pollers.threads)

    def _need_pollers(self) -> _Pollers:
        with self._maps_lock:
            if self._pollers is None:
                self._pollers = _Pollers(weakref.ref(self))
                for mapping in self.mappings:
                    if mapping.buffer is not None:
                        self._pollers.add(mapping)
            return self._pollers

    async def poll_async(self, mapping: Mapping | None = None) -> None:
        """An asyncio task body delivering own-buffer writes as they arrive.

        Without *mapping*: every own-buffer mapping's, now and later, from
        one reader on the pollers' epoll set.  With one: only that
        mapping's.  Either way it returns (quietly) when the bus is closed,
        or when the one mapping is unmapped; cancel it to stop it earlier.
        """
        if mapping is not None:
            await self._poll_one_async(mapping)
            return
        if self._closed:
            return
        pollers = self._need_pollers()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if pollers.serve(block=False) and not done.done():
                done.set_result(None)

        try:
            fd = pollers.dup_fileno()
        except (OSError, ValueError):     # closed meanwhile
            return
        try:
            loop.add_reader(fd, on_readable)
            pollers.waiters.append((loop, done))
            if pollers.stopped:           # closed between the check and here
                return
            try:
                await done
            finally:
                loop.remove_reader(fd)
                pollers.waiters.remove((loop, done))
        finally:
            os.close(fd)

    async def _poll_one_async(self, mapping: Mapping) -> None:
        if mapping.buffer is None:
            raise BusError(f"{mapping} has no buffer of its own")
        buf = mapping.buffer
        while True:
            try:
                await buf.wait_async()
                self._dispatch.drain(mapping._target)
            except RingCorruptedError as exc:
                self.poller_errors.append((mapping, exc))   # as a poller thread does
                return
            except Exception as exc:
                if buf.closed:       # unmapped, or the bus closed: end, as a poller does
                    return
                # A device model failed: keep the error, keep polling.
                self.poller_errors.append((mapping, exc))

    def close(self) -> None:
        """Flush, stop the pollers, unmap everything.  Idempotent.

        Raises RuntimeError, closing nothing, when called from a device the
        bus is delivering to (close it after that delivery returns).

        If the flush raises (a device failed, a ring is corrupted), the
        pollers are still stopped and everything unmapped; then it raises.
        A Bus dropped without close() is closed when it is collected.
        """
        if self._dispatch.owned():
            # From a device this bus is delivering to: the delivery holds the
            # rings (and the pollers) that closing must take away.
            raise RuntimeError("Bus.close() called from a device the bus is delivering to "
                               "(a flush or a poller): close it after that delivery returns")
        with self._maps_lock:
            if self._closed:
                return
            self._closed = True
        errors: list[BaseException] = []
        try:
            self.flush()
        except Exception as exc:
            errors.append(exc)
        pollers, self._pollers = self._pollers, None
        if pollers is not None:
            pollers.close()
        for mapping in list(self.mappings):
            try:
                self.unmap(mapping)
            except Exception as exc:   # unmap removed it anyway; go on with the rest
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Bus:
        return self

    def __del__(self) -> None:
        # Like a file, a Bus nobody holds is closed: pending writes reach
        # their devices, the pollers end and the own buffers' fds are freed.
        if not getattr(self, "_closed", True):
            self.close()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- statistics --

    def stats(self) -> dict[str, Any]:
        """Counters of the bus and of each mapping, as plain values (see :meth:`Mapping.stats`).

        ``flushes``: flushes that looked at a ring (one that finds nothing
        pending, the VM ring empty and no buffer marked, returns before
        counting); ``flushes_with_entries``: those that delivered entries;
        ``delivered``: entries delivered from rings to devices (not those no
        mapping held, which count in ``unmapped_accesses``);
        ``direct_writes``, ``unmapped_accesses`` as the attributes;
        ``poller_threads``; ``fds``: the fds its buffers and pollers hold.
        """
        d = self._dispatch
        own = sum(1 for m in self.mappings if m.buffer is not None and not m.buffer.closed)
        pollers = self._pollers
        return {"flushes": d.flushes, "flushes_with_entries": d.flushes_with_entries,
                "delivered": d.delivered, "direct_writes": self.direct_writes,
                "unmapped_accesses": self.unmapped_accesses,
                "poller_threads": self.poller_threads,
                "fds": FDS_PER_BUFFER * own + (_Pollers.FDS if pollers is not None else 0),
                "mappings": [m.stats() for m in self.mappings]}

    # -- helpers --

    @property
    def direct_writes(self) -> int:
        """Writes delivered at once, not from a ring: :meth:`write`'s to a mapping that
        is not coalesced or whose ring was full, and the exits :meth:`deliver` got."""
        return self._direct_writes + self._dispatch.direct  # type: ignore[no-any-return]

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _producer_closed(self) -> bool:
        return bool(getattr(self.producer, "closed", False))

    def _need_producer(self) -> Producer:
        if self.producer is None:
            raise BusError("coalesced mappings need a producer: Bus(EmulatedVm()) or "
                           "Bus(kvm_vm)")
        return self.producer

    def _unmapped(self, addr: int, size: int, pio: bool, what: str) -> int:
        self.unmapped_accesses += 1
        if self.unmapped == "raise":
            kind = "port" if pio else "MMIO"
            raise UnmappedAccessError(f"{what} of {size} bytes at {kind} {addr:#x}: "
                                      f"no device is mapped there")
        return (1 << (8 * size)) - 1


def _unmapped_entry(bus_ref: weakref.ref[Bus]) -> Any:
    """The dispatcher's handler for an entry no mapping holds (the bus held weakly)."""
    def unmapped(addr: int, size: int, pio: bool, what: str) -> None:
        bus = bus_ref()
        if bus is not None:
            bus._unmapped(addr, size, pio, what)
    return unmapped


def _check_flags(**flags: object) -> None:
    """Flags are bools: ``pio="no"`` is a mistake, not a port mapping."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, not {value!r}")


def _check_access(size: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int, not {type(size).__name__!r}")
    if not 1 <= size <= 8:
        raise ValueError(f"size={size}: an access is 1 to 8 bytes")


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class _Pollers:
    """One epoll set over a bus's own buffers, and the threads that sleep in it.

    Each buffer's eventfd is in the set one-shot: the thread that gets its
    event drains it and re-arms it, so no two threads drain one buffer at
    once for nothing.  A stop eventfd, level-triggered, ends every thread.
    The threads hold the bus only while they deliver.
    """

    FDS = 2          # the epoll fd and the stop eventfd

    def __init__(self, bus_ref: weakref.ref[Bus]) -> None:
        self.bus_ref = bus_ref
        self.epoll = select.epoll()
        try:
            self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            self.epoll.close()
            raise
        self.epoll.register(self.stop_fd, select.EPOLLIN)
        self.by_fd: dict[int, Mapping] = {}
        self.threads: list[threading.Thread] = []
        # poll_async() tasks' futures, which close() resolves (from any thread).
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.stopped = False

    def add(self, mapping: Mapping) -> None:
        assert mapping.buffer is not None
        fd = mapping.buffer.fileno()
        self.by_fd[fd] = mapping
        self.epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)

    def remove(self, mapping: Mapping) -> None:
        assert mapping.buffer is not None
        if mapping.buffer.closed:
            return
        fd = mapping.buffer.fileno()
        if self.by_fd.get(fd) is mapping:
            del self.by_fd[fd]
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def start(self, threads: int) -> None:
        while len(self.threads) < threads:
            thread = threading.Thread(target=self.run, name=f"kvmcoal-poller {len(self.threads)}",
                                      daemon=True)
            self.threads.append(thread)
            thread.start()

    def dup_fileno(self) -> int:
        """A duplicate of the epoll fd for an event loop's reader (the caller closes it)."""
        return os.dup(self.epoll.fileno())

    def run(self) -> None:
        while self.serve(block=True) is False:
            pass

    def serve(self, *, block: bool) -> bool:
        """Wait for events (or not), deliver them; True once the pollers are stopped."""
        try:
            events = self.epoll.poll(-1 if block else 0)
        except (OSError, ValueError):      # closed under us
            return True
        for fd, _ in events:
            if fd == self.stop_fd:
                return True
            mapping = self.by_fd.get(fd)
            if mapping is None:
                continue
            if self._deliver(mapping):
                try:
                    self.epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
                except (OSError, ValueError):
                    pass                   # unmapped meanwhile
        return self.stopped

    def _deliver(self, mapping: Mapping) -> bool:
        """Drain one buffer; whether to keep polling it."""
        buf = mapping.buffer
        assert buf is not None
        bus = self.bus_ref()
        if bus is None or buf.closed:
            return False
        try:
            if not bus._dispatch.drain(mapping._target) and not buf.closed:
                # Woken with nothing to deliver: the eventfd was written
                # outside the protocol (or in its one narrow race); clear it
                # or the set wakes again at once.
                buf.ring._clear_wakeup()
        except RingCorruptedError as exc:
            # A peer broke the ring: every later pass would fail the same
            # way, at full speed.  Say so once and stop polling it.
            bus.poller_errors.append((mapping, exc))
            return False
        except Exception as exc:
            if buf.closed:                 # closed under us by unmap/close
                return False
            # A device model failed (a ValueError of its own included):
            # keep the error, keep polling.
            bus.poller_errors.append((mapping, exc))
        finally:
            del bus
        return True

    def close(self) -> None:
        self.stopped = True
        try:
            os.eventfd_write(self.stop_fd, 1)
        except OSError:
            pass
        for loop, done in list(self.waiters):
            try:
                loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:           # that loop is closed: its task is gone
                pass
        me = threading.current_thread()
        for thread in self.threads:
            if thread is not me:
                thread.join(5)
        self.epoll.close()
        os.close(self.stop_fd)
