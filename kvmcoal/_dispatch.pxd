# The C-level interface of kvmcoal._dispatch: the Bus's delivery, from rings
# to device models, in C (src/dispatch.pyx).
cimport cython
from libc.stdint cimport uint32_t, uint64_t

from cpython.object cimport PyObject

from kvmcoal._ring cimport Ring, kc_entry, kc_pending, pthread_mutex_t


@cython.final
cdef class Target:
    # One mapping as delivery sees it: the range [base, last], what an
    # address minus gives the device's offset, and the device's bound
    # methods, looked up once.
    cdef readonly object mapping
    cdef object device
    cdef uint64_t base, last, delta
    cdef bint pio
    cdef object write            # the function (with write_self) or the callable
    cdef object write_self
    cdef object write_many       # None: the device takes entries one by one
    cdef Ring ring               # the mapping's own buffer's ring, or None
    cdef int slot                # its bit in the dispatcher's pending set, or -1
    cdef bint retiring           # unmapped during a flush that still delivers to it
    # Statistics; gen is the flush that last delivered here.
    cdef uint64_t delivered, direct, flushes, largest_batch, batches, batch, gen

    cdef inline bint holds(self, uint64_t addr, uint32_t size) noexcept nogil:
        return self.base <= addr <= self.last and self.last - addr >= size - 1


@cython.final
cdef class Dispatcher:
    cdef tuple _mmio, _pio       # Targets sorted by base, replaced whole (copy-on-write)
    cdef Target _last_mmio, _last_pio
    cdef Ring _vm_ring           # the producer's VM-wide ring, once it exists
    cdef object _vm_ring_source  # called until it returns that ring (kvm.Vm maps it late)
    cdef kc_pending *_pending
    cdef list _slots             # bit -> Target
    cdef PyObject **_slot_rings  # bit -> its Ring, a reference of ours (for __dealloc__)
    cdef list _retiring          # Targets unmapped during this flush
    cdef tuple _live_mmio, _live_pio
    cdef list _free_slots
    cdef object _unmapped        # Bus._unmapped
    cdef object _records         # bytes -> what write_many receives
    # The delivery lock: recursive, taken before any ring's consumer lock.
    cdef pthread_mutex_t _lock
    cdef unsigned long _owner
    cdef int _depth
    cdef bint _in_flush
    cdef bint _forked            # in a forked child, with own buffers of the parent's
    # Drains in progress on any thread (a flush that sees nothing pending
    # must still wait for one that has taken entries but not delivered them).
    cdef int _delivering
    cdef unsigned char *_scratch
    cdef uint64_t _gen           # one per flush or drain() (Target.gen)
    cdef readonly uint64_t flushes, flushes_with_entries, delivered, unmapped, direct

    cdef Target _find(self, uint64_t addr, uint32_t size, bint pio)
    cdef int _install(self, bint pio) except -1
    cdef bint _maybe_pending(self) except -1
    cdef int _acquire(self) except -1
    cdef void _release(self) noexcept
    cdef Py_ssize_t _flush_locked(self) except -1
    cdef Py_ssize_t _drain_pending(self) except -1
    cdef Py_ssize_t _drain(self, Ring ring) except -1
    cdef int _deliver_run(self, Ring ring, Target t, kc_entry *e, uint32_t *idx,
                          Py_ssize_t left, Py_ssize_t *taken) except -1
    cdef int _call_write(self, Target t, const kc_entry *e) except -1
    cdef Py_ssize_t _run_length(self, Ring ring, Target t, uint32_t idx, Py_ssize_t left)
