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

import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._ring import Ring
from .buffers import CoalescedBuffer
from .errors import BusError, MappingOverlapError, RingCorruptedError, UnmappedAccessError
from .zones import Zone

__all__ = ["Bus", "Device", "Mapping"]


class Device(Protocol):
    """A device model: little-endian accesses at offsets into its mapping."""

    def read(self, offset: int, size: int) -> int:
        """The value of a *size*-byte load at *offset* into the mapping."""

    def write(self, offset: int, size: int, value: int) -> None:
        """A *size*-byte store of *value* (an int, little-endian) at *offset*."""


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
        end, delta: derived, for dispatch: ``base + size``, and what an address
            minus gives the device's offset.
    """

    device: Device
    base: int
    size: int
    pio: bool = False
    coalesced: bool = False
    flush_on_access: bool = False
    device_offset: int = 0
    buffer: CoalescedBuffer | None = None
    _poller: threading.Thread | None = field(default=None, repr=False)
    # Derived once for the dispatch path: the end of the range, and what to
    # subtract from an address to get the device's offset.
    end: int = field(init=False, repr=False)
    delta: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.end = self.base + self.size
        self.delta = self.base - self.device_offset

    @property
    def zone(self) -> Zone:
        return Zone(self.base, self.size, pio=self.pio)

    def contains(self, addr: int, size: int) -> bool:
        return self.base <= addr and addr + size <= self.end

    def __str__(self) -> str:
        kind = "port" if self.pio else "MMIO"
        return (f"{type(self.device).__name__} at {kind} "
                f"[{self.base:#x}, {self.base + self.size:#x})")


# Buses alive in this process: a forked child gets fresh locks (a poller
# thread of the parent may have held one at the fork, and it does not exist
# in the child).
_live_buses: weakref.WeakSet[Bus] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for bus in list(_live_buses):
        bus._deliver_lock = threading.RLock()
        bus._maps_lock = threading.Lock()
        bus._flushing = threading.local()


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
        self.direct_writes = 0
        """Writes :meth:`write` delivered at once (not coalesced, or refused by a full ring)."""
        self._maps: dict[bool, list[Mapping]] = {False: [], True: []}
        self._flushing = threading.local()
        # Every delivery from a ring happens under this one lock, taken
        # before any ring's consumer lock: a device that reads the bus while
        # a poller delivers to it then cannot deadlock against another
        # poller (or the vCPU thread) taking the rings in the other order.
        self._deliver_lock = threading.RLock()
        self._maps_lock = threading.Lock()   # map()/unmap() replace _maps one at a time
        _live_buses.add(self)
        self._stop = threading.Event()
        self.poller_errors: list[tuple[Mapping, BaseException]] = []
        """Exceptions device models raised on poller threads (the poller goes on)."""

    # -- mapping --

    def map(self, device: Device, base: int, size: int, *, pio: bool = False,
            coalesced: bool = False, flush_on_access: bool = False, own_buffer: bool = False,
            device_offset: int = 0) -> Mapping:
        """Map *device* at ``[base, base + size)``; offsets start at *device_offset*.

        ``coalesced`` registers a zone so writes go through a ring (the
        producer's VM-wide ring, or with ``own_buffer`` a CoalescedBuffer of
        the mapping's own, drained by :meth:`start_pollers` or
        :meth:`poll_async` as writes arrive, for doorbell-style devices).
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
        # A new list, not an append: deliver() on another thread may be walking
        # the old one (copy-on-write; the replacement is one atomic store).
        with self._maps_lock:
            added = not self._closed     # close() marks itself under this lock
            if added:
                self._maps[mapping.pio] = self._maps[mapping.pio] + [mapping]
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
        """Remove *mapping*, first delivering every write still pending for it."""
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
            if mapping.buffer is not None:
                mapping.buffer.close()
            self._remove_mapping(mapping)
        elif mapping.coalesced:
            # Stop new writes coalescing first, then deliver what is queued,
            # and only then let go of the mapping and its buffer.
            producer = self._need_producer()
            if mapping.buffer is not None:
                producer.unregister_coalesced_mmio2(mapping.zone, mapping.buffer)  # type: ignore[attr-defined]
            else:
                producer.unregister_coalesced_mmio(mapping.zone)
            try:
                self.flush()
                if mapping.buffer is not None:
                    with self._deliver_lock:
                        self._drain_buffer(mapping)
            finally:
                # Even if the flush raised (a device failed, a ring is corrupted),
                # the mapping goes: otherwise it could never be removed.
                if mapping.buffer is not None:
                    with self._deliver_lock:
                        mapping.buffer.close()
                    # The poller sees the buffer closed and ends.  Wait for it,
                    # unless this thread is it, or holds the lock it needs to
                    # get there (unmap() from a device handler).
                    poller = mapping._poller
                    if (poller is not None and poller is not threading.current_thread()
                            and not self._deliver_lock._is_owned()):  # type: ignore[attr-defined]
                        poller.join(5)
                self._remove_mapping(mapping)
        else:
            self._remove_mapping(mapping)

    def _remove_mapping(self, mapping: Mapping) -> None:
        # Copy-on-write, as in map().
        with self._maps_lock:
            self._maps[mapping.pio] = [m for m in self._maps[mapping.pio] if m is not mapping]

    def find(self, addr: int, size: int = 1, *, pio: bool = False) -> Mapping | None:
        """The mapping that holds ``[addr, addr + size)``, or None."""
        if pio is not True and pio is not False:
            _check_flags(pio=pio)
        for mapping in self._maps[pio]:
            if mapping.contains(addr, size):
                return mapping
        return None

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
        mapping = self.find(addr, size, pio=pio)
        if mapping is None:
            return self._unmapped(addr, size, pio, "read")
        return mapping.device.read(addr - mapping.delta, size)

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
        mapping = self.find(addr, size, pio=pio)
        if mapping is None:
            self._unmapped(addr, size, pio, "write")
            return
        if mapping.flush_on_access:
            self.flush()
        if mapping.coalesced:
            write = getattr(self.producer, "write", None)
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            if write is not None and write(addr, data, pio=pio):
                return
            self.flush()   # refused (ring full): the exit path, after what is queued
        self.direct_writes += 1
        mapping.device.write(addr - mapping.delta, size, value)

    # -- the consumer side --

    def deliver(self, addr: int, data: bytes, pio: bool) -> None:
        """Deliver one write as it comes from a ring or an exit.

        The handler :meth:`flush` gives each ring's ``consume``; draining a
        ring with ``ring.consume(bus.deliver)`` yourself skips the bus's
        delivery lock (see the module docstring).
        """
        # The replay hot path: find() inlined.
        size = len(data)
        for mapping in self._maps[pio]:
            if mapping.base <= addr and addr + size <= mapping.end:
                mapping.device.write(addr - mapping.delta, size, int.from_bytes(data, "little"))
                return
        self._unmapped(addr, size, pio, "write")

    def load(self, addr: int, size: int, pio: bool) -> int:
        """Answer a guest load or ``in`` (the run loop's read handler)."""
        return self.read(addr, size, pio=pio)

    def flush(self) -> int:
        """Deliver every pending coalesced write to its device, in ring order.

        Each ring is delivered in its own order: the producer's VM-wide ring
        first, then the mappings' own buffers.  Returns how many entries were
        delivered.  A flush called while one is in progress on this thread
        (a device touching the bus during replay) returns 0 at once; the
        outer flush delivers the rest in order.
        """
        if (self.producer is None or getattr(self._flushing, "active", False)
                or self._producer_closed()):   # its rings went with it
            return 0
        # A kvm.Vm maps its ring with its first vCPU: before, nothing is in it.
        ring_or_none = getattr(self.producer, "_ring_or_none", None)
        ring = ring_or_none() if ring_or_none is not None else self.producer.ring
        with self._deliver_lock:
            return self._flush_locked(ring)

    def _flush_locked(self, ring: Ring | None) -> int:
        self._flushing.active = True
        # On real KVM, ring.consume() first routes the kernel ring: entries a
        # full buffer held back move once draining it made room, so the loop
        # ends with the kernel ring empty (or holding only entries for a
        # buffer that is not this bus's).
        try:
            delivered = 0
            while True:   # writes made during the replay are flushed too
                n = ring.consume(self.deliver) if ring is not None else 0
                for mapping in self.mappings:
                    if mapping.buffer is not None:
                        n += self._drain_buffer(mapping)
                if not n:
                    return delivered
                delivered += n
        finally:
            self._flushing.active = False

    def _drain_buffer(self, mapping: Mapping) -> int:
        assert mapping.buffer is not None
        if mapping.buffer.closed:
            return 0
        return mapping.buffer.ring.consume(self.deliver)

    def run(self, vcpu: Any) -> Any:
        """Run a kvm.Vcpu to HLT with this bus as its devices (flushing before every exit)."""
        return vcpu.run_loop(self.deliver, self.load, drain=self.flush)

    # -- pollers for own-buffer mappings --

    def start_pollers(self) -> None:
        """Start a thread per own-buffer mapping that delivers its writes as they arrive."""
        if self._closed:
            raise ValueError("operation on a closed Bus")
        for mapping in self.mappings:
            if mapping.buffer is not None and mapping._poller is None:
                # The thread holds the bus weakly: a Bus dropped without close()
                # is still collected, and its pollers then end.
                mapping._poller = threading.Thread(target=_poll, args=(weakref.ref(self), mapping),
                                                   name=f"kvmcoal-poller {mapping}", daemon=True)
                mapping._poller.start()

    async def poll_async(self, mapping: Mapping) -> None:
        """An asyncio task body delivering *mapping*'s own-buffer writes as they arrive."""
        if mapping.buffer is None:
            raise BusError(f"{mapping} has no buffer of its own")
        buf = mapping.buffer
        while True:
            try:
                await buf.wait_async()
                with self._deliver_lock:
                    buf.ring.consume(self.deliver)
            except ValueError:
                if buf.closed:       # unmapped, or the bus closed: end, as a poller thread does
                    return
                raise

    def close(self) -> None:
        """Flush, stop the pollers, unmap everything.  Idempotent.

        If the flush raises (a device failed, a ring is corrupted), the
        pollers are still stopped and everything unmapped; then it raises.
        A Bus dropped without close() is closed when it is collected.
        """
        with self._maps_lock:
            if self._closed:
                return
            self._closed = True
        errors: list[BaseException] = []
        try:
            self.flush()
        except Exception as exc:
            errors.append(exc)
        self._stop.set()
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

    # -- helpers --

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


def _poll(bus_ref: weakref.ref[Bus], mapping: Mapping) -> None:
    """A poller thread's body: deliver *mapping*'s own-buffer writes as they arrive.

    It holds the bus only while it delivers, so a Bus nobody else holds is
    collected (and closed) while its pollers sleep; they then end.
    """
    buf = mapping.buffer
    assert buf is not None
    while not buf.closed:
        bus = bus_ref()
        if bus is None or bus._stop.is_set():
            return
        errors = bus.poller_errors
        del bus
        try:
            if not buf.wait(0.1):
                continue
            bus = bus_ref()
            if bus is None:
                return
            try:
                with bus._deliver_lock:
                    if not buf.closed:
                        buf.ring.consume(bus.deliver)
            finally:
                del bus
        except RingCorruptedError as exc:
            # A peer broke the ring: every later pass would fail the same
            # way, at full speed.  Say so once and stop this poller.
            errors.append((mapping, exc))
            return
        except Exception as exc:
            if buf.closed:         # closed under us by unmap/close
                return
            # A device model failed (a ValueError of its own included):
            # keep the error, keep polling.
            errors.append((mapping, exc))
