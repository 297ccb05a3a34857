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
from .errors import BufferForkedError
from .registry import BusOrder, ZoneRegistry
from .zones import Zone

__all__ = ["EmulatedVm"]


# VMs alive in this process: a forked child gets a fresh zones lock and
# forgets the parent's writers (see _after_fork_in_child).
_live_vms: weakref.WeakSet[EmulatedVm] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for vm in list(_live_vms):
        vm._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class EmulatedVm(ZoneRegistry, _zone_bus._ZoneBus):
    """A software model of KVM's coalesced MMIO: zones, rings, the producer path.

    *page_size* sets the size of the VM-wide ring and the default size of
    buffers (default: the host's page size), to model hosts with 16 KiB or
    64 KiB pages.  The zones are kept, and a write finds its zone, as the
    kernel's I/O bus does (see :mod:`kvmcoal.registry`).
    """

    def __init__(self, *, page_size: int | None = None) -> None:
        self.page_size = _ring.PAGE_SIZE if page_size is None else page_size
        self._default_nbytes = self.page_size
        self._vm_ring = CoalescedBuffer(self.page_size)
        self._init_registry()
        self._closed = False
        self._pid = os.getpid()
        _live_vms.add(self)

    def _after_fork_in_child(self) -> None:
        # A parent thread may have held the lock, or been inside write(), at
        # the fork: neither exists here, and either would hang a zone change.
        self._zones_lock = threading.RLock()
        self._forget_writers()
        self._pid = -1

    @property
    def ring(self) -> _ring.Ring:
        """The VM-wide ring that zones registered without a buffer write into."""
        self._check()
        return self._vm_ring.ring

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _check(self) -> None:
        if self._closed:
            raise ValueError("operation on a closed EmulatedVm")
        if self._pid != os.getpid():
            raise BufferForkedError("this EmulatedVm was inherited across fork(): its rings are "
                                    "the parent's shared memory; close() it here, and use the "
                                    "VM in the process that created it")

    def _apply(self, pio: bool, old: BusOrder, new: BusOrder, zone: Zone, added: bool) -> None:
        # _ring, not ring: a forked child's close() still installs tables (of
        # rings cut loose, which take no write) without the fork check.
        self._set_zones(pio, [(z.addr, z.size, (self._vm_ring if t is None else t)._ring)
                              for z, t in new])

    def stats(self) -> dict[str, object]:
        """Counters of this VM, as plain values.

        ``coalesced_writes``: writes recorded into a ring; ``ring_full_refusals``:
        writes a zone held but whose ring was full (or closed), which took
        the exit path; ``exits``: writes that took the exit path, by the
        ``KVM_EXIT_*`` reason KVM would give them (``"MMIO"``, ``"IO"``; the
        refused ones included), as :meth:`kvmcoal.kvm.Vm.stats` has them; ``flushes``:
        consumer calls that took entries from the VM-wide ring;
        ``ring``: that ring's depth high-water mark and entries consumed;
        ``buffers``: how many per-device buffers are open.  Readable after
        close() too.
        """
        coalesced, refused, mmio, pio = self._write_stats()
        high, taken, passes = self._vm_ring._ring._stats()
        return {"coalesced_writes": coalesced, "ring_full_refusals": refused,
                "exits": {"MMIO": mmio, "IO": pio}, "flushes": passes,
                "ring": {"depth_high_water": high, "entries_consumed": taken},
                "buffers": sum(1 for buf in self._buffers if not buf.closed)}

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
            self._buses = {False: [], True: []}
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
