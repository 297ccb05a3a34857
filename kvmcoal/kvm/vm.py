"""The VM: its fd, guest memory, coalesced zones and buffers, vCPUs and the kernel's ring.

The v2 API (per-device buffers) is provided in userspace: every zone is an
ordinary coalesced zone to the kernel, and the router
(:mod:`kvmcoal.kvm._router`) moves the entries of buffer-bound zones from
the kernel's ring into their buffers.
"""

from __future__ import annotations

import atexit
import errno
import mmap
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from .. import _zone_bus
from .._ring import Ring
from ..buffers import CoalescedBuffer
from ..errors import BufferForkedError, KvmcoalError, KvmUnavailableError, ZoneLimitError
from ..registry import BusOrder, ZoneRegistry
from ..zones import ZONE_LIMIT, Zone
from . import _abi
from ._router import Router
from .fd import OwnsFd
from .vcpu import Vcpu

if TYPE_CHECKING:
    from .system import Kvm

__all__ = ["Vm"]

_TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _read_int(path: str) -> int | str:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return "unknown"


def _tracepoint_ids() -> tuple[int, int]:
    """The perf ids of the kvm:kvm_mmio and kvm:kvm_pio tracepoints."""
    for root in _TRACEFS:
        mmio, pio = (_read_int(f"{root}/events/kvm/{name}/id") for name in ("kvm_mmio", "kvm_pio"))
        if isinstance(mmio, int) and isinstance(pio, int):
            return mmio, pio
    raise KvmUnavailableError("the tracepoint wake-up needs tracefs, with the kvm tracepoints: "
                              "mount it (as root: mount -t tracefs nodev /sys/kernel/tracing)")

# Where real mode on Intel keeps its TSS; any unused guest-physical page range.
_TSS_ADDR = 0xFFFBD000

# VMs alive in this process: a forked child must not consume the parent's ring.
_live_vms: weakref.WeakSet[Vm] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for vm in list(_live_vms):
        vm._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _stop_watchers() -> None:
    # A watcher is a C thread reading the kernel ring and the buffers: it
    # must not outlive the interpreter's teardown of what it reads.
    for vm in list(_live_vms):
        if vm._pid == os.getpid():
            vm.stop_watcher()


class Vm(ZoneRegistry, OwnsFd):
    """A VM: guest memory, coalesced zones and buffers, vCPUs and the kernel's ring.

    Thread-safe: vCPUs run on any threads; ``close()`` refuses while one
    is running (a guest must never write into memory that is unmapped).

    Zones bound to buffers (:meth:`create_coalesced_buffer`,
    :meth:`register_coalesced_mmio2`) have their entries moved by the
    router into the buffers: after every KVM_RUN return on the vCPU's
    thread, before any consumer call on :attr:`ring`, on :meth:`route`,
    and, once started, on the watcher thread (:meth:`start_watcher`).
    """

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        # The capabilities are read once: a VM does not need its Kvm open.
        self._ring_page = kvm.coalesced_mmio_page_offset
        self._has_pio = kvm.has_coalesced_pio
        self._vcpu_mmap_size = kvm.vcpu_mmap_size
        fd = _abi.kvm_ioctl(kvm.fileno(), "KVM_CREATE_VM", 0)
        try:
            os.set_inheritable(fd, False)
            if kvm.check_extension(_abi.KVM_ABI["KVM_CAP_SET_TSS_ADDR"]):
                _abi.kvm_ioctl(fd, "KVM_SET_TSS_ADDR", _TSS_ADDR)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # Guest memory: (guest address, the mmap, a view of it that pins it).  The
        # pin makes mmap.close() and resize() refuse with BufferError while the
        # kernel's slot points at the mapping, so the guest never writes into
        # whatever the process maps there next.
        self._memory: list[tuple[int, mmap.mmap, memoryview]] = []
        self._vcpus: list[Vcpu] = []
        self._next_vcpu_id = 0     # the kernel keeps an id once KVM_CREATE_VCPU took it
        self._ring: Ring | None = None
        self._ring_map: mmap.mmap | None = None
        self._init_registry()
        self._default_nbytes = mmap.PAGESIZE      # the kernel ring's size
        # The router exists once the ring is mapped; vCPUs route through
        # _routing, set once a zone is bound to a buffer.
        self._router: Router | None = None
        self._routing: Router | None = None
        # The watcher's tracepoint wake-up is on (the router knows the threads).
        self._tracing = False
        self._watcher_args = (100, 0)
        # The ring's creation, vCPU creation and closing, memory, close().  Re-entrant:
        # a signal handler may close the VM in the middle of any of them.
        self._lock = threading.RLock()
        self._pid = os.getpid()
        _live_vms.add(self)

    def _forked(self) -> None:
        # The ring page is shared memory: a drain in the child would take the
        # parent's guest writes.  Cut it loose without its locks (a parent
        # thread may hold them), and give the child fresh locks of its own.
        self._pid = -1
        self._lock = threading.RLock()
        self._zones_lock = threading.RLock()
        if self._router is not None:
            self._router.forked()
        self._routing = None
        for vcpu in self._vcpus:
            vcpu._run_lock = threading.RLock()
            vcpu._in_loop = False
        if self._ring is not None:
            self._ring._release_after_fork()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._fd < 0

    def fileno(self) -> int:
        """The VM fd; ValueError once closed."""
        if self._fd < 0:
            raise ValueError("operation on a closed Vm")
        return self._fd

    def add_memory(self, guest_phys_addr: int, size: int) -> mmap.mmap:
        """Back [guest_phys_addr, +size) with new zeroed memory and return it.

        The mapping belongs to the VM until :meth:`close`: closing or
        resizing it before then raises BufferError, since the guest may
        still write there.
        """
        if size <= 0 or size % mmap.PAGESIZE or guest_phys_addr % mmap.PAGESIZE:
            raise ValueError(f"guest memory at {guest_phys_addr:#x} of {size:#x} bytes "
                             f"must be page-aligned and non-empty")
        with self._lock:
            fd = self.fileno()
            memory = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            slot = (guest_phys_addr, memory, memoryview(memory))
            try:
                _abi.kvm_set_user_memory_region(fd, len(self._memory), guest_phys_addr, memory)
            except OSError:           # the kernel refused: no slot points at it
                slot[2].release()
                memory.close()
                raise
            finally:
                # Any other exception (a signal handler's) may have come after the
                # kernel took the slot: keep the memory pinned until close().
                if not memory.closed:
                    self._memory.append(slot)
        return memory

    def memory(self, guest_phys_addr: int, size: int) -> memoryview:
        """A view of [guest_phys_addr, +size) of guest memory (one slot must back it all)."""
        self.fileno()
        for base, memory, _pin in self._memory:
            if base <= guest_phys_addr and guest_phys_addr + size <= base + len(memory):
                return memoryview(memory)[guest_phys_addr - base:guest_phys_addr - base + size]
        raise ValueError(f"no memory slot backs [{guest_phys_addr:#x}, "
                         f"{guest_phys_addr + size:#x})")

    # -- zones (the registration rules are kvmcoal.registry's) --

    def _check(self) -> None:
        self.fileno()
        if self._pid == -1:
            raise BufferForkedError(
                "this Vm was inherited across fork(): its zones and rings are the parent's; "
                "use the VM in the process that created it")

    def _apply(self, pio: bool, old: BusOrder, new: BusOrder, zone: Zone, added: bool) -> None:
        if self._pid == -1 or self._fd < 0:
            return        # a forked child's or a closing VM's buffer: the kernel is not ours
        if not self._ring_page:
            raise KvmUnavailableError("this kernel has no coalesced MMIO (KVM_CAP_COALESCED_MMIO)")
        if pio and not self._has_pio:
            raise KvmUnavailableError("this kernel has no coalesced PIO (KVM_CAP_COALESCED_PIO)")
        if added:
            if zone.size >= 1 << 31:
                raise ValueError(f"{zone}: a zone of 2 GiB or more could never be unregistered "
                                 f"(the kernel compares its length as an int); split it")
            # The router knows the zone before the kernel does: its first
            # entry may be routed the moment the ioctl returns.
            self._install(pio, new)
            try:
                self._zone_ioctl(True, zone)
            except BaseException:
                self._install(pio, old)
                raise
            return
        # The kernel removes every zone containing *zone*; the router keeps
        # the old tables for what is in its ring, then the collateral zones
        # go back (see kvmcoal.registry).
        self._zone_ioctl(False, zone)
        self._install(pio, new)
        for z, t in old:
            if z.contains(zone.addr, zone.size) and any(z2 is z and t2 is t for z2, t2 in new):
                self._zone_ioctl(True, z)

    def _zone_ioctl(self, register: bool, zone: Zone) -> None:
        try:
            _abi.kvm_coalesced_zone(self.fileno(), register, zone.addr, zone.size, int(zone.pio))
        except OSError as exc:
            if register and exc.errno == errno.ENOSPC:   # the kernel's bus is full
                raise ZoneLimitError(zone.pio, ZONE_LIMIT) from None
            raise

    def _install(self, pio: bool, bus: BusOrder) -> None:
        buses = dict(self._buses)
        buses[pio] = bus
        if self._router is None:
            return
        self._router.install(*(_zone_bus._ZoneTable(
            [(z.addr, z.size, None if t is None else t._ring) for z, t in buses[p]])
            for p in (False, True)))
        if self._routing is None and any(t is not None for b in buses.values() for _, t in b):
            self._router.attach()
            self._routing = self._router
        if self._tracing:
            # A perf event's filter is set once: new events, for the same
            # threads, on a watcher stopped meanwhile (a zone change is rare).
            saved, self._buses = self._buses, buses
            try:
                self._retrace()
            finally:
                self._buses = saved

    # -- the router --

    def route(self) -> int:
        """Move the kernel ring's entries of buffer-bound zones into their buffers now.

        Returns how many entries a full buffer holds back in the kernel ring
        (they move once its consumer makes room).  Routing also happens by
        itself after every KVM_RUN, before every consumer call on
        :attr:`ring`, and on the watcher.
        """
        self._check()
        router = self._routing
        return router.route() if router is not None else 0

    def start_watcher(self, *, interval_us: int = 100, spin_us: int = 0,
                      wake: str = "timer") -> None:
        """Route on a thread of its own while the vCPUs run (no exit needed).

        The thread, in C, makes a routing pass every *interval_us*
        microseconds, sleeping between them, and with *spin_us* passes
        without sleeping for that long after one that moved entries: a
        buffer's poller learns of a doorbell write within about
        *interval_us* plus a thread wake-up.  Spinning pays only where a
        core is free for it: on a machine whose cores the guest and the
        consumers already use, it delays the very consumer it woke.

        ``wake="tracepoint"`` sleeps instead until a vCPU thread writes into
        a buffer's zone, which the kernel reports through its
        ``kvm:kvm_mmio`` and ``kvm:kvm_pio`` tracepoints (perf events, one
        pair per vCPU thread, filtered to the buffers' zones), with a pass
        every *interval_us* (at least 1 ms) as a safety net: the same
        latency as the timer for a fraction of its CPU.  It needs
        CAP_PERFMON or root (or kernel.perf_event_paranoid <= 1) and tracefs
        mounted.  docs/WAKEUPS.md has the measured latency and CPU cost of
        each.

        Needs a vCPU (the kernel ring is mapped through one).  Raises
        RuntimeError if already running.
        """
        for name, value in (("interval_us", interval_us), ("spin_us", spin_us)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__!r}")
        if not 1 <= interval_us <= 10**7 or not 0 <= spin_us <= 10**7:
            raise ValueError(f"interval_us must be 1..10**7 and spin_us 0..10**7 microseconds, "
                             f"got {interval_us} and {spin_us}")
        if wake not in ("timer", "tracepoint"):
            raise ValueError(f"wake must be 'timer' or 'tracepoint', not {wake!r}")
        with self._lock:
            if self._ring is None and not any(v._fd >= 0 for v in self._vcpus):
                self.fileno()
                raise ValueError("start_watcher() needs a vCPU: the kernel ring it routes is "
                                 "mapped through one; create one first")
            self.ring      # maps it, and makes the router
            router = self._router
            assert router is not None
            if router.watching:
                raise RuntimeError("the watcher is already running")
            if wake == "tracepoint":
                router.trace(*_tracepoint_ids())
                self._tracing = True
                try:
                    # This thread first: the permission check.  Then the
                    # threads running a vCPU now; later ones from their
                    # next KVM_RUN on.
                    self._trace_thread(threading.get_native_id())
                    for vcpu in self._vcpus:
                        if vcpu._tid:
                            self._trace_thread(vcpu._tid)
                except BaseException:
                    self._untrace()
                    raise
            self._watcher_args = (interval_us, spin_us)
            router.start_watcher(interval_us, spin_us)

    def stop_watcher(self) -> None:
        """Stop the watcher thread (and wait for it), at once whatever its
        interval.  Idempotent, from any thread."""
        with self._lock:
            router = self._router
            if router is not None and self._pid != -1:
                router.stop_watcher()
                self._untrace()

    def stats(self) -> dict[str, Any]:
        """Counters of this VM, as plain values (see :meth:`kvmcoal.EmulatedVm.stats`).

        The kernel keeps no counts of its own, so these are what this
        process saw: ``coalesced_writes``, the entries taken out of the
        kernel ring (by consumers, or routed into buffers or dropped by the
        router) plus those still in it; ``ring_full_refusals`` and
        ``exits`` (by ``KVM_EXIT_*`` name), summed over the vCPUs (see
        :meth:`Vcpu.stats`); ``flushes``, consumer calls that took entries
        from :attr:`ring`; ``ring``, its depth high-water mark as consumers
        saw it; ``router``, what the router moved, dropped and holds back
        (None until a zone is bound to a buffer).
        """
        ring = self._ring
        high = taken = passes = pending = 0
        if ring is not None:
            if not ring.released:
                pending = len(ring)    # first: a consumer's look raises the high-water mark
            high, taken, passes = ring._stats()
        router = self._router
        moved = dropped = 0
        routing = None
        if router is not None:
            moved, dropped = router.routed, router.dropped
            routing = {"routed": moved, "dropped": dropped, "held": router.held,
                       "watcher_passes": router.passes}
        exits: dict[str, int] = {}
        refusals = 0
        for vcpu in self._vcpus:
            vstats = vcpu.stats()
            refusals += vstats["ring_full_refusals"]
            for reason, n in vstats["exits_by_reason"].items():
                exits[reason] = exits.get(reason, 0) + n
        return {"coalesced_writes": taken + moved + dropped + pending,
                "ring_full_refusals": refusals, "exits": exits, "flushes": passes,
                "ring": {"depth_high_water": high, "entries_consumed": taken},
                "buffers": sum(1 for buf in self._buffers if not buf.closed),
                "router": routing}

    def _ring_or_none(self) -> Ring | None:
        """The kernel ring if it is mapped (a vCPU was created), else None: a Bus
        flushes it only then (before, no guest can have written it)."""
        return self.ring if self._ring is not None or self._pid == -1 else None

    def _trace_thread(self, tid: int) -> None:
        """Trace thread *tid*'s writes into buffers' zones (the tracepoint wake-up)."""
        with self._lock:
            router = self._router
            if not self._tracing or router is None or tid in router.traced():
                return
            try:
                router.trace_thread(tid, *self._trace_filters())
            except ProcessLookupError:
                return          # that thread has ended
            except PermissionError as exc:
                raise KvmUnavailableError(
                    f"the tracepoint wake-up needs CAP_PERFMON or root (kernel."
                    f"perf_event_paranoid is {_read_int('/proc/sys/kernel/perf_event_paranoid')}"
                    f"): perf_event_open says {exc.strerror}") from None

    def _retrace(self) -> None:
        router = self._router
        assert router is not None
        tids, running = router.traced(), router.watching
        interval_us, spin_us = self._watcher_args
        router.stop_watcher()
        self._untrace()
        router.trace(*_tracepoint_ids())
        self._tracing = True
        for tid in tids:
            self._trace_thread(tid)
        if running:
            router.start_watcher(interval_us, spin_us)

    def _untrace(self) -> None:
        if self._tracing and self._router is not None:
            self._router.untrace()
        self._tracing = False

    def _trace_filters(self) -> tuple[bytes, bytes]:
        """perf filters matching the writes into zones bound to buffers (none: nothing)."""
        def ranges(pio: bool, field: str) -> str:
            return " || ".join(f"({field} >= {z.addr} && {field} < {z.addr + z.size})"
                               for z, t in self._buses[pio] if t is not None and z.size)
        mmio, pio = ranges(False, "gpa"), ranges(True, "port")
        return (f"type == 2 && ({mmio})".encode() if mmio else b"type == 255",
                f"rw == 1 && ({pio})".encode() if pio else b"rw == 255")

    @property
    def watching(self) -> bool:
        """Whether the watcher thread runs."""
        router = self._router
        return router is not None and router.watching

    def create_vcpu(self) -> Vcpu:
        """A new vCPU with the next free id."""
        with self._lock:
            vcpu_id = self._next_vcpu_id
            # Taken before the ioctl: the kernel keeps an id it accepted, even if
            # what follows fails, and a retry with it would fail with EEXIST.
            self._next_vcpu_id += 1
            try:
                fd = _abi.kvm_ioctl(self.fileno(), "KVM_CREATE_VCPU", vcpu_id)
            except OSError as exc:   # refused: the id is still free
                self._next_vcpu_id = vcpu_id
                if exc.errno == errno.EINVAL:
                    raise KvmcoalError(
                        f"the kernel refuses vCPU id {vcpu_id}: this VM has as many vCPUs "
                        f"as it may (KVM_CAP_MAX_VCPUS)") from None
                raise
            vcpu = Vcpu(self, vcpu_id, fd)
            self._vcpus.append(vcpu)
            if self._ring is None and self._ring_page:
                self.ring       # mapped now: the router must see the first entry
        return vcpu

    @property
    def ring(self) -> Ring:
        """The VM-wide coalesced ring, mapped through a vCPU's fd (one per VM)."""
        ring = self._ring
        if ring is not None and self._pid != -1:
            return ring
        with self._lock:    # two vCPU threads asking at once must get the same Ring
            self.fileno()
            if self._pid == -1:
                raise BufferForkedError(
                    "this Vm was inherited across fork(): its ring is the parent's (a drain "
                    "here would take the parent guest's writes); use the VM in the process "
                    "that created it")
            if self._ring is None:
                if not self._ring_page:
                    raise KvmUnavailableError("this kernel has no coalesced MMIO ring")
                open_vcpus = [v for v in self._vcpus if v._fd >= 0]
                if not open_vcpus:
                    raise ValueError("the ring is mapped through a vCPU: create one first")
                self._ring_map = mmap.mmap(open_vcpus[0].fileno(), mmap.PAGESIZE,
                                           offset=self._ring_page * mmap.PAGESIZE)
                self._ring = Ring(self._ring_map)
                self._router = Router(self._ring)
                with self._zones_lock:
                    self._install(False, self._buses[False])
            return self._ring

    def close(self) -> None:
        """Release the ring, close every vCPU, the VM fd and guest memory.  Idempotent.

        Raises RuntimeError, closing nothing, while a vCPU is inside ``run()``
        or ``run_loop()`` on another thread, or when called from a handler
        that a drain of the VM's ring is calling (close it after the drain
        returns).  Guest memory that the caller still has views of stays
        mapped until the last view goes.
        """
        ring = self._ring
        if ring is not None and ring._consuming_here():
            raise RuntimeError("Vm.close() called from a handler of a drain of its ring: "
                               "close the VM after the drain returns")
        if any(buf._ring is not None and not buf.closed and buf._ring._consuming_here()
               for buf in list(self._buffers)):
            raise RuntimeError("Vm.close() called from a handler of a consumer call on one of "
                               "its buffers: close the VM after that call returns")
        buffers: list[CoalescedBuffer] = []
        with self._lock:
            claimed: list[Vcpu] = []
            try:
                for vcpu in self._vcpus:
                    vcpu._claim("close its Vm")
                    claimed.append(vcpu)
                # No vCPU runs: stop the watcher and the router, then the
                # buffers go (their zones go with the VM fd).
                router, self._routing = self._router, None
                if router is not None and self._pid != -1:
                    router.stop()
                    self._untrace()
                self._router = None
                with self._zones_lock:
                    buffers = list(self._buffers)
                    self._buses = {False: [], True: []}
                ring, self._ring = self._ring, None
                ring_map, self._ring_map = self._ring_map, None
                for vcpu in self._vcpus:
                    vcpu._close_claimed()
                self._vcpus.clear()
                fd, self._fd = self._fd, -1
                if fd >= 0:
                    os.close(fd)
                # No vCPU can run any more: unmapping guest memory is safe now.
                for _base, memory, pin in self._memory:
                    pin.release()
                    try:
                        memory.close()
                    except BufferError:
                        pass   # the caller's views keep it mapped; it goes with them
                self._memory.clear()
            finally:
                for vcpu in claimed:
                    vcpu._run_lock.release()
        # Outside the lock: release() waits for a drain in progress on another
        # thread, whose handlers may call into this VM (and find it closed);
        # so does a buffer's close().
        for buf in buffers:
            buf.close()
        if ring is not None:
            ring.release()
        if ring_map is not None:
            ring_map.close()

    def __repr__(self) -> str:
        if self._fd < 0:
            return "<Vm closed>"
        return f"<Vm fd={self._fd} vcpus={len(self._vcpus)} memory slots={len(self._memory)}>"
