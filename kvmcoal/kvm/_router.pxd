# The C-level interface of kvmcoal.kvm._router, for the vCPU's KVM_RUN path
# (kvmcoal.kvm._abi routes after every KVM_RUN return, without the GIL).
cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t

from kvmcoal._ring cimport Ring, kc_entry
from kvmcoal._zone_bus cimport kc_bus_range

from kvmcoal._ring cimport pthread_mutex_t

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t

cdef struct kc_epoch:
    uint64_t until            # entries numbered below this use these tables
    PyObject *mmio            # borrowed _ZoneTable: Router._tables holds them
    PyObject *pio


@cython.final
cdef class Router:
    cdef Ring kring
    cdef list _tables
    # Scratch for a pass: the slots of Vm.ring's entries it found, and for
    # each buffer it holds (at most 8) its entries as runs of slots (start,
    # length).
    cdef uint32_t *kept
    cdef unsigned char **gather
    cdef uint32_t *gather_len
    cdef size_t gather_stride
    cdef void *open_rings[8]
    cdef uint32_t open_counts[8]
    cdef uint32_t open_runs[8]
    # The zone the pass found first for each held buffer, and its table (a
    # borrowed range of it).
    cdef const kc_bus_range *open_hits[8]
    cdef PyObject *open_hit_tables[8]
    cdef uint32_t open_room[8]
    cdef bint open_drop[8]
    cdef bint more
    # Zone tables by entry number (an entry is numbered as the router reaches
    # it); the last has until = 2**64 - 1.
    cdef kc_epoch *epochs
    cdef Py_ssize_t n_epochs, epoch_cap, first_epoch
    # [first, head) of the kernel ring: Vm.ring's entries, routed already;
    # kept_first: where the last pass left first.
    cdef uint32_t head, kept_first
    cdef uint64_t processed
    cdef readonly uint32_t held
    cdef readonly uint64_t routed
    # Entries for closed (or consumer-corrupted) buffers, dropped.
    cdef readonly uint64_t dropped
    cdef int wake_error
    cdef bint active
    # The watcher thread.
    cdef readonly bint watching
    cdef pthread_t thread
    cdef int stopping
    # Serializes start_watcher/stop_watcher (a join must happen once); the
    # stop eventfd wakes the watcher from its sleep.
    cdef pthread_mutex_t watch_lock
    cdef int stop_efd
    cdef long long interval_ns, spin_ns
    # The tracepoint wake-up: an epoll set of perf events (kvm_mmio, then
    # kvm_pio, per traced vCPU thread) and their ring pages.
    cdef int epfd, safety_ms, n_traced
    cdef int trace_ids[2]
    cdef int traced_fds[256]            # -1: a free slot
    cdef int traced_tids[256]
    cdef void *traced_maps[256]
    cdef size_t trace_map_len
    cdef readonly uint64_t passes
    # CPU time the last watcher thread used, set when it stops.
    cdef readonly long long watcher_cpu_ns

    cdef int64_t route_locked(self) noexcept nogil
    cdef int64_t _pass(self) noexcept nogil
    cdef bint _open_hit(self, int n_open, PyObject *table, uint64_t addr, uint32_t len_,
                        const kc_bus_range **hit) noexcept nogil
    cdef int route_nogil(self) noexcept nogil
    cdef int64_t own_count(self) noexcept nogil
    cdef void watch(self) noexcept nogil
    cdef void _try_pass(self) noexcept nogil
    cdef void _wait_for_tracepoint(self) noexcept nogil
