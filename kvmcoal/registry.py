"""A VM's coalesced zones and buffers: the registration rules both VMs share.

:class:`kvmcoal.EmulatedVm` (the software kernel) and :class:`kvmcoal.kvm.Vm`
(real KVM, with the router) keep their zones here, in the order the
kernel's I/O bus keeps them (``kvm_io_bus_register_dev``'s insertion rule),
because which zone takes a write depends on that order when zones nest or
overlap.  Each VM supplies what a change does (:meth:`ZoneRegistry._apply`).

Unregistering follows the kernel, which removes every same-kind zone that
contains the given range, whatever it is bound to; the API removes only
those bound to the named target (a buffer, or None for the VM-wide ring),
so the others are registered again, at the places the kernel's insertion
rule gives them.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Optional

from . import _zone_bus
from .buffers import CoalescedBuffer
from .errors import ZoneLimitError
from .zones import ZONE_LIMIT, Zone

__all__ = ["ZoneRegistry", "Target", "BusOrder"]

Target = Optional[CoalescedBuffer]
"""What a zone is bound to: a buffer, or None for the VM-wide ring."""
BusOrder = list[tuple[Zone, Target]]


def inserted(bus: BusOrder, zone: Zone, target: Target) -> BusOrder:
    """*bus* with (zone, target) registered as the kernel inserts it."""
    at = _zone_bus.insert_position([(z.addr, z.size, None) for z, _ in bus], zone.addr, zone.size)
    return bus[:at] + [(zone, target)] + bus[at:]


class ZoneRegistry:
    """The zones and buffers of a VM (a mixin of EmulatedVm and kvm.Vm)."""

    _default_nbytes: int

    def _init_registry(self) -> None:
        self._buses: dict[bool, BusOrder] = {False: [], True: []}
        # Zone changes are read-modify-writes of _buses: one at a time.
        self._zones_lock = threading.RLock()
        self._buffers: weakref.WeakSet[CoalescedBuffer] = weakref.WeakSet()

    # -- what the VM supplies --

    def _check(self) -> None:
        raise NotImplementedError

    def _apply(self, pio: bool, old: BusOrder, new: BusOrder, zone: Zone,
               added: bool) -> None:
        """Make *new* the bus (it was *old*): *zone* was added, or removed with
        every zone containing it (those of *new* not in *old* were removed
        too and are registered again)."""
        raise NotImplementedError

    # -- the API --

    @property
    def zones(self) -> list[tuple[Zone, Target]]:
        """The registered zones and their buffers (None: the VM-wide ring),
        MMIO then PIO, each in the kernel's bus order."""
        return self._buses[False] + self._buses[True]

    def _zoned(self, addr: int, size: int, pio: bool) -> bool:
        """Whether a registered zone holds the access (an exit there found its ring full)."""
        return any(z.contains(addr, size) for z, _ in self._buses[pio])

    def register_coalesced_mmio(self, zone: Zone) -> None:
        """Coalesce writes in *zone* into the VM-wide ring (overlaps are allowed)."""
        self._add(zone, None)

    def unregister_coalesced_mmio(self, zone: Zone) -> None:
        """Remove every VM-wide-ring zone of the same kind that contains *zone*.

        Always succeeds, as the kernel's does; entries already in the ring stay.
        """
        self._remove(zone, lambda target: target is None)

    def create_coalesced_buffer(self, *, nbytes: int | None = None) -> CoalescedBuffer:
        """A new buffer with its own ring (and lock) to bind zones to; *nbytes*: one page."""
        with self._zones_lock:      # a close() racing us must see (and close) it
            self._check()
            buf = CoalescedBuffer(self._default_nbytes if nbytes is None else nbytes)
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

    # -- bookkeeping --

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
            name = type(self).__name__
            raise ValueError(f"the buffer belongs to another {name} (or none): create it "
                             f"with this {name}'s create_coalesced_buffer()")

    def _add(self, zone: Zone, target: Target) -> None:
        with self._zones_lock:
            # Under the lock: a close() of the VM or the buffer may race us.
            if target is None:
                self._check()
            else:
                self._check_buffer(target)
            if not isinstance(zone, Zone):
                raise TypeError(f"zone must be a kvmcoal.Zone, not {type(zone).__name__!r}")
            old = self._buses[zone.pio]
            if len(old) >= ZONE_LIMIT:
                raise ZoneLimitError(zone.pio, ZONE_LIMIT)
            new = inserted(old, zone, target)
            self._apply(zone.pio, old, new, zone, True)   # raises, changing nothing
            self._buses[zone.pio] = new

    def _remove(self, zone: Zone, matches: Callable[[Target], bool], *,
                check: bool = True) -> None:
        if check:
            self._check()
        if not isinstance(zone, Zone):
            raise TypeError(f"zone must be a kvmcoal.Zone, not {type(zone).__name__!r}")
        # The kernel tests containment with an int length: a size of 2**31 or
        # more is negative there and removes nothing.
        if zone.size >= 1 << 31:
            return
        with self._zones_lock:
            old = self._buses[zone.pio]
            hit = [(z, t) for z, t in old if z.contains(zone.addr, zone.size)]
            if not any(matches(t) for _, t in hit):
                return
            new = [(z, t) for z, t in old if (z, t) not in hit]
            for z, t in hit:           # the kernel took these too: put them back
                if not matches(t):
                    new = inserted(new, z, t)
            self._apply(zone.pio, old, new, zone, False)
            self._buses[zone.pio] = new

    def _buffer_closed(self, buffer: CoalescedBuffer) -> None:
        with self._zones_lock:
            if getattr(self, "closed", False):
                return
            for pio in (False, True):
                for z, t in list(self._buses[pio]):
                    if t is buffer and (z, t) in self._buses[pio]:
                        # No _check(): a forked child closes what it inherited.
                        self._remove(z, lambda target: target is buffer, check=False)
