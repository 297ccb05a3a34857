# The C-level interface of kvmcoal._zone_bus: the kernel's bus lookup
# (src/io_bus.h) and the zone tables built on it, which the router on real
# KVM (kvmcoal.kvm._router) shares with the emulated kernel's write path.
cimport cython
from libc.stdint cimport int32_t, uint32_t, uint64_t

cdef extern from "io_bus.h" nogil:
    ctypedef struct kc_bus_range:
        uint64_t addr
        int32_t len
        uint32_t size
        void *target
    ptrdiff_t kc_bus_first_dev(const kc_bus_range *r, size_t n, uint64_t addr, int32_t len)
    int kc_bus_offers(const kc_bus_range *r, size_t n, ptrdiff_t idx, uint64_t addr,
                      int32_t len)
    int kc_zone_in_range(const kc_bus_range *z, uint64_t addr, uint32_t len)
    const kc_bus_range *kc_bus_find(const kc_bus_range *r, size_t n, uint64_t addr,
                                    uint32_t len)
    size_t kc_bus_insert_position(const kc_bus_range *r, size_t n, uint64_t addr, int32_t len)


@cython.final
cdef class _ZoneTable:
    # ranges[i].target borrows rings[i] (a Ring, or None: NULL).
    cdef kc_bus_range *ranges
    cdef Py_ssize_t n
    cdef list rings
    cdef bint disjoint
