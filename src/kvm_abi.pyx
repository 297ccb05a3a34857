# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The /dev/kvm ABI, marshalled through the structs of <linux/kvm.h> (kvmcoal.kvm._abi).

The ioctl numbers and struct layouts come from the system header through
src/linux_kvm.pxd; none is typed by hand.  kvmcoal.kvm builds the VMM (its
system, VM and vCPU modules) on these functions.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.buffer cimport PyBuffer_Release
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno, EINTR
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

import os as _os

from kvmcoal._ring cimport _get_buffer
from kvmcoal.kvm._router cimport Router
from kvmcoal.errors import KvmcoalError
from linux_kvm cimport *

# The numbers kvmcoal.kvm reads, by name.
KVM_ABI = {
    "KVM_API_VERSION": KVM_API_VERSION,
    "KVM_GET_API_VERSION": KVM_GET_API_VERSION,
    "KVM_CREATE_VM": KVM_CREATE_VM,
    "KVM_CHECK_EXTENSION": KVM_CHECK_EXTENSION,
    "KVM_GET_VCPU_MMAP_SIZE": KVM_GET_VCPU_MMAP_SIZE,
    "KVM_CREATE_VCPU": KVM_CREATE_VCPU,
    "KVM_SET_TSS_ADDR": KVM_SET_TSS_ADDR,
    "KVM_CAP_COALESCED_MMIO": KVM_CAP_COALESCED_MMIO,
    "KVM_CAP_COALESCED_PIO": KVM_CAP_COALESCED_PIO,
    "KVM_CAP_SET_TSS_ADDR": KVM_CAP_SET_TSS_ADDR,
    "KVM_EXIT_IO": KVM_EXIT_IO,
    "KVM_EXIT_HLT": KVM_EXIT_HLT,
    "KVM_EXIT_MMIO": KVM_EXIT_MMIO,
    "KVM_EXIT_SHUTDOWN": KVM_EXIT_SHUTDOWN,
    "KVM_EXIT_FAIL_ENTRY": KVM_EXIT_FAIL_ENTRY,
    "KVM_EXIT_INTERNAL_ERROR": KVM_EXIT_INTERNAL_ERROR,
    "KVM_EXIT_IO_IN": KVM_EXIT_IO_IN,
    "KVM_EXIT_IO_OUT": KVM_EXIT_IO_OUT,
}


cdef int _kvm_check(int rc, str what) except -1:
    if rc < 0:
        err = errno
        raise OSError(err, f"{what}: {_os.strerror(err)}")
    return rc


def kvm_coalesced_zone(int vmfd, bint register, addr, size, pio):
    """KVM_(UN)REGISTER_COALESCED_MMIO for the zone (addr, size, pio)."""
    cdef kvm_coalesced_mmio_zone zone
    zone.addr = addr
    zone.size = size
    zone.pio = pio
    cdef unsigned long request = (KVM_REGISTER_COALESCED_MMIO if register
                                  else KVM_UNREGISTER_COALESCED_MMIO)
    _kvm_check(ioctl(vmfd, request, &zone),
               "KVM_REGISTER_COALESCED_MMIO" if register else "KVM_UNREGISTER_COALESCED_MMIO")


def kvm_set_user_memory_region(int vmfd, uint32_t slot, uint64_t guest_phys_addr,
                               memory, uint32_t flags=0):
    """Back guest memory at guest_phys_addr with the writable buffer *memory*.

    The caller must keep *memory* alive and mapped while the VM may use it.
    """
    cdef Py_buffer view
    cdef kvm_userspace_memory_region region
    _get_buffer(memory, &view, "guest memory")
    region.slot = slot
    region.flags = flags
    region.guest_phys_addr = guest_phys_addr
    region.memory_size = view.len
    region.userspace_addr = <uint64_t><size_t>view.buf
    PyBuffer_Release(&view)
    _kvm_check(ioctl(vmfd, KVM_SET_USER_MEMORY_REGION, &region),
               "KVM_SET_USER_MEMORY_REGION")


def kvm_get_regs(int vcpufd):
    """KVM_GET_REGS as a dict of the general-purpose registers, rip and rflags."""
    cdef kvm_regs regs
    _kvm_check(ioctl(vcpufd, KVM_GET_REGS, &regs), "KVM_GET_REGS")
    return regs


def kvm_set_regs(int vcpufd, changes):
    """KVM_SET_REGS: the current registers with the given ones changed."""
    current = kvm_get_regs(vcpufd)
    unknown = set(changes) - set(current)
    if unknown:
        raise ValueError(f"unknown register(s): {', '.join(sorted(unknown))}")
    current.update(changes)
    cdef kvm_regs regs = current
    _kvm_check(ioctl(vcpufd, KVM_SET_REGS, &regs), "KVM_SET_REGS")


def kvm_get_sregs(int vcpufd):
    """KVM_GET_SREGS as a dict; segments and descriptor tables are nested dicts."""
    cdef kvm_sregs sregs
    _kvm_check(ioctl(vcpufd, KVM_GET_SREGS, &sregs), "KVM_GET_SREGS")
    return sregs


def kvm_set_sregs(int vcpufd, changes):
    """KVM_SET_SREGS: the current special registers with the given fields changed.

    A segment or table is changed field by field: ``{"cs": {"base": 0}}``
    keeps the other fields of cs as they are.
    """
    cdef kvm_sregs sregs
    _kvm_check(ioctl(vcpufd, KVM_GET_SREGS, &sregs), "KVM_GET_SREGS")
    current = <dict>sregs
    for name, value in changes.items():
        if name not in current:
            raise ValueError(f"unknown special register {name!r}")
        if isinstance(current[name], dict):
            unknown = set(value) - set(current[name])
            if unknown:
                raise ValueError(f"unknown field(s) of {name}: {', '.join(sorted(unknown))}")
            current[name].update(value)
        else:
            current[name] = value
    sregs = current
    _kvm_check(ioctl(vcpufd, KVM_SET_SREGS, &sregs), "KVM_SET_SREGS")


@cython.final
cdef class KvmRunView:
    """Typed access to a vCPU's ``struct kvm_run`` in its mapping (offset 0)."""

    cdef Py_buffer _view
    cdef kvm_run *_run
    cdef bint _live
    # Whether kvm_run holds an exit not yet fully delivered, and how many of
    # its accesses (a string I/O's count) are.  Kept here, set by enter()
    # in the same C call as KVM_RUN's return: no Python code, so no
    # exception from a signal handler, runs between the two.
    cdef bint _pending
    cdef Py_ssize_t _progress
    cdef unsigned long long _exits
    # Exits by KVM_EXIT_* reason (the last slot counts every reason past it).
    cdef unsigned long long _by_reason[64]

    def __init__(self, mapping):
        _get_buffer(mapping, &self._view, "KvmRunView")
        if <size_t>self._view.len < sizeof(kvm_run):
            PyBuffer_Release(&self._view)
            raise ValueError(f"a vCPU mapping of {self._view.len} bytes cannot hold "
                             f"struct kvm_run ({sizeof(kvm_run)} bytes)")
        self._run = <kvm_run *>self._view.buf
        self._live = True

    def __dealloc__(self):
        if self._live:
            PyBuffer_Release(&self._view)

    def release(self):
        if self._live:
            self._live = False
            PyBuffer_Release(&self._view)

    def enter(self, int vcpufd, Router router=None):
        """KVM_RUN on *vcpufd*, without the GIL, unless an exit is still pending.

        True when kvm_run holds an exit to deliver: the pending one, or a
        new one (``pending`` is then set and ``progress`` reset in this same
        call).  False when a signal interrupted KVM_RUN before any exit;
        Python signal handlers have run, and one that raised propagates.
        With a *router*, the kernel ring is routed after KVM_RUN returns,
        still without the GIL, before the exit is handed back.
        """
        cdef int rc, err
        self._get()
        if self._pending:
            return True
        with nogil:
            rc = ioctl(vcpufd, KVM_RUN, 0)
            err = errno
            if router is not None:
                router.route_nogil()
        if router is not None:
            router.check()
        if rc < 0 and err == EINTR:
            PyErr_CheckSignals()
            return False
        if rc < 0:
            raise OSError(err, f"KVM_RUN: {_os.strerror(err)}")
        self._pending = True
        self._progress = 0
        self._exits += 1
        self._by_reason[self._run.exit_reason if self._run.exit_reason < 63 else 63] += 1
        return True

    def exits_by_reason(self):
        """{KVM_EXIT_* number: exits} for every reason seen (63: that or later)."""
        return {reason: <object>self._by_reason[reason] for reason in range(64)
                if self._by_reason[reason]}

    def delivered(self):
        """The pending exit is fully delivered: the next enter() runs the vCPU."""
        self._pending = False

    @property
    def pending(self):
        """Whether kvm_run holds an exit that enter() returned and nobody delivered."""
        return self._pending

    @property
    def progress(self):
        """Accesses of the pending exit delivered so far (string I/O has several)."""
        return self._progress

    @progress.setter
    def progress(self, Py_ssize_t value):
        if value < 0:
            raise ValueError(f"progress must be >= 0, got {value}")
        self._progress = value

    @property
    def exits(self):
        """KVM_RUN returns with an exit, over this view's life."""
        return self._exits

    cdef inline kvm_run *_get(self) except NULL:
        if not self._live:
            raise ValueError("operation on a released KvmRunView")
        return self._run

    @property
    def exit_reason(self):
        return self._get().exit_reason

    def mmio(self):
        """(phys_addr, data, is_write) of a KVM_EXIT_MMIO; data has len bytes."""
        cdef kvm_run *run = self._get()
        cdef uint32_t n = run.mmio.len
        if n > 8:
            raise KvmcoalError(f"kvm_run.mmio.len={n} is larger than its 8-byte buffer")
        return (run.mmio.phys_addr,
                PyBytes_FromStringAndSize(<const char *>run.mmio.data, n),
                run.mmio.is_write != 0)

    def set_mmio_data(self, data):
        """Answer a KVM_EXIT_MMIO read with *data* (its len bytes)."""
        cdef kvm_run *run = self._get()
        cdef const unsigned char[:] src = data
        if <uint32_t>src.shape[0] != run.mmio.len or run.mmio.len > 8:
            raise ValueError(f"an MMIO read of {run.mmio.len} bytes needs "
                             f"{run.mmio.len} bytes of data, got {src.shape[0]}")
        if src.shape[0]:
            memcpy(run.mmio.data, &src[0], src.shape[0])

    def io(self):
        """(direction, size, port, count, data_offset) of a KVM_EXIT_IO.

        data_offset is checked to lie inside the mapping with size * count bytes.
        """
        cdef kvm_run *run = self._get()
        cdef uint64_t end = run.io.data_offset + <uint64_t>run.io.size * run.io.count
        if end < run.io.data_offset or end > <uint64_t>self._view.len:
            raise KvmcoalError(f"kvm_run.io data at {run.io.data_offset} "
                               f"({run.io.size} x {run.io.count} bytes) lies outside "
                               f"the {self._view.len}-byte vCPU mapping")
        return (run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset)

    def fail_entry(self):
        """(hardware_entry_failure_reason, cpu) of a KVM_EXIT_FAIL_ENTRY."""
        cdef kvm_run *run = self._get()
        return (run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)

    def internal(self):
        """(suberror, data words) of a KVM_EXIT_INTERNAL_ERROR."""
        cdef kvm_run *run = self._get()
        cdef uint32_t n = min(run.internal.ndata, 16)
        return (run.internal.suberror, tuple(run.internal.data[i] for i in range(n)))


def kvm_ioctl(int fd, str name, unsigned long arg=0):
    """Issue the argument-by-value ioctl *name* (a key of KVM_ABI) on *fd*."""
    cdef unsigned long request
    try:
        request = KVM_ABI[name]
    except KeyError:
        raise ValueError(f"unknown KVM ioctl {name!r}") from None
    return _kvm_check(ioctl(fd, request, arg), name)
