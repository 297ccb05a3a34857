"""A small VMM on /dev/kvm: the kernel as the ring's producer.

On real KVM the kernel records coalesced writes in one ring per VM, which
userspace maps through a vCPU fd at page ``coalesced_mmio_page_offset``;
:attr:`Vm.ring` is a :class:`kvmcoal.Ring` over that page.  A VMM must drain
the ring after every ``KVM_RUN`` return and *before* it handles the exit, so
that the writes the guest made earlier reach the devices first.

>>> from kvmcoal import Zone
>>> from kvmcoal.kvm import Kvm, available
>>> if available():
...     with Kvm() as kvm, kvm.create_vm() as vm:
...         _ = vm.add_memory(0, 0x10000)
...         vcpu = vm.create_vcpu()
...         vm.register_coalesced_mmio(Zone(0xd0000, 0x1000))
...         type(vm.ring).__name__
... else:
...     'Ring'
'Ring'

The ioctl numbers and struct layouts come from ``<linux/kvm.h>`` through the
C extension (``kvmcoal._ring.KVM_ABI`` and its marshalling functions); none
is typed by hand here.
"""

from __future__ import annotations

import errno
import grp
import mmap
import operator
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, TypeVar

from . import _ring
from ._ring import KvmRunView
from .errors import KvmcoalError
from .zones import Zone

__all__ = [
    "DEVICE",
    "Exit",
    "GuestError",
    "ReadHandler",
    "WriteHandler",
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "IoExit",
    "Kvm",
    "KvmUnavailableError",
    "MmioExit",
    "OtherExit",
    "ShutdownExit",
    "Vcpu",
    "Vm",
    "available",
    "why_unavailable",
]

ABI: dict[str, int] = _ring.KVM_ABI
_Self = TypeVar("_Self", bound="_OwnsFd")
DEVICE = "/dev/kvm"
# Where real mode on Intel keeps its TSS; any unused guest-physical page range.
_TSS_ADDR = 0xFFFBD000


# x86 architectural bits (Intel SDM vol. 3), not part of the KVM ABI.
_CR0_PE = 1 << 0
_CR0_PG = 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME = 1 << 8
_EFER_LMA = 1 << 10
_PTE_PRESENT_RW = 0x3
_PTE_LARGE = 1 << 7
_FLAT_SEGMENT = {"base": 0, "limit": 0xFFFFFFFF, "present": 1, "dpl": 0, "db": 1, "s": 1,
                 "l": 0, "g": 1, "avl": 0, "unusable": 0}
_REAL_MODE_SEGMENT = {"limit": 0xFFFF, "present": 1, "dpl": 0, "db": 0, "s": 1, "l": 0, "g": 0,
                      "avl": 0, "unusable": 0}


def _le_bytes(value: int, size: int) -> bytes:
    """*value* as *size* little-endian bytes; the handler's excess high bits are dropped."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"the read handler must return an int, not {type(value).__name__!r}") \
            from None
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class KvmUnavailableError(KvmcoalError):
    """/dev/kvm cannot be used here; the message says why and what to do."""


def _open_kvm(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailableError(
            f"{path} does not exist: this host has no KVM (load the kvm_intel or "
            f"kvm_amd module, or enable nested virtualisation for this VM)") from None
    except PermissionError:
        raise KvmUnavailableError(f"permission denied opening {path}: "
                                  f"{_how_to_get_access(path)}") from None
    except OSError as exc:
        raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None


def _how_to_get_access(path: str) -> str:
    """What a user who may not open *path* can do about it, from its owner and mode."""
    try:
        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        group = None
    if group is not None and group != "root" and st.st_mode & stat.S_IRWXG:
        return (f"add this user to its group {group!r} (sudo usermod -aG {group} $USER, "
                f"then log in again)")
    mode = f"{stat.S_IMODE(st.st_mode):o}" if group is not None else "?"
    return (f"it is owned by group {group or '?'} with mode {mode}, so only root may open it; "
            f"run as root, or give it a kvm group (sudo groupadd -f kvm; sudo chgrp kvm "
            f"{path}; sudo chmod 660 {path}; sudo usermod -aG kvm $USER, then log in again)")


def why_unavailable(path: str = DEVICE) -> str | None:
    """None if *path* is a usable KVM device, else the reason it is not."""
    try:
        Kvm(path).close()
    except KvmUnavailableError as exc:
        return str(exc)
    return None


def available(path: str = DEVICE) -> bool:
    """True if /dev/kvm can be opened and speaks the expected API."""
    return why_unavailable(path) is None


@dataclass(frozen=True)
class Exit:
    """Base of the typed results of :meth:`Vcpu.run`."""


@dataclass(frozen=True)
class MmioExit(Exit):
    """KVM_EXIT_MMIO: an access to guest-physical memory no slot backs."""

    phys_addr: int
    data: bytes
    is_write: bool

    @property
    def len(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class IoExit(Exit):
    """KVM_EXIT_IO: ``count`` port accesses of ``size`` bytes (data for OUT)."""

    port: int
    size: int
    count: int
    is_out: bool
    data: bytes


@dataclass(frozen=True)
class HltExit(Exit):
    """KVM_EXIT_HLT: the guest executed HLT."""


@dataclass(frozen=True)
class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: triple fault or similar; the vCPU cannot go on."""


@dataclass(frozen=True)
class FailEntryExit(Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True)
class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR, e.g. an instruction KVM could not emulate."""

    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True)
class OtherExit(Exit):
    """Any other exit reason, by number."""

    reason: int


WriteHandler = Callable[[int, bytes, bool], object]
"""``write(addr, data, pio)``: a guest write of ``len(data)`` bytes (little-endian)."""
ReadHandler = Callable[[int, int, bool], int]
"""``read(addr, size, pio) -> value``: answer a guest MMIO load or ``in``."""


class GuestError(KvmcoalError):
    """The guest stopped in a way the run loop cannot continue from.

    ``exit`` is the exit that ended it (shutdown, failed entry, internal
    error or an exit reason the loop does not handle).
    """

    def __init__(self, exit: Exit) -> None:
        super().__init__(f"the guest stopped: {exit}")
        self.exit = exit


class _OwnsFd:
    """Context manager use, and a close (with a ResourceWarning) when dropped open."""

    _fd = -1

    def close(self) -> None:
        raise NotImplementedError

    def _close_when_collected(self) -> None:
        self.close()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd >= 0:
            what = repr(self)
            # Closed before the warning: with warnings as errors it raises.
            self._close_when_collected()
            warnings.warn(f"unclosed {what}", ResourceWarning, source=self)


class Kvm(_OwnsFd):
    """An open /dev/kvm: capabilities and VM creation."""

    def __init__(self, path: str = DEVICE) -> None:
        self.path = path
        self._fd = _open_kvm(path)
        try:
            try:
                version = _ring.kvm_ioctl(self._fd, "KVM_GET_API_VERSION", 0)
            except OSError as exc:   # ENOTTY: a file or another device at that path
                raise KvmUnavailableError(
                    f"{path} is not a KVM device ({exc.strerror})") \
                    from None
            if version != ABI["KVM_API_VERSION"]:
                raise KvmUnavailableError(
                    f"{path} speaks KVM API version {version}, "
                    f"kvmcoal needs {ABI['KVM_API_VERSION']}")
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self.api_version: int = version

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("operation on a closed Kvm")
        return self._fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if *cap* is absent, else a cap-specific value."""
        return _ring.kvm_ioctl(self.fileno(), "KVM_CHECK_EXTENSION", cap)

    @property
    def coalesced_mmio_page_offset(self) -> int:
        """Page of the vCPU mapping that holds the ring (0: no coalesced MMIO)."""
        return self.check_extension(ABI["KVM_CAP_COALESCED_MMIO"])

    @property
    def has_coalesced_pio(self) -> bool:
        """Whether zones may be port I/O ranges (KVM_CAP_COALESCED_PIO)."""
        return self.check_extension(ABI["KVM_CAP_COALESCED_PIO"]) > 0

    @property
    def vcpu_mmap_size(self) -> int:
        """Bytes of a vCPU mapping: kvm_run, the PIO data page, the ring page, ..."""
        return _ring.kvm_ioctl(self.fileno(), "KVM_GET_VCPU_MMAP_SIZE", 0)

    def create_vm(self) -> Vm:
        """A new, empty VM.  It needs nothing more from this Kvm: closing it is fine."""
        return Vm(self)

    def close(self) -> None:
        """Close /dev/kvm.  Idempotent; VMs made from it live on."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"<Kvm {self.path} {'closed' if self._fd < 0 else f'fd={self._fd}'}>"


class Vm(_OwnsFd):
    """A VM: guest memory, coalesced zones, vCPUs and the kernel's ring.

    Thread-safe: vCPUs run on any threads; ``close()`` refuses while one
    is running (a guest must never write into memory that is unmapped).
    """

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        # The capabilities are read once: a VM does not need its Kvm open.
        self._ring_page = kvm.coalesced_mmio_page_offset
        self._has_pio = kvm.has_coalesced_pio
        self._vcpu_mmap_size = kvm.vcpu_mmap_size
        fd = _ring.kvm_ioctl(kvm.fileno(), "KVM_CREATE_VM", 0)
        try:
            os.set_inheritable(fd, False)
            if kvm.check_extension(ABI["KVM_CAP_SET_TSS_ADDR"]):
                _ring.kvm_ioctl(fd, "KVM_SET_TSS_ADDR", _TSS_ADDR)
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
        self._ring: _ring.Ring | None = None
        self._ring_map: mmap.mmap | None = None
        # The ring's creation, vCPU creation and closing, memory, close().  Re-entrant:
        # a signal handler may close the VM in the middle of any of them.
        self._lock = threading.RLock()

    def fileno(self) -> int:
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
                _ring.kvm_set_user_memory_region(fd, len(self._memory), guest_phys_addr, memory)
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

    def register_coalesced_mmio(self, zone: Zone) -> None:
        """KVM_REGISTER_COALESCED_MMIO: the kernel coalesces guest writes in *zone*."""
        self._zone_ioctl(True, zone)

    def unregister_coalesced_mmio(self, zone: Zone) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO: remove every same-kind zone containing *zone*."""
        self._zone_ioctl(False, zone)

    def _zone_ioctl(self, register: bool, zone: Zone) -> None:
        if not isinstance(zone, Zone):
            raise TypeError(f"zone must be a kvmcoal.Zone, not {type(zone).__name__!r}")
        if not self._ring_page:
            raise KvmUnavailableError("this kernel has no coalesced MMIO (KVM_CAP_COALESCED_MMIO)")
        if zone.pio and not self._has_pio:
            raise KvmUnavailableError("this kernel has no coalesced PIO (KVM_CAP_COALESCED_PIO)")
        _ring.kvm_coalesced_zone(self.fileno(), register, zone.addr, zone.size, int(zone.pio))

    def create_vcpu(self) -> Vcpu:
        """A new vCPU with the next free id."""
        with self._lock:
            vcpu_id = self._next_vcpu_id
            # Taken before the ioctl: the kernel keeps an id it accepted, even if
            # what follows fails, and a retry with it would fail with EEXIST.
            self._next_vcpu_id += 1
            try:
                fd = _ring.kvm_ioctl(self.fileno(), "KVM_CREATE_VCPU", vcpu_id)
            except OSError as exc:   # refused: the id is still free
                self._next_vcpu_id = vcpu_id
                if exc.errno == errno.EINVAL:
                    raise KvmcoalError(
                        f"the kernel refuses vCPU id {vcpu_id}: this VM has as many vCPUs "
                        f"as it may (KVM_CAP_MAX_VCPUS)") from None
                raise
            vcpu = Vcpu(self, vcpu_id, fd)
            self._vcpus.append(vcpu)
        return vcpu

    @property
    def ring(self) -> _ring.Ring:
        """The VM-wide coalesced ring, mapped through a vCPU's fd (one per VM)."""
        ring = self._ring
        if ring is not None:
            return ring
        with self._lock:    # two vCPU threads asking at once must get the same Ring
            self.fileno()
            if self._ring is None:
                if not self._ring_page:
                    raise KvmUnavailableError("this kernel has no coalesced MMIO ring")
                open_vcpus = [v for v in self._vcpus if v._fd >= 0]
                if not open_vcpus:
                    raise ValueError("the ring is mapped through a vCPU: create one first")
                self._ring_map = mmap.mmap(open_vcpus[0].fileno(), mmap.PAGESIZE,
                                           offset=self._ring_page * mmap.PAGESIZE)
                self._ring = _ring.Ring(self._ring_map)
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
        with self._lock:
            claimed: list[Vcpu] = []
            try:
                for vcpu in self._vcpus:
                    vcpu._claim("close its Vm")
                    claimed.append(vcpu)
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
        # thread, whose handlers may call into this VM (and find it closed).
        if ring is not None:
            ring.release()
        if ring_map is not None:
            ring_map.close()

    def __repr__(self) -> str:
        if self._fd < 0:
            return "<Vm closed>"
        return f"<Vm fd={self._fd} vcpus={len(self._vcpus)} memory slots={len(self._memory)}>"


class Vcpu(_OwnsFd):
    """A vCPU: registers, KVM_RUN and its typed exits.  Made by :meth:`Vm.create_vcpu`.

    One thread at a time may be in :meth:`run` or :meth:`run_loop`; another
    thread's call raises RuntimeError, and so does :meth:`close` from
    another thread while it runs.
    """

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self._fd = fd
        try:
            os.set_inheritable(fd, False)
            self._map = mmap.mmap(fd, vm._vcpu_mmap_size)
            try:
                self._run = KvmRunView(self._map)
            except BaseException:
                self._map.close()
                raise
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        # Held by the thread in run()/run_loop(); re-entrant, so a handler
        # (or a signal handler) on that thread may still close this vCPU.
        self._run_lock = threading.RLock()
        self._in_loop = False    # run_loop() is running, on the thread holding the lock

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("operation on a closed Vcpu")
        return self._fd

    def _claim(self, what: str) -> None:
        if not self._run_lock.acquire(blocking=False):
            raise RuntimeError(f"vCPU {self.id} is running in another thread: cannot {what} "
                               f"until its run() or run_loop() returns")

    def get_regs(self) -> dict[str, int]:
        return _ring.kvm_get_regs(self.fileno())

    def set_regs(self, **regs: int) -> None:
        """Change the named general-purpose registers (rax, ..., rip, rflags)."""
        _ring.kvm_set_regs(self.fileno(), regs)

    def get_sregs(self) -> dict[str, Any]:
        return _ring.kvm_get_sregs(self.fileno())

    def set_sregs(self, changes: dict[str, Any]) -> None:
        """Change special registers; segments field by field (see kvm_set_sregs)."""
        _ring.kvm_set_sregs(self.fileno(), changes)

    def _mode_registers(self, segments: dict[str, dict[str, int]], *, cr0_set: int = 0,
                        cr4_set: int = 0, efer: int = 0, **more: int) -> None:
        """Set every segment, and CR0/CR4/EFER from scratch for the mode, whatever it was."""
        sregs = self.get_sregs()
        self.set_sregs({**segments,
                        "cr0": (sregs["cr0"] & ~(_CR0_PE | _CR0_PG)) | cr0_set,
                        "cr4": (sregs["cr4"] & ~_CR4_PAE) | cr4_set,
                        "efer": efer, **more})

    def setup_real_mode(self, ip: int, *, segments: dict[str, int] | None = None,
                        **regs: int) -> None:
        """Start in 16-bit real mode at cs=0, ip=*ip*, from whatever mode it was in.

        *segments* maps segment names ("ds", "es", ...) to selectors (base =
        selector * 16); *regs* sets general-purpose registers.
        """
        selectors = {"cs": 0, "ds": 0, "es": 0, "fs": 0, "gs": 0, "ss": 0}
        selectors.update(segments or {})
        self._mode_registers({name: dict(_REAL_MODE_SEGMENT, selector=sel, base=sel * 16,
                                         type=0xB if name == "cs" else 0x3)
                              for name, sel in selectors.items()})
        self.set_regs(rip=ip, rflags=0x2, **regs)

    def setup_protected_mode(self, ip: int, **regs: int) -> None:
        """Start in 32-bit flat protected mode at eip=*ip*: 4 GiB segments, no paging."""
        code = dict(_FLAT_SEGMENT, selector=0x08, type=0xB)
        data = dict(_FLAT_SEGMENT, selector=0x10, type=0x3)
        self._mode_registers({"cs": code, "ds": data, "es": data, "fs": data, "gs": data,
                              "ss": data}, cr0_set=_CR0_PE)
        self.set_regs(rip=ip, rflags=0x2, **regs)

    def setup_long_mode(self, ip: int, *, page_tables: int = 0x8000, **regs: int) -> None:
        """Start in 64-bit mode at rip=*ip*, the first 1 GiB identity-mapped.

        Writes three pages of page tables into guest memory at *page_tables*
        (2 MiB pages).  Needed for 8-byte stores: KVM's emulator does not
        emulate MMX/SSE stores to MMIO, so a plain ``mov %rax, (%rdi)`` is
        the only 8-byte MMIO write, and it needs long mode.
        """
        pml4, pdpt, pd = page_tables, page_tables + 0x1000, page_tables + 0x2000
        tables = self.vm.memory(page_tables, 0x3000).cast("Q")
        tables[0] = pdpt | _PTE_PRESENT_RW
        tables[512] = pd | _PTE_PRESENT_RW
        for i in range(512):
            tables[1024 + i] = (i << 21) | _PTE_PRESENT_RW | _PTE_LARGE
        tables.release()
        code = dict(_FLAT_SEGMENT, selector=0x08, type=0xB, db=0, l=1)
        data = dict(_FLAT_SEGMENT, selector=0x10, type=0x3)
        self._mode_registers({"cs": code, "ds": data, "es": data, "fs": data, "gs": data,
                              "ss": data}, cr0_set=_CR0_PE | _CR0_PG, cr4_set=_CR4_PAE,
                             efer=_EFER_LME | _EFER_LMA, cr3=pml4)
        self.set_regs(rip=ip, rflags=0x2, **regs)

    @property
    def exit_count(self) -> int:
        """KVM_RUN returns so far: each one an exit to userspace."""
        return self._run.exits

    def run(self) -> Exit:
        """Enter the guest until it exits to userspace; return the exit.

        The caller handles the exit (``complete_mmio_read``, ``complete_io_in``
        for reads) before the next ``run()``.  An exit that ``run_loop`` left
        undelivered (a handler raised) is returned first, without entering
        the guest, whole.  A signal that interrupts KVM_RUN runs its Python
        handler and the vCPU is entered again, unless the handler raised (or
        closed the vCPU).  Raises RuntimeError if another thread is running
        this vCPU, or if called from a ``run_loop`` handler of this vCPU.
        """
        self._claim("run it")
        try:
            if self._in_loop:
                raise RuntimeError(f"vCPU {self.id}: run() called from a run_loop() handler")
            exit_ = self._enter()
            # If an exception lands before this line, the exit stays pending and
            # the next run() returns it again: repeated, never lost.
            self._run.delivered()
            return exit_
        finally:
            self._run_lock.release()

    def _enter(self) -> Exit:
        """The exit kvm_run holds: a pending one, else a new one from KVM_RUN.

        The caller holds ``_run_lock``.
        """
        # fileno() each time round: a signal handler may have closed the vCPU.
        while not self._run.enter(self.fileno()):
            pass
        return self._decode_exit()

    def run_loop(self, write: WriteHandler, read: ReadHandler, *,
                 drain: Callable[[], object] | None = None) -> HltExit:
        """Run the guest until it halts, delivering every access.

        Writes, from the ring and from exits, go to ``write(addr, data, pio)``
        in guest order; MMIO loads and ``in`` are answered by
        ``read(addr, size, pio)``, which returns an int.  After **every**
        KVM_RUN return the VM's ring is drained into *write* *before* the
        exit is handled, so a write that exited, and any read, comes after
        all the writes the guest made earlier.  Several vCPUs may run their
        loops on several threads: the ring's consumer lock makes each drain
        deliver its entries exactly once, in ring order, and a vCPU's drain
        waits for one in progress.  *drain*, if given, replaces the default
        drain (``ring.consume(write)``) after every KVM_RUN: a Bus passes
        its flush, which drains its other rings too.  Raises GuestError for
        an exit it cannot continue from.

        If a handler raises, the exception propagates and nothing is lost
        or repeated: a write handed to ``write`` counts as delivered (as in
        ``Ring.consume``); the rest of the ring stays in it; an exit not yet
        fully delivered (a read not yet answered, the writes of an ``out``
        not yet handed over) is kept, and the next ``run_loop`` call drains
        the ring and finishes it before it enters the guest again.  The
        state of that exit lives in C, set in the same call as KVM_RUN's
        return, so an exception from a signal handler cannot lose it
        either; one landing between a handler's return and the bookkeeping
        after it can repeat or drop that one access.
        """
        self._claim("run it")
        try:
            if self._in_loop:
                raise RuntimeError(f"vCPU {self.id}: run_loop() called from its own handler")
            self._in_loop = True
            try:
                return self._loop(write, read, drain)
            finally:
                self._in_loop = False
        finally:
            self._run_lock.release()

    def _loop(self, write: WriteHandler, read: ReadHandler,
              drain: Callable[[], object] | None) -> HltExit:
        if drain is None and self.vm._ring_page:
            ring = self.vm.ring

            def drain() -> object:
                return ring.consume(write)
        run = self._run
        while True:
            exit_ = self._enter()        # a pending, maybe partly delivered, exit first
            if drain is not None:
                drain()
            if isinstance(exit_, MmioExit):
                if exit_.is_write:
                    run.delivered()              # handed over: delivered, even if write raises
                    write(exit_.phys_addr, exit_.data, False)
                else:
                    self.complete_mmio_read(
                        _le_bytes(read(exit_.phys_addr, exit_.len, False), exit_.len))
                    run.delivered()
            elif isinstance(exit_, IoExit):
                size, count = exit_.size, exit_.count
                if exit_.is_out and count == 1:    # the common case, kept short
                    run.delivered()
                    write(exit_.port, exit_.data, True)
                elif exit_.is_out:
                    while run.progress < count:
                        i = run.progress * size
                        run.progress += 1
                        if run.progress == count:
                            run.delivered()
                        write(exit_.port, exit_.data[i:i + size], True)
                    run.delivered()              # (count 0: nothing to hand over)
                else:
                    offset = run.io()[4]
                    while run.progress < count:
                        # Each value goes into kvm_run as it is read: a read
                        # that raised later does not ask the earlier ones again.
                        value = _le_bytes(read(exit_.port, size, True), size)
                        at = offset + run.progress * size
                        self._map[at:at + size] = value
                        run.progress += 1
                    run.delivered()
            elif isinstance(exit_, HltExit):
                run.delivered()
                return exit_
            else:
                run.delivered()
                raise GuestError(exit_)

    def _decode_exit(self) -> Exit:
        run = self._run
        reason = run.exit_reason
        if reason == ABI["KVM_EXIT_MMIO"]:
            phys_addr, data, is_write = run.mmio()
            return MmioExit(phys_addr, data, is_write)
        if reason == ABI["KVM_EXIT_IO"]:
            direction, size, port, count, offset = run.io()
            is_out = direction == ABI["KVM_EXIT_IO_OUT"]
            data = self._map[offset:offset + size * count] if is_out else b""
            return IoExit(port, size, count, is_out, data)
        if reason == ABI["KVM_EXIT_HLT"]:
            return HltExit()
        if reason == ABI["KVM_EXIT_SHUTDOWN"]:
            return ShutdownExit()
        if reason == ABI["KVM_EXIT_FAIL_ENTRY"]:
            return FailEntryExit(*run.fail_entry())
        if reason == ABI["KVM_EXIT_INTERNAL_ERROR"]:
            return InternalErrorExit(*run.internal())
        return OtherExit(reason)

    def complete_mmio_read(self, data: bytes) -> None:
        """Give the value of the MMIO read the last exit asked for."""
        self.fileno()
        if self._run.exit_reason != ABI["KVM_EXIT_MMIO"]:
            raise ValueError("the last exit was not MMIO")
        self._run.set_mmio_data(data)

    def complete_io_in(self, data: bytes) -> None:
        """Give the bytes of the IN the last exit asked for (size * count)."""
        self.fileno()
        if self._run.exit_reason != ABI["KVM_EXIT_IO"]:
            raise ValueError("the last exit was not port I/O")
        direction, size, _port, count, offset = self._run.io()
        if direction != ABI["KVM_EXIT_IO_IN"]:
            raise ValueError("the last exit was an OUT, not an IN")
        if len(data) != size * count:
            raise ValueError(f"the pending IN takes {size * count} bytes, got {len(data)}")
        self._map[offset:offset + len(data)] = data

    def close(self) -> None:
        """Close the vCPU and its kvm_run mapping.  Idempotent.

        Raises RuntimeError while another thread is in :meth:`run` or
        :meth:`run_loop`; a handler on the running thread may close it.
        """
        with self.vm._lock:    # not while Vm.ring maps the ring through this fd
            self._claim("close it")
            try:
                self._close_claimed()
            finally:
                self._run_lock.release()

    def _close_when_collected(self) -> None:
        self._close_claimed()    # nothing can be running it: no thread holds it

    def _close_claimed(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._run.release()
            self._map.close()
            os.close(fd)

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} {'closed' if self._fd < 0 else f'fd={self._fd}'}>"
