"""EmulatedVm: the kernel's side of coalesced MMIO, in software.

It keeps what KVM keeps (the coalesced zones of both buses, the VM-wide
ring, and the per-buffer rings of the proposed v2 API) and offers the path a
vCPU's store takes: :meth:`EmulatedVm.write` returns True when the write was
coalesced into a ring and False when it must take the exit path instead.
The write path is C (kvmcoal._zone_bus._ZoneBus) and runs the ring's producer
without the GIL, under one lock per ring as the kernel does.

>>> vm = EmulatedVm()
>>> vm.register_coalesced_mmio(Zone(0xFE000000, 0x1000))
>>> vm.write(0xFE000010, b"\\x01\\x00\\x00\\x00"), vm.write(0xFD000000, b"\\x01")
(True, False)
>>> [hex(e.phys_addr) for e in vm.ring.drain()]
['0xfe000010']
>>> vm.close()
"""

from __future__ import annotations

import os
import threading
import weakref

from . import _ring, _zone_bus
from .buffers import CoalescedBuffer
from .errors import BufferForkedError, ZoneLimitError
from .zones import ZONE_LIMIT, Zone

__all__ = ["EmulatedVm"]


# VMs alive in this process: a forked child gets a fresh zones lock and
# forgets the parent's writers (see _after_fork_in_child).
_live_vms: weakref.WeakSet[EmulatedVm] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for vm in list(_live_vms):
        vm._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class EmulatedVm(_zone_bus._ZoneBus):
    """A software model of KVM's coalesced MMIO: zones, rings, the producer path.

    *page_size* sets the size of the VM-wide ring and the default size of
    buffers (default: the host's page size), to model hosts with 16 KiB or
    64 KiB pages.
    """

    def __init__(self, *, page_size: int | None = None) -> None:
        self.page_size = _ring.PAGE_SIZE if page_size is None else page_size
        self._vm_ring = CoalescedBuffer(self.page_size)
        # (zone, buffer or None for the VM-wide ring), in registration order.
        self._zones: list[tuple[Zone, CoalescedBuffer | None]] = []
        # Zone changes are read-modify-writes of _zones: one at a time.  (Writers
        # never take it; they use the installed table they started with.)
        self._zones_lock = threading.RLock()
        self._buffers: weakref.WeakSet[CoalescedBuffer] = weakref.WeakSet()
        self._closed = False
        self._pid = os.getpid()
        _live_vms.add(self)

    def _after_fork_in_child(self) -> None:
        # A parent thread may have held the lock, or been inside write(), at
        # the fork: neither exists here, and either would hang a zone change.
        self._zones_lock = threading.RLock()
        self._forget_writers()
        self._pid = -1

    # -- the VM-wide ring (KVM_(UN)REGISTER_COALESCED_MMIO) --

    @property
    def ring(self) -> _ring.Ring:
        """The VM-wide ring that zones registered without a buffer write into."""
        self._check()
        return self._vm_ring.ring

    def register_coalesced_mmio(self, zone: Zone) -> None:
        """Coalesce writes in *zone* into the VM-wide ring (overlaps are allowed)."""
        self._add(zone, None)

    def unregister_coalesced_mmio(self, zone: Zone) -> None:
        """Remove every VM-wide-ring zone of the same kind that contains *zone*.

        Always succeeds, as the kernel's does; entries already in the ring stay.
        """
        self._remove(zone, lambda target: target is None)

    # -- per-device buffers (the proposed v2 API) --

    def create_coalesced_buffer(self, *, nbytes: int | None = None) -> CoalescedBuffer:
        """A new buffer with its own ring (and lock) to bind zones to; *nbytes*: one page."""
        with self._zones_lock:      # a close() racing us must see (and close) it
            self._check()
            buf = CoalescedBuffer(self.page_size if nbytes is None else nbytes)
            buf._on_close.append(self._buffer_closed)
            self._buffers.add(buf)
        return buf

    def register_coalesced_mmio2(self, zone: Zone, buffer: CoalescedBuffer) -> None:
        """Coalesce writes in *zone* into *buffer*'s ring."""
        self._check_buffer(buffer)   # None here is a mistake, not the VM-wide ring
        self._add(zone, buffer)      # checks it again, under the zones' lock

    def unregister_coalesced_mmio2(self, zone: Zone, buffer: CoalescedBuffer) -> None:
        """Remove every zone bound to *buffer* of the same kind that contains *zone*."""
        self._check_buffer(buffer)
        self._remove(zone, lambda target: target is buffer)

    @property
    def zones(self) -> list[tuple[Zone, CoalescedBuffer | None]]:
        """The registered zones and their buffers (None: the VM-wide ring)."""
        return list(self._zones)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    # -- bookkeeping --

    def _check(self) -> None:
        if self._closed:
            raise ValueError("operation on a closed EmulatedVm")
        if self._pid != os.getpid():
            raise BufferForkedError("this EmulatedVm was inherited across fork(): its rings are "
                                    "the parent's shared memory; close() it here, and use the "
                                    "VM in the process that created it")

    def _check_buffer(self, buffer: CoalescedBuffer) -> None:
        self._check()
        if not isinstance(buffer, CoalescedBuffer):
            also = (" (register_coalesced_mmio binds a zone to the VM-wide ring)"
                    if buffer is None else "")
            raise TypeError(f"buffer must be a CoalescedBuffer, not "
                            f"{type(buffer).__name__!r}{also}")
        if buffer.closed:
            raise ValueError("the buffer is closed")
        if buffer not in self._buffers:
            raise ValueError("the buffer belongs to another EmulatedVm (or none): create it "
                             "with this VM's create_coalesced_buffer()")

    def _add(self, zone: Zone, target: CoalescedBuffer | None) -> None:
        with self._zones_lock:
            # Under the lock: a close() of the VM or the buffer may race us.
            if target is None:
                self._check()
            else:
                self._check_buffer(target)
            if not isinstance(zone, Zone):
                raise TypeError(f"zone must be a kvmcoal.Zone, not {type(zone).__name__!r}")
            if sum(1 for z, _ in self._zones if z.pio == zone.pio) >= ZONE_LIMIT:
                raise ZoneLimitError(zone.pio, ZONE_LIMIT)
            previous = self._zones
            self._zones = previous + [(zone, target)]
            try:
                self._install(zone.pio)
            except BaseException:
                self._zones = previous          # nothing half-registered
                raise

    def _remove(self, zone: Zone, matches) -> None:
        self._check()
        if not isinstance(zone, Zone):
            raise TypeError(f"zone must be a kvmcoal.Zone, not {type(zone).__name__!r}")
        # The kernel tests containment with an int length: a size of 2**31 or
        # more is negative there and removes nothing.
        if zone.size >= 1 << 31:
            return
        with self._zones_lock:
            kept = [(z, t) for z, t in self._zones
                    if not (z.pio == zone.pio and matches(t) and z.contains(zone.addr, zone.size))]
            if len(kept) != len(self._zones):
                previous, self._zones = self._zones, kept
                try:
                    self._install(zone.pio)
                except BaseException:
                    self._zones = previous          # nothing half-unregistered
                    raise

    def _install(self, pio: bool) -> None:
        # The kernel's bus is sorted by (address, length) and a write tries
        # the matching devices in that order.
        # _ring, not ring: a forked child's close() still installs tables (of
        # rings cut loose, which take no write) without the fork check.
        entries = sorted(((z.addr, z.size, (self._vm_ring if t is None else t)._ring)
                          for z, t in self._zones if z.pio == pio),
                         key=lambda entry: entry[:2])
        self._set_zones(pio, entries)

    def _buffer_closed(self, buffer: CoalescedBuffer) -> None:
        with self._zones_lock:
            if any(t is buffer for _, t in self._zones):
                self._zones = [(z, t) for z, t in self._zones if t is not buffer]
                self._install(False)
                self._install(True)

    def close(self) -> None:
        """Close every buffer this VM created and the VM-wide ring.  Idempotent.

        Zone changes and buffer creation from other threads either finish
        before it or fail with ValueError after it: nothing registered
        meanwhile survives it.  Raises RuntimeError, closing nothing, when
        called from a handler of a consumer call on one of the VM's rings
        (close it after that call returns).  In a forked child it closes the
        child's copy.
        """
        with self._zones_lock:
            if self._closed:
                return
            rings = [self._vm_ring._ring, *(buf._ring for buf in self._buffers)]
            if any(ring is not None and ring._consuming_here() for ring in rings):
                raise RuntimeError("EmulatedVm.close() called from a handler of a consumer "
                                   "call on one of its rings: close it after that call returns")
            self._closed = True     # first: registration from here on is refused
            buffers = list(self._buffers)
            self._zones = []
            self._set_zones(False, [])
            self._set_zones(True, [])
        # The buffers close outside the lock: a buffer's close() takes its own
        # lock and then (its callback) this one, and a consumer's handler
        # that changes zones needs this one while the close waits for it.
        for buf in buffers:
            buf.close()
        self._vm_ring.close()

    def __enter__(self) -> EmulatedVm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
