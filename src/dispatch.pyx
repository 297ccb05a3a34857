# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The Bus's delivery, in C (kvmcoal._dispatch).

A Bus's flush drains its rings (the producer's VM-wide ring, then the own
buffers of its mappings that hold entries) straight into the devices: each
entry's mapping is found here (a binary search over the mappings sorted by
address, after a check of the last one hit), its offset and little-endian
value computed here, and the device's bound ``write`` called with them, or
a run of entries handed at once to a batch device's ``write_many``.

Which buffers hold entries is known without a system call and without
looking at every buffer: each buffer's ring belongs to the dispatcher's
pending set (kc_pending in ring_impl.h), whose bit for it the producer sets
after every push.  A flush that finds the VM ring empty,
no bit set and no drain in progress returns at once.

Every call here runs with the GIL held, except while it waits for a lock.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.long cimport PyLong_FromUnsignedLongLong
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from kvmcoal._ring cimport (Ring, kc_entry, kc_pending, KC_PENDING_BITS, KC_OK, KC_ENTRY_SIZE,
                            KC_MAX_DATA, kc_ring_read, kc_ring_next, kc_ring_publish_first,
                            kc_ring_peek_first, kc_ring_peek_last, kc_entry_value,
                            kc_pending_mark, kc_pending_take_any, kc_pending_maybe,
                            kc_pending_take_word, kc_pending_restore, kc_ring_depth,
                            kc_thread_ident, pthread_mutex_init, pthread_mutex_lock,
                            pthread_mutex_trylock, pthread_mutex_unlock, pthread_mutex_destroy,
                            _corrupted)

from kvmcoal.errors import BufferForkedError

cdef extern from *:
    int __builtin_ctzll(unsigned long long x) nogil

cdef extern from "Python.h":
    bint PyObject_CheckBuffer(object o)
    bint PyMethod_Check(object o)
    PyObject *PyMethod_GET_FUNCTION(object o)    # borrowed
    PyObject *PyMethod_GET_SELF(object o)
    PyObject *PyObject_Vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames)
    const size_t PY_VECTORCALL_ARGUMENTS_OFFSET

# A batch device gets at most this many records per write_many() call: a
# longer run of its entries arrives in several calls, in order.
BATCH_LIMIT = 4096
cdef Py_ssize_t _BATCH_LIMIT = 4096
# A shorter run goes through write(), entry by entry: making the records
# (and, with numpy, their view) costs more than a few calls.
BATCH_MIN = 8
cdef Py_ssize_t _BATCH_MIN = 8

cdef tuple _SIZES = tuple(range(KC_MAX_DATA + 1))


@cython.final
cdef class Target:
    """One mapping as delivery sees it (made by Bus.map, kept by its Mapping)."""

    def __init__(self, mapping, device, uint64_t base, uint64_t size, bint pio,
                 uint64_t delta, ring):
        if size == 0:
            raise ValueError("a target needs a size of at least 1")
        self.mapping = mapping
        self.device = device
        self.base = base
        self.last = base + (size - 1)
        self.delta = delta
        self.pio = pio
        write = device.write
        # A bound method of a Python function is called as the function with
        # self in front: one indirection less per entry.
        if PyMethod_Check(write):
            self.write = <object>PyMethod_GET_FUNCTION(write)
            self.write_self = <object>PyMethod_GET_SELF(write)
        else:
            self.write = write
            self.write_self = None
        many = getattr(device, "write_many", None)
        self.write_many = many if callable(many) else None
        self.ring = ring
        self.slot = -1

    def stats(self):
        """The mapping's counters, as Mapping.stats() reports them."""
        return {"delivered": self.delivered, "direct": self.direct,
                "flushes": self.flushes, "largest_batch": self.largest_batch,
                "batches": self.batches}

    def count_direct(self):
        """Count one access delivered at once (Bus.write's exit path)."""
        self.direct += 1


cdef inline int _ctz(uint64_t bits) noexcept nogil:
    return __builtin_ctzll(bits)


cdef inline void _count(Target t, uint64_t gen, uint64_t k) noexcept:
    if t.gen != gen:
        t.gen = gen
        t.flushes += 1
        t.batch = 0
    t.batch += k
    if t.batch > t.largest_batch:
        t.largest_batch = t.batch
    t.delivered += k


@cython.final
@cython.no_gc_clear     # __dealloc__ needs _slots: the rings must leave the set it frees
cdef class Dispatcher:
    """Dispatcher(unmapped, records)

    The delivery of one Bus.  *unmapped(addr, size, pio, what)* handles an
    entry no mapping holds; *records(data)* turns a run of raw records
    (bytes) into what a batch device's ``write_many`` receives.
    """

    def __cinit__(self):
        pthread_mutex_init(&self._lock, NULL)
        self._mmio = ()
        self._pio = ()
        self._pending = <kc_pending *>PyMem_Calloc(1, sizeof(kc_pending))
        if self._pending == NULL:
            raise MemoryError()
        self._slots = [None] * KC_PENDING_BITS
        self._slot_rings = <PyObject **>PyMem_Calloc(KC_PENDING_BITS, sizeof(PyObject *))
        if self._slot_rings == NULL:
            raise MemoryError()
        self._free_slots = list(range(KC_PENDING_BITS - 1, -1, -1))
        self._retiring = []
        self._live_mmio = ()
        self._live_pio = ()

    def __init__(self, unmapped, records):
        self._unmapped = unmapped
        self._records = records

    def __dealloc__(self):
        cdef Py_ssize_t i
        # Rings outlive us (their buffers hold them): they must stop marking
        # a set that is about to be freed.  Our own references to them, in C:
        # the GC may have emptied the lists and Targets that also hold them.
        if self._slot_rings != NULL:
            for i in range(KC_PENDING_BITS):
                if self._slot_rings[i] != NULL:
                    (<Ring>self._slot_rings[i])._join_pending(NULL, 0)
                    Py_XDECREF(self._slot_rings[i])
            PyMem_Free(self._slot_rings)
        PyMem_Free(self._pending)
        PyMem_Free(self._scratch)
        pthread_mutex_destroy(&self._lock)

    # -- what the Bus changes --

    def set_vm_ring(self, ring, source=None):
        """The producer's VM-wide ring (a Ring), or None and *source*, a callable
        that returns it (or None while it does not exist yet)."""
        self._vm_ring = ring
        self._vm_ring_source = source

    def set_targets(self, bint pio, targets):
        """Install the mapped targets of one kind, MMIO or port I/O (any order)."""
        live = tuple(sorted(targets, key=_base_of))
        if pio:
            self._live_pio = live
        else:
            self._live_mmio = live
        self._install(pio)

    cdef int _install(self, bint pio) except -1:
        # Delivery also sees the targets retiring (unmapped during this
        # flush, whose queued entries it still delivers), unless a mapping
        # made since covers their range.
        cdef Target r, t
        cdef list extra = []
        cdef bint covered
        live = self._live_pio if pio else self._live_mmio
        for r in self._retiring:
            if r.pio != pio:
                continue
            covered = False
            for t in live:
                if r.base <= t.last and t.base <= r.last:
                    covered = True
                    break
            if not covered:
                extra.append(r)
        ordered = tuple(sorted([*live, *extra], key=_base_of)) if extra else live
        if pio:
            self._pio = ordered
            self._last_pio = None
        else:
            self._mmio = ordered
            self._last_mmio = None
        return 0

    def retire(self, Target t not None):
        """*t* was unmapped by a device during this thread's flush: that flush
        still delivers the entries queued for it, then lets it go."""
        t.retiring = True
        self._retiring.append(t)

    def flushing_here(self):
        """Whether this thread is inside a flush (a device it is delivering to)."""
        return self._in_flush and self._owner == kc_thread_ident()

    def add_buffer(self, Target t not None):
        """Put *t*'s own ring in the pending set."""
        if t.ring is None or t.slot >= 0:
            raise ValueError("the target has no ring of its own, or is in the set already")
        if not self._free_slots:
            raise RuntimeError(f"a Bus delivers at most {KC_PENDING_BITS} own buffers")
        t.slot = self._free_slots.pop()
        self._slots[t.slot] = t
        Py_INCREF(t.ring)
        self._slot_rings[t.slot] = <PyObject *>t.ring
        t.ring._join_pending(self._pending, t.slot)

    def remove_buffer(self, Target t not None):
        """Take *t*'s ring out of the pending set (idempotent)."""
        if t.slot < 0:
            return
        (<Ring>self._slot_rings[t.slot])._join_pending(NULL, 0)
        self._slots[t.slot] = None
        Py_XDECREF(self._slot_rings[t.slot])
        self._slot_rings[t.slot] = NULL
        self._free_slots.append(t.slot)
        t.slot = -1

    def find(self, addr, size, bint pio):
        """The Mapping holding ``[addr, addr + size)``, or None."""
        cdef Target t
        if addr < 0 or addr >= 1 << 64 or size < 1 or size > 8:
            return None
        t = self._find(addr, size, pio)
        return None if t is None or t.retiring else t.mapping

    def target(self, addr, size, bint pio):
        """The Target holding ``[addr, addr + size)``, or None."""
        cdef Target t
        if addr < 0 or addr >= 1 << 64 or size < 1 or size > 8:
            return None
        t = self._find(addr, size, pio)
        return None if t is None or t.retiring else t

    cdef Target _find(self, uint64_t addr, uint32_t size, bint pio):
        cdef Target t = self._last_pio if pio else self._last_mmio
        cdef tuple targets
        cdef Py_ssize_t lo = 0, hi, mid
        if t is not None and t.holds(addr, size):
            return t
        targets = self._pio if pio else self._mmio
        hi = len(targets)
        while lo < hi:
            mid = (lo + hi) >> 1
            if (<Target>targets[mid]).base <= addr:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        t = <Target>targets[lo - 1]
        if not t.holds(addr, size):
            return None
        if pio:
            self._last_pio = t
        else:
            self._last_mmio = t
        return t

    # -- the delivery lock --

    cdef int _acquire(self) except -1:
        cdef unsigned long me = kc_thread_ident()
        if pthread_mutex_trylock(&self._lock) != 0:
            if self._owner == me:
                self._depth += 1
                return 0
            with nogil:
                pthread_mutex_lock(&self._lock)
        self._owner = me
        self._depth = 1
        return 0

    cdef void _release(self) noexcept:
        self._depth -= 1
        if self._depth == 0:
            self._owner = 0
            pthread_mutex_unlock(&self._lock)

    def __enter__(self):
        self._acquire()
        return self

    def __exit__(self, *exc_info):
        if self._owner != kc_thread_ident():
            raise RuntimeError("the delivery lock is not held by this thread")
        self._release()

    def owned(self):
        """Whether this thread holds the delivery lock."""
        return self._depth > 0 and self._owner == kc_thread_ident()

    def _after_fork(self):
        """In a forked child: the parent's threads that held the lock do not exist."""
        pthread_mutex_init(&self._lock, NULL)
        self._owner = 0
        self._depth = 0
        self._in_flush = False
        self._delivering = 0
        self._forked = any(t is not None for t in self._slots)

    # -- delivery --

    def flush(self):
        """Deliver every pending entry of the VM ring and the own buffers, in each
        ring's order; how many.  0 at once when called from a device a flush of
        this thread is delivering to, or when nothing is pending."""
        cdef Py_ssize_t n
        cdef Target t
        if self._in_flush and self._owner == kc_thread_ident():
            return 0
        if self._forked:
            raise BufferForkedError(
                "this Bus's own buffers were inherited across fork(); the child cannot "
                "deliver them (attach to them with CoalescedBuffer.attach(*fds) instead)")
        if not self._maybe_pending():
            return 0
        self._acquire()
        try:
            n = self._flush_locked()
            # Mappings a device unmapped meanwhile have had everything queued
            # for them (a flush that raised leaves them to the next one).
            if self._retiring:
                for t in self._retiring:
                    t.retiring = False
                self._retiring = []
                self._install(False)
                self._install(True)
            return n
        finally:
            self._release()

    cdef bint _maybe_pending(self) except -1:
        cdef Ring vm = self._vm_ring
        if vm is None and self._vm_ring_source is not None:
            ring = self._vm_ring_source()
            if ring is not None:
                self._vm_ring = vm = <Ring?>ring
                self._vm_ring_source = None
        # The order matters: a drain elsewhere takes entries out of a ring
        # (or a pending bit) only after it counted itself in _delivering.
        if vm is not None and vm._live and \
                kc_ring_peek_first(&vm._r) != kc_ring_peek_last(&vm._r):
            return True
        return kc_pending_maybe(self._pending) or self._delivering != 0

    cdef Py_ssize_t _flush_locked(self) except -1:
        cdef Py_ssize_t n, total = 0
        cdef Ring vm
        self._in_flush = True
        self.flushes += 1
        self._gen += 1
        try:
            while True:   # writes the devices made during the replay are flushed too
                self._delivering += 1
                try:
                    n = 0
                    vm = self._vm_ring
                    if vm is not None and vm._live:
                        n += self._drain(vm)
                    if kc_pending_take_any(self._pending):
                        n += self._drain_pending()
                finally:
                    self._delivering -= 1
                if n == 0:
                    break
                total += n
            if total:
                self.flushes_with_entries += 1
            return total
        finally:
            self._in_flush = False

    cdef Py_ssize_t _drain_pending(self) except -1:
        cdef uint32_t w, b, slot
        cdef uint64_t bits
        cdef Py_ssize_t n = 0
        cdef Target t
        for w in range(KC_PENDING_BITS // 64):
            bits = kc_pending_take_word(self._pending, w)
            while bits:
                b = <uint32_t>_ctz(bits)
                bits &= bits - 1
                slot = w * 64 + b
                t = <Target>self._slots[slot]
                if t is None:
                    continue
                try:
                    n += self._drain(t.ring)
                except BaseException:
                    # What this word still held waits for the next flush,
                    # with this ring (the later words were not taken yet).
                    kc_pending_restore(self._pending, w, bits | (<uint64_t>1 << b))
                    raise
                if t.ring._live and kc_ring_depth(&t.ring._r):
                    kc_pending_mark(self._pending, slot)   # left entries: look again
        return n

    def drain(self, Target t not None):
        """Deliver what *t*'s own buffer holds (a poller's pass); how many."""
        if t.ring is None or not t.ring._live:
            return 0
        self._acquire()
        self._delivering += 1
        self._gen += 1
        try:
            return self._drain(t.ring)
        finally:
            self._delivering -= 1
            self._release()

    cdef Py_ssize_t _drain(self, Ring ring) except -1:
        cdef uint32_t first, idx, bad = 0
        cdef Py_ssize_t n, i = 0, taken
        cdef kc_entry e
        cdef int rc, entered
        cdef Target t
        cdef uint64_t gen
        cdef Py_ssize_t single = 0     # entries of a short batch-device run still to go
        if not ring._live:
            return 0
        try:
            entered = ring._enter_consumer()
        except ValueError:
            if not ring._live:     # released while we waited for it
                return 0
            raise
        if not entered:
            return 0               # this thread is inside a consumer call of it
        try:
            n = ring._begin(-1, &first)
            if n == 0:
                ring._consumer_idle()
                return 0
            gen = self._gen
            idx = first
            while i < n:
                rc = kc_ring_read(&ring._r, idx, &e, &bad)
                if rc != KC_OK:
                    raise _corrupted(&ring._r, rc, bad, idx)
                t = self._find(e.phys_addr, e.len, e.pio)
                if t is not None and t.write_many is not None and single == 0:
                    # A run this long goes to write_many; a shorter one is
                    # cheaper entry by entry.
                    taken = self._run_length(ring, t, idx, min(n - i, _BATCH_LIMIT))
                    if taken >= _BATCH_MIN:
                        self._deliver_run(ring, t, &e, &idx, taken, &taken)
                        i += taken
                        continue
                    single = taken
                if single:
                    single -= 1
                # Consumed before the device runs: a raising device never sees
                # the same entry twice.
                idx = kc_ring_next(&ring._r, idx)
                kc_ring_publish_first(&ring._r, idx)
                ring._taken += 1
                i += 1
                if t is None:
                    self.unmapped += 1
                    self._unmapped(e.phys_addr, e.len, bool(e.pio), "write")
                    continue
                self.delivered += 1
                _count(t, gen, 1)
                self._call_write(t, &e)
            ring._passes += 1
            ring._consumer_idle()
            return n
        finally:
            ring._exit_consumer()

    cdef Py_ssize_t _run_length(self, Ring ring, Target t, uint32_t idx, Py_ssize_t left):
        """How many entries from *idx* (the first one t's) are for t's device, at most
        *left*: a look, the entries stay where they are."""
        cdef Py_ssize_t run = 1
        cdef kc_entry e
        cdef uint32_t bad = 0
        cdef Target here
        while run < left:
            idx = kc_ring_next(&ring._r, idx)
            if kc_ring_read(&ring._r, idx, &e, &bad) != KC_OK:
                break
            here = self._find(e.phys_addr, e.len, e.pio)
            if here is None or here.device is not t.device:
                break
            run += 1
        return run

    cdef int _deliver_run(self, Ring ring, Target t, kc_entry *e, uint32_t *idx,
                          Py_ssize_t left, Py_ssize_t *taken) except -1:
        """Hand the run of entries from *idx* (the first, *e*, already read, for
        *t*) that are all for t's device, through any of its mappings, to its
        write_many: at most *left*, as copies rebased to device offsets."""
        cdef Py_ssize_t run = 0, j
        cdef uint32_t bad = 0
        cdef Target here = t
        cdef kc_entry *out
        if self._scratch == NULL:
            self._scratch = <unsigned char *>PyMem_Malloc(_BATCH_LIMIT * KC_ENTRY_SIZE)
            if self._scratch == NULL:
                raise MemoryError()
        while True:
            # The copy is what was checked (kc_ring_read validated it): a
            # peer writing the slot now cannot change what the device gets.
            memcpy(self._scratch + run * KC_ENTRY_SIZE, e, KC_ENTRY_SIZE)
            _count(here, self._gen, 1)
            run += 1
            idx[0] = kc_ring_next(&ring._r, idx[0])
            if run == left:
                break
            if kc_ring_read(&ring._r, idx[0], e, &bad) != KC_OK:
                break              # the caller's next read reports it
            here = self._find(e.phys_addr, e.len, e.pio)
            if here is None or here.device is not t.device:
                break
        kc_ring_publish_first(&ring._r, idx[0])
        ring._taken += run
        taken[0] = run
        self.delivered += run
        # Rebased to device offsets, each by its own mapping (no Python code
        # has run since they were found).
        for j in range(run):
            out = <kc_entry *>(self._scratch + j * KC_ENTRY_SIZE)
            out.phys_addr -= self._find(out.phys_addr, out.len, out.pio).delta
        t.batches += 1
        records = self._records(PyBytes_FromStringAndSize(<const char *>self._scratch,
                                                          run * KC_ENTRY_SIZE))
        t.write_many(records)
        return 0

    cdef int _call_write(self, Target t, const kc_entry *e) except -1:
        cdef PyObject *args[5]
        cdef PyObject *result
        offset = PyLong_FromUnsignedLongLong(e.phys_addr - t.delta)
        value = PyLong_FromUnsignedLongLong(kc_entry_value(e))
        args[0] = NULL
        args[1] = <PyObject *>t.write_self
        args[2] = <PyObject *>offset
        args[3] = <PyObject *>_SIZES[e.len]
        args[4] = <PyObject *>value
        if t.write_self is not None:
            result = PyObject_Vectorcall(<PyObject *>t.write, &args[1], 4, NULL)
        else:
            result = PyObject_Vectorcall(<PyObject *>t.write, &args[2],
                                         3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL)
        if result == NULL:
            return -1
        Py_DECREF(<object>result)
        return 0

    def deliver(self, addr, data, pio):
        """Deliver one write now, as an exit brings it: ``(addr, data, pio)``,
        *data* its bytes, little-endian.  Counted as a direct access."""
        cdef kc_entry e
        cdef const unsigned char[:] view
        cdef Target t
        cdef Py_ssize_t n
        if type(data) is not bytes:
            if isinstance(data, int) or not PyObject_CheckBuffer(data):
                raise TypeError(f"deliver() takes the data written as bytes, not "
                                f"{type(data).__name__!r}")
            data = memoryview(data).tobytes()
        n = len(<bytes>data)
        if not 1 <= n <= 8:
            raise ValueError(f"deliver(): data of {n} bytes; a write is 1 to 8")
        if addr < 0 or addr >= 1 << 64:
            raise ValueError(f"deliver(): address {addr:#x} is not a u64")
        e.phys_addr = addr
        e.len = <uint32_t>n
        e.pio = 1 if pio else 0
        memcpy(e.data, <const char *>(<bytes>data), n)
        t = self._find(e.phys_addr, e.len, e.pio)
        if t is None:
            self._unmapped(addr, n, bool(pio), "write")
            return
        t.direct += 1
        self.direct += 1
        self._call_write(t, &e)


def _base_of(Target t):
    return t.base
