# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The emulated kernel's zone bus, in C (kvmcoal._zone_bus).

The producer side of kvmcoal.EmulatedVm: the part of a vCPU's write that
runs on every store.  EmulatedVm keeps the zones and buffers and hands this
layer flat, sorted tables; a write finds its zone here and pushes into that
zone's Ring through the C interface kvmcoal/_ring.pxd declares.
"""

cimport cython
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.object cimport PyObject
from libc.stdint cimport uint64_t

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


cdef struct kc_zone:
    uint64_t addr
    uint64_t end          # (addr + size) mod 2**64, as the kernel computes it
    PyObject *ring        # borrowed: the owning _ZoneTable holds a reference


@cython.final
cdef class _ZoneTable:
    """An immutable snapshot of one bus's zones; writers keep the one they started with."""

    cdef kc_zone *zones
    cdef Py_ssize_t n
    cdef list rings

    def __cinit__(self, list entries):
        cdef Py_ssize_t i
        cdef uint64_t addr, size
        # A tuple of checked values first: the elements' own code (__index__)
        # runs before the C array exists, and cannot change how many there are.
        cdef tuple checked = tuple([(_as_u64(a, "zone addr"), _as_u64(z, "zone size"), r)
                                    for a, z, r in tuple(entries)])
        self.rings = []
        self.n = 0
        self.zones = <kc_zone *>PyMem_Malloc(max(len(checked), 1) * sizeof(kc_zone))
        if self.zones == NULL:
            raise MemoryError()
        for i, (addr, size, ring) in enumerate(checked):
            if not isinstance(ring, Ring):
                raise TypeError(f"zone target must be a Ring, not {type(ring).__name__!r}")
            self.rings.append(ring)
            self.zones[i].addr = addr
            self.zones[i].end = addr + size   # wraps past 2**64 as the kernel's sum does
            self.zones[i].ring = <PyObject *>ring
            self.n = i + 1      # write() sees only slots filled in

    def __dealloc__(self):
        PyMem_Free(self.zones)


cdef _ZoneTable _EMPTY_TABLE = _ZoneTable([])


cdef class _ZoneBus:
    """The write path of kvmcoal.EmulatedVm (subclassed there)."""

    cdef _ZoneTable _mmio
    cdef _ZoneTable _pio
    # Writers still using a replaced table finish before _set_zones returns:
    # an unregister followed by a drain then sees every write that the old
    # table let in (the kernel waits with SRCU for the same reason).
    cdef kc_grace _grace

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

        Like the kernel's bus walk, the zones that contain the whole access
        are tried in order (lowest address, then smallest size, first); a
        zone whose ring is full or closed passes the write to the next one.
        """
        cdef kc_entry e
        cdef _ZoneTable table
        cdef kc_zone *z
        cdef Ring ring
        cdef uint64_t end
        cdef Py_ssize_t i
        cdef int rc, err = 0
        cdef bint must_wake
        cdef int epoch
        _fill_entry(&e, phys_addr, data, pio)
        end = e.phys_addr + e.len
        if end < e.phys_addr:  # the access wraps past 2**64: never in range
            return False
        epoch = kc_grace_enter(&self._grace)
        try:
            table = self._pio if e.pio else self._mmio
            for i in range(table.n):
                z = &table.zones[i]
                if e.phys_addr >= z.addr and end <= z.end:
                    ring = <Ring>z.ring
                    with nogil:
                        rc = ring.produce(&e, &must_wake)
                        if must_wake:
                            err = ring.wake_consumer()
                    check_wake(err)
                    if rc == KC_PUSH_OK:
                        return True
            return False
        finally:
            kc_grace_exit(&self._grace, epoch)
