# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The emulated kernel's zone bus, in C (kvmcoal._zone_bus).

The producer side of kvmcoal.EmulatedVm: the part of a vCPU's write that
runs on every store.  EmulatedVm keeps the zones and buffers and hands this
layer tables in the kernel's bus order; a write finds its zone here with
the kernel's walk (src/io_bus.h) and pushes into that
zone's Ring through the C interface kvmcoal/_ring.pxd declares.
"""

cimport cython
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, uint32_t, uint64_t

from kvmcoal._ring cimport (Ring, kc_entry, KC_PUSH_OK, _as_u64, check_wake,
                            _fill_entry)

cdef extern from "grace.h" nogil:
    ctypedef struct kc_grace:
        int epoch
        int writers[2]
    int kc_grace_enter(kc_grace *g)
    void kc_grace_exit(kc_grace *g, int idx)
    int kc_grace_flip(kc_grace *g)
    int kc_grace_done(kc_grace *g, int old)

cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef int _fill_ranges(kc_bus_range *out, tuple checked) except -1:
    cdef Py_ssize_t i
    for i, (addr, size, ring) in enumerate(checked):
        if size > 0xFFFFFFFF:
            raise ValueError(f"zone size {size:#x} does not fit the ABI's u32")
        out[i].addr = addr
        out[i].size = size
        out[i].len = <int32_t><uint32_t>size   # the kernel's (int)zone->size
        out[i].target = <void *>ring if ring is not None else NULL
    return 0


cdef class _ZoneTable:
    """An immutable snapshot of one bus's zones, in the kernel's bus order.

    Writers (and the router) keep the one they started with.  A zone's
    target is a Ring, or None (the router's "stays in the kernel ring").
    """

    def __cinit__(self, list entries):
        cdef Py_ssize_t i, j
        # A tuple of checked values first: the elements' own code (__index__)
        # runs before the C array exists, and cannot change how many there are.
        cdef tuple checked = tuple([(_as_u64(a, "zone addr"), _as_u64(z, "zone size"), r)
                                    for a, z, r in tuple(entries)])
        self.n = 0
        self.disjoint = True
        for _a, _z, ring in checked:
            if ring is not None and not isinstance(ring, Ring):
                raise TypeError(f"zone target must be a Ring or None, not "
                                f"{type(ring).__name__!r}")
        self.rings = [ring for _a, _z, ring in checked]
        self.ranges = <kc_bus_range *>PyMem_Malloc(max(len(checked), 1) * sizeof(kc_bus_range))
        if self.ranges == NULL:
            raise MemoryError()
        _fill_ranges(self.ranges, checked)
        self.n = len(checked)
        # Sorted and pairwise apart: each access then has at most one zone,
        # and the router may reuse the last zone it found.
        for i in range(1, self.n):
            if (self.ranges[i].addr < self.ranges[i - 1].addr
                    or self.ranges[i].addr - self.ranges[i - 1].addr < self.ranges[i - 1].size):
                self.disjoint = False
                break

    def __dealloc__(self):
        PyMem_Free(self.ranges)


def insert_position(list entries, addr, size):
    """Where the kernel inserts a zone (addr, size) into a bus holding *entries*.

    *entries* are ``(addr, size, target)`` in bus order; the result is the
    index kvm_io_bus_register_dev puts the new range at.
    """
    cdef tuple checked = tuple([(_as_u64(a, "zone addr"), _as_u64(z, "zone size"), None)
                                for a, z, _t in tuple(entries)])
    cdef uint64_t new_addr = _as_u64(addr, "zone addr")
    cdef uint64_t new_size = _as_u64(size, "zone size")
    cdef kc_bus_range *ranges = <kc_bus_range *>PyMem_Malloc(
        max(len(checked), 1) * sizeof(kc_bus_range))
    if ranges == NULL:
        raise MemoryError()
    try:
        _fill_ranges(ranges, checked)
        if new_size > 0xFFFFFFFF:
            raise ValueError(f"zone size {new_size:#x} does not fit the ABI's u32")
        return kc_bus_insert_position(ranges, len(checked), new_addr,
                                      <int32_t><uint32_t>new_size)
    finally:
        PyMem_Free(ranges)


cdef _ZoneTable _EMPTY_TABLE = _ZoneTable([])


cdef class _ZoneBus:
    """The write path of kvmcoal.EmulatedVm (subclassed there)."""

    cdef _ZoneTable _mmio
    cdef _ZoneTable _pio
    # Writers still using a replaced table finish before _set_zones returns:
    # an unregister followed by a drain then sees every write that the old
    # table let in (the kernel waits with SRCU for the same reason).
    cdef kc_grace _grace
    # Statistics (EmulatedVm.stats()): writes coalesced, writes that found
    # a zone whose ring (every such zone's) was full or closed, and writes
    # that took the exit path, by kind (the refused ones included).
    cdef uint64_t _coalesced, _refused, _exits_mmio, _exits_pio

    def __cinit__(self, *args, **kwargs):
        self._mmio = _EMPTY_TABLE
        self._pio = _EMPTY_TABLE

    def _forget_writers(self):
        """In a forked child: no writer counted in the grace period exists here.

        The counts were copied from the parent, whose other threads may have
        been inside write(); they never finish in the child, and a zone change
        would wait for them for ever.  The thread that forked is never inside
        write() itself (fork is called from Python code, and write() runs none
        between counting itself in and out).
        """
        self._grace.writers[0] = 0
        self._grace.writers[1] = 0

    def _write_stats(self):
        """(coalesced, refused, MMIO exits, port exits) since the VM was made."""
        return self._coalesced, self._refused, self._exits_mmio, self._exits_pio

    def _set_zones(self, bint pio, list entries):
        """Install *entries*, ``(addr, size, ring)`` in the order writes try them.

        Returns once no write still uses the table it replaced.
        """
        cdef int old
        table = _ZoneTable(entries)
        # Install and flip in one hold of the GIL, under which writers pick
        # their table and epoch: a writer has either both old or both new.
        if pio:
            self._pio = table
        else:
            self._mmio = table
        old = kc_grace_flip(&self._grace)
        with nogil:
            while not kc_grace_done(&self._grace, old):
                sched_yield()

    def write(self, phys_addr, data, *, pio=False):
        """A guest store: True if coalesced into a zone's ring, False for the exit path.

        As the kernel's bus walk does: the zones the binary search offers
        the write to are tried in bus order, and the first that holds the
        whole access and whose ring has room takes it; a full or closed
        ring passes it on to the next.
        """
        cdef kc_entry e
        cdef _ZoneTable table
        cdef kc_bus_range *z
        cdef Ring ring
        cdef ptrdiff_t idx
        cdef int rc, err = 0
        cdef bint must_wake
        cdef int epoch
        cdef bint zoned = False
        _fill_entry(&e, phys_addr, data, pio)
        epoch = kc_grace_enter(&self._grace)
        try:
            table = self._pio if e.pio else self._mmio
            idx = kc_bus_first_dev(table.ranges, table.n, e.phys_addr, <int32_t>e.len)
            while kc_bus_offers(table.ranges, table.n, idx, e.phys_addr, <int32_t>e.len):
                z = &table.ranges[idx]
                idx += 1
                if not kc_zone_in_range(z, e.phys_addr, e.len):
                    continue
                ring = <Ring>z.target
                zoned = True
                with nogil:
                    rc = ring.produce(&e, &must_wake)
                    if must_wake:
                        err = ring.wake_consumer()
                check_wake(err)
                if rc == KC_PUSH_OK:
                    self._coalesced += 1
                    return True
            if zoned:
                self._refused += 1
            if e.pio:
                self._exits_pio += 1
            else:
                self._exits_mmio += 1
            return False
        finally:
            kc_grace_exit(&self._grace, epoch)
