# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The KVM coalesced MMIO/PIO ring, in C (kvmcoal._ring).

The ring logic is in ring_impl.c; this layer owns the Python objects: it
holds the caller's buffer, turns ring entries into Entry objects or handler
calls, and serializes consumers.  kvmcoal/_ring.pxd declares the types for
other Cython code (kvmcoal._zone_bus cimports them); kvmcoal._ring_py is the
pure-Python twin the tests check this against; kvmcoal/_ring.pyi documents
the API both share.
"""

cimport cython
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE,
                             PyBUF_C_CONTIGUOUS, PyBUF_SIMPLE)
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.long cimport PyLong_FromUnsignedLongLong
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from libc.errno cimport errno, EINTR
from libc.string cimport memcmp, memcpy, memset
from posix.fcntl cimport fcntl, F_DUPFD_CLOEXEC
from posix.unistd cimport close, sysconf, _SC_PAGESIZE

import os
import weakref
from collections.abc import Callable as _Callable

from kvmcoal.errors import RingCorruptedError

ENTRY_SIZE = KC_ENTRY_SIZE
RING_HEADER_SIZE = KC_HEADER_SIZE
MIN_RING_NBYTES = KC_MIN_RING_NBYTES
PAGE_SIZE = sysconf(_SC_PAGESIZE)


cdef object _index(object value, str what, str also=""):
    """*value* as a Python int if it is an integer (int, bool, numpy integers: anything
    with __index__), else TypeError naming *what*; floats are refused, not truncated."""
    if type(value) is int:
        return value
    try:
        return PyNumber_Index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int{also}, not {type(value).__name__!r}") from None


# The consume() handler's type, as in the stub and the twin.
Handler = _Callable[[int, bytes, bool], object]


def ring_max(nbytes):
    """Number of slots of a ring occupying *nbytes* bytes (see _ring.pyi)."""
    nbytes = _index(nbytes, "nbytes")
    if nbytes < <Py_ssize_t>KC_MIN_RING_NBYTES:
        raise ValueError(f"nbytes={nbytes} is smaller than the "
                         f"{KC_MIN_RING_NBYTES}-byte minimum ring")
    slots = (nbytes - KC_HEADER_SIZE) // KC_ENTRY_SIZE
    if slots > KC_MAX_SLOTS:
        raise ValueError(f"nbytes={nbytes} gives {slots} slots, more than the "
                         f"{KC_MAX_SLOTS} that 32-bit ring indices can address")
    return slots


RING_MAX = ring_max(PAGE_SIZE)

# Rings alive in this process.  A forked child keeps using a plain ring (its
# memory is the child's copy), but the locks and sleepers it copied belong to
# the parent's threads; CoalescedBuffer cuts its own rings loose as well.
_live_rings = weakref.WeakSet()


def _after_fork_in_child():
    for ring in list(_live_rings):
        ring._forget_parent_threads()


os.register_at_fork(after_in_child=_after_fork_in_child)


cdef int _get_buffer(object obj, Py_buffer *view, str what, bint writable=True) except -1:
    """Export obj as a writable (or, with writable=False, any) C-contiguous
    buffer, or say exactly why not."""
    cdef int flags = PyBUF_C_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0)
    try:
        PyObject_GetBuffer(obj, view, flags)
        return 0
    except (BufferError, TypeError, ValueError):
        pass
    try:
        probe = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what} needs a {'writable ' if writable else ''}bytes-like "
                        f"object, not {type(obj).__name__!r}") from None
    with probe:
        if writable and probe.readonly:
            raise TypeError(f"{what} needs a writable buffer; "
                            f"this {type(obj).__name__!r} is read-only")
        if not probe.c_contiguous:
            raise ValueError(f"{what} needs a C-contiguous buffer")
    # Usable, yet the export failed: report the exporter's reason.
    PyObject_GetBuffer(obj, view, flags)
    return 0


cdef uint64_t _as_u64(object value, str what) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t out
    value = _index(value, what)
    try:
        out = value
    except OverflowError:
        raise ValueError(f"{what}={value} is out of the u64 range") from None
    return out


cdef int _fill_entry(kc_entry *e, object phys_addr, object data, object pio) except -1:
    """Validate a write given from Python and build its ring record."""
    cdef Py_buffer view
    cdef Py_ssize_t n
    e.phys_addr = _as_u64(phys_addr, "phys_addr")
    if pio is True:
        e.pio = 1
    elif pio is False:
        e.pio = 0
    else:
        raise TypeError(f"pio must be True or False, not {pio!r}")
    memset(e.data, 0, KC_MAX_DATA)
    if type(data) is bytes:
        n = len(<bytes>data)
        if 0 < n <= <Py_ssize_t>KC_MAX_DATA:
            memcpy(e.data, <const char *>data, n)
    else:
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except (BufferError, TypeError, ValueError):
            # Not a contiguous run of bytes, or no buffer at all: a strided
            # view is copied out (as bytes() would), anything else refused.
            try:
                probe = memoryview(data)
            except TypeError:
                raise TypeError(f"data must be a bytes-like object, not "
                                f"{type(data).__name__!r} (the bytes written; Bus.write "
                                f"takes an int)") from None
            with probe:
                if not 0 < probe.nbytes <= <Py_ssize_t>KC_MAX_DATA:
                    raise ValueError(f"data must be 1 to {KC_MAX_DATA} bytes, "
                                     f"got {probe.nbytes}") from None
                data = probe.tobytes()
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        n = view.len
        if 0 < n <= <Py_ssize_t>KC_MAX_DATA:
            memcpy(e.data, view.buf, n)
        PyBuffer_Release(&view)
    if not 0 < n <= <Py_ssize_t>KC_MAX_DATA:
        raise ValueError(f"data must be 1 to {KC_MAX_DATA} bytes, got {n}")
    e.len = <uint32_t>n
    return 0


@cython.final
@cython.freelist(256)
cdef class Entry:
    """One coalesced write, as the consumer delivers it (immutable)."""

    def __init__(self, phys_addr, data, pio=False):
        if self._made:
            raise TypeError("Entry is immutable: __init__ cannot be called again")
        _fill_entry(&self._e, phys_addr, data, pio)
        self._made = True

    @staticmethod
    cdef Entry _from(const kc_entry *e):
        cdef Entry self = Entry.__new__(Entry)
        self._e = e[0]
        self._made = True
        return self

    @property
    def phys_addr(self):
        """Guest-physical address (MMIO) or port number (PIO) written."""
        return self._e.phys_addr

    @property
    def len(self):
        """Width of the write in bytes, 1 to 8."""
        return self._e.len

    @property
    def pio(self):
        """True for a port I/O write, False for MMIO."""
        return self._e.pio != 0

    @property
    def data(self):
        """The bytes written, ``len`` of them."""
        return PyBytes_FromStringAndSize(<const char *>self._e.data, self._e.len)

    @property
    def value(self):
        """``data`` as a little-endian unsigned integer."""
        return kc_entry_value(&self._e)

    def __eq__(self, other):
        if type(other) is not Entry:
            return NotImplemented
        cdef Entry o = <Entry>other
        return (self._e.phys_addr == o._e.phys_addr and self._e.len == o._e.len
                and self._e.pio == o._e.pio
                and kc_entry_value(&self._e) == kc_entry_value(&o._e))

    def __hash__(self):
        return hash((self.phys_addr, self.data, self.pio))

    def __repr__(self):
        return f"Entry(phys_addr={self.phys_addr:#x}, data={self.data!r}, pio={self.pio})"

    def __reduce__(self):
        return (Entry, (self.phys_addr, self.data, self.pio))


cdef extern from "Python.h":
    ctypedef PyObject *(*vectorcallfunc)(PyObject *callable, PyObject *const *args,
                                         size_t nargsf, PyObject *kwnames)
    vectorcallfunc PyVectorcall_Function(PyObject *callable)
    PyObject *PyObject_Vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames)
    const size_t PY_VECTORCALL_ARGUMENTS_OFFSET
    PyObject *Py_True
    PyObject *Py_False


cdef int _propagate() except -1:
    """Raise the exception a C-API call has already set."""
    return -1


cdef int check_wake(int err) except -1:
    if err < 0:
        raise OSError(-err, f"cannot signal the ring's eventfd: {os.strerror(-err)}")
    return 0


# drain_into and push_many keep the GIL for a batch of at most this many
# bytes (a one-page ring holds 4 KiB): copying it takes less time than
# dropping the GIL and taking it back.
cdef enum:
    _BATCH_WITH_GIL_BYTES = 64 * 1024


cdef object _corrupted(const kc_ring *r, int status, uint32_t bad, uint32_t index):
    if status == KC_E_BAD_FIRST or status == KC_E_BAD_LAST:
        field = "first" if status == KC_E_BAD_FIRST else "last"
        return RingCorruptedError(
            f"ring index {field}={bad} is out of range for a ring of {r.max} slots",
            field, bad, None)
    if status == KC_E_BAD_LEN:
        return RingCorruptedError(
            f"entry at slot {index} has len={bad}, expected 1 to {KC_MAX_DATA}",
            "len", bad, index)
    return RingCorruptedError(
        f"entry at slot {index} has pio={bad}, expected 0 or 1", "pio", bad, index)


cdef Py_ssize_t _as_limit(object limit) except -2:
    """-1 for no limit, else the limit, which must be a non-negative int."""
    if limit is None:
        return -1
    limit = _index(limit, "limit", " or None")
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return min(limit, <Py_ssize_t>KC_MAX_SLOTS)


@cython.final
@cython.embedsignature(False)   # Cython's own rendering put nbytes before the '*'
cdef class Ring:
    """Ring(buffer, *, nbytes=None, legacy_full_check=False)

    A coalesced MMIO/PIO ring over a writable, C-contiguous buffer.

    See kvmcoal/_ring.pyi for the full contract.
    """

    def __cinit__(self):
        self._sleep_fd = -1
        pthread_mutex_init(&self._lock, NULL)
        pthread_mutex_init(&self._plock, NULL)

    def __init__(self, buffer, *, nbytes=None, legacy_full_check=False):
        # _initialising: an __init__ re-entered from the arguments' own code
        # (nbytes.__index__, say) must not replace the buffer of the outer one.
        if self._live or self._initialising:
            raise RuntimeError("Ring.__init__ called on a live ring")
        self._initialising = True
        try:
            self._init(buffer, nbytes, legacy_full_check)
        finally:
            self._initialising = False

    cdef int _init(self, buffer, nbytes, legacy_full_check) except -1:
        cdef Py_ssize_t used
        cdef int rc
        cdef bint legacy
        # The arguments' own code (__index__, __bool__) runs before the
        # buffer is taken, so none runs while it is held.
        if nbytes is not None:
            nbytes = _index(nbytes, "nbytes")
        legacy = bool(legacy_full_check)
        _get_buffer(buffer, &self._view, "Ring")
        try:
            used = self._view.len
            if nbytes is not None:
                if nbytes > used:
                    raise ValueError(f"nbytes={nbytes} exceeds the buffer's {used} bytes")
                if nbytes < <Py_ssize_t>KC_MIN_RING_NBYTES:
                    raise ValueError(f"nbytes={nbytes} is smaller than the "
                                     f"{KC_MIN_RING_NBYTES}-byte minimum ring")
                used = nbytes
            elif used < <Py_ssize_t>KC_MIN_RING_NBYTES:
                raise ValueError(f"buffer of {used} bytes is smaller than the "
                                 f"{KC_MIN_RING_NBYTES}-byte minimum ring")
            rc = kc_ring_init(&self._r, self._view.buf, used)
            if rc == KC_E_TOO_LARGE:
                ring_max(used)  # raises the ValueError that explains it
            if rc == KC_E_MISALIGNED:
                raise ValueError("the ring buffer's address must be 4-byte aligned "
                                 "(its indices are accessed atomically)")
        except BaseException:
            PyBuffer_Release(&self._view)
            raise
        self._nbytes = used
        self._legacy = legacy
        self._live = True
        _live_rings.add(self)
        return 0

    def __dealloc__(self):
        if self._live:
            PyBuffer_Release(&self._view)
        pthread_mutex_destroy(&self._lock)
        pthread_mutex_destroy(&self._plock)
        if self._sleep_fd >= 0:
            close(self._sleep_fd)

    cdef bint _overlaps(self, const void *buf, Py_ssize_t n):
        """Whether [buf, buf + n) shares a byte with the ring's own memory."""
        return (n > 0 and <const char *>buf < <const char *>self._view.buf + self._nbytes
                and <const char *>self._view.buf < <const char *>buf + n)

    cdef int _check_live(self) except -1:
        if not self._live:
            raise ValueError("operation on a released Ring")
        return 0

    cdef int _enter_consumer(self) except -1:
        """Take the consumer lock: 1 if taken, 0 for a nested call (deliver nothing)."""
        cdef int rc
        self._check_live()
        if pthread_mutex_trylock(&self._lock) == 0:     # uncontended: keep the GIL
            self._owner = kc_thread_ident()
            return 1
        with nogil:
            rc = self._enter_consumer_nogil()
        if rc < 0:              # released while we waited
            self._check_live()
        return rc

    cdef int _enter_consumer_nogil(self) noexcept nogil:
        """_enter_consumer for C callers: 1 taken, 0 nested, -1 released (not taken)."""
        if pthread_mutex_trylock(&self._lock) != 0:
            if self._owner == kc_thread_ident():
                return 0
            pthread_mutex_lock(&self._lock)
        if not self._live:
            pthread_mutex_unlock(&self._lock)
            return -1
        self._owner = kc_thread_ident()
        return 1

    cdef void _exit_consumer(self) noexcept nogil:
        self._owner = 0
        pthread_mutex_unlock(&self._lock)

    cdef Py_ssize_t _begin(self, Py_ssize_t limit, uint32_t *first) except -1:
        """The start of every consumer call: validate the indices and return how
        many entries from *first* to deliver (at most *limit*; -1: all)."""
        cdef uint32_t bad = 0
        cdef int64_t pending
        limit = self._routed_limit(limit)
        pending = kc_ring_begin(&self._r, first, &bad)
        if pending < 0:
            raise _corrupted(&self._r, <int>pending, bad, 0)
        if pending > self._high_water:
            kc_note_depth(&self._high_water, <uint32_t>pending)
        if limit < 0 or pending < limit:
            return <Py_ssize_t>pending
        return limit

    cdef Py_ssize_t _routed_limit(self, Py_ssize_t limit) noexcept:
        """*limit* (-1: none), lowered to the ring's own entries when a router
        shares it (which routes now: the caller holds the consumer lock)."""
        cdef int64_t own
        if self._r.route != NULL:
            own = self._r.route(self._r.route_ctx, 1)
            if own >= 0 and (limit < 0 or own < limit):
                return <Py_ssize_t>own
        return limit

    cdef int64_t _begin_unrouted(self, uint32_t *first) except -1:
        """_begin without the router: how many entries the ring holds."""
        cdef uint32_t bad = 0
        cdef int64_t pending = kc_ring_begin(&self._r, first, &bad)
        if pending < 0:
            raise _corrupted(&self._r, <int>pending, bad, 0)
        return pending

    cdef int _consumer_idle(self, bint force=False) except -1:
        """With a notifier attached, clear the wakeup once the ring is empty."""
        cdef int rc
        if self._r.efd >= 0 and kc_ring_peek_first(&self._r) == kc_ring_peek_last(&self._r):
            if not force and not kc_ring_signalled(&self._r):
                return 0      # not signalled: nothing to clear, and no system call
            # System calls without the GIL: producer threads need it meanwhile.
            # The consumer lock we hold keeps release() from closing the fd.
            with nogil:
                rc = kc_ring_notify_consumer_idle(&self._r, force)
            if rc < 0:
                PyErr_SetFromErrno(OSError)
        return 0

    cdef void _join_pending(self, kc_pending *p, uint32_t bit) noexcept:
        pthread_mutex_lock(&self._plock)
        kc_ring_set_pending(&self._r, p, bit)
        if p != NULL:
            # Entries already in it claimed no wakeup into the set: look once.
            kc_pending_mark(p, bit)
        pthread_mutex_unlock(&self._plock)

    def _clear_wakeup(self):
        """Before sleeping on the eventfd: if the ring is empty, clear the eventfd
        whatever the signalled word says (a peer may have written either)."""
        if not self._enter_consumer():
            return
        try:
            self._consumer_idle(True)
        finally:
            self._exit_consumer()

    def _stats(self):
        """(high-water depth, entries taken, consumer calls that took some), for
        the statistics of buffers and VMs."""
        return self._high_water, self._taken, self._passes

    cdef int produce(self, const kc_entry *e, bint *must_wake) noexcept nogil:
        """Push under the producer lock; returns a kc_push_result (or KC_PUSH_RELEASED).

        *must_wake is set when this write must wake the consumer: call
        wake_consumer(), without the GIL, since the consumer that wakes needs it.
        """
        cdef int rc
        must_wake[0] = False
        pthread_mutex_lock(&self._plock)
        if not self._live:
            rc = KC_PUSH_RELEASED
        else:
            rc = kc_ring_push(&self._r, e.phys_addr, e.data, e.len, e.pio, self._legacy)
            if rc == KC_PUSH_OK:
                kc_note_depth(&self._high_water, kc_ring_depth(&self._r))
                must_wake[0] = kc_ring_claim_wakeup(&self._r)
        pthread_mutex_unlock(&self._plock)
        return rc

    cdef int wake_consumer(self) noexcept nogil:
        """Write the eventfd a claimed wakeup owes; 0 or -errno.  The lock keeps the fd open."""
        cdef int rc = 0
        pthread_mutex_lock(&self._plock)
        if self._live and kc_ring_signal(&self._r) < 0:
            rc = -errno
        pthread_mutex_unlock(&self._plock)
        return rc

    def _attach_notifier(self, int efd, Py_ssize_t offset):
        """Signal *efd* on pushes; the shared signalled word is at *offset* in the buffer.

        Internal to CoalescedBuffer, which owns the eventfd and detaches it
        (release()) before closing it.  _sleep() polls a duplicate of it.
        """
        cdef int sleep_fd
        self._check_live()
        if offset < self._nbytes or offset > self._view.len - 4 or offset % 4:
            raise ValueError(f"notifier word at offset {offset} is not an aligned word "
                             f"past the ring ({self._nbytes} of {self._view.len} bytes)")
        if self._sleep_fd >= 0:
            raise RuntimeError("the ring already has a notifier")
        sleep_fd = fcntl(efd, F_DUPFD_CLOEXEC, 0)
        if sleep_fd < 0:
            PyErr_SetFromErrno(OSError)
        self._sleep_fd = sleep_fd
        pthread_mutex_lock(&self._plock)
        kc_ring_set_notifier(&self._r, efd, <uint32_t *>(<char *>self._view.buf + offset))
        pthread_mutex_unlock(&self._plock)

    cdef void _close_sleep_fd(self):
        """Once released and with no sleeper left: close the ring's eventfd duplicate."""
        if self._sleep_fd >= 0 and self._sleepers == 0 and not self._live:
            close(self._sleep_fd)
            self._sleep_fd = -1

    cdef int _enter_exclusive(self, str what) except -1:
        """Take the consumer lock for reset/release, which a handler must not call."""
        if pthread_mutex_trylock(&self._lock) != 0:
            if self._owner == kc_thread_ident():
                raise RuntimeError(f"Ring.{what}() called from inside consume()")
            with nogil:
                pthread_mutex_lock(&self._lock)
        return 0

    @property
    def max(self):
        """Slots in the ring, ``ring_max(nbytes)``."""
        self._check_live()
        return self._r.max

    @property
    def capacity(self):
        """Entries the ring can hold: ``max - 1``."""
        self._check_live()
        return self._r.max - 1

    @property
    def nbytes(self):
        """Bytes of the buffer the ring occupies."""
        self._check_live()
        return self._nbytes

    @property
    def first(self):
        """The consumer index as it is in memory now (not validated)."""
        self._check_live()
        return kc_ring_peek_first(&self._r)

    @property
    def last(self):
        """The producer index as it is in memory now (not validated)."""
        self._check_live()
        return kc_ring_peek_last(&self._r)

    @property
    def legacy_full_check(self):
        """Whether push() reproduces the pre-6.12 full check."""
        self._check_live()
        return self._legacy

    @property
    def released(self):
        """True after release()."""
        return not self._live

    def __len__(self):
        cdef uint32_t first
        cdef int entered
        cdef int64_t own, pending
        self._check_live()
        if self._r.route == NULL:
            return self._begin(-1, &first)
        # A routed ring counts only its own entries, which the router (run
        # under the consumer lock) finds.  Nested in a handler of a consumer
        # call of this thread's, it only counts: moving entries then would
        # move what the outer call is delivering.
        entered = self._enter_consumer()
        try:
            if entered:
                return self._begin(-1, &first)
            own = self._r.route(self._r.route_ctx, 0)
            pending = self._begin_unrouted(&first)
            return pending if own < 0 or pending < own else own
        finally:
            if entered:
                self._exit_consumer()

    def __repr__(self):
        if not self._live:
            return "<kvmcoal._ring.Ring released>"
        return (f"<kvmcoal._ring.Ring max={self._r.max} first={kc_ring_peek_first(&self._r)} "
                f"last={kc_ring_peek_last(&self._r)}>")

    def reset(self):
        """Empty the ring: set ``first`` and ``last`` to 0."""
        self._check_live()
        self._enter_exclusive("reset")
        # A writer without the GIL may be mid-push.  Whoever holds the
        # producer lock must never wait for the GIL (push() holds the GIL
        # while it waits for the lock), so all of this runs without it.
        with nogil:
            pthread_mutex_lock(&self._plock)
            if self._live:
                kc_ring_reset(&self._r)
            pthread_mutex_unlock(&self._plock)
        pthread_mutex_unlock(&self._lock)
        self._check_live()

    def release(self):
        """Let go of the buffer; later calls raise ValueError.  Idempotent."""
        if not self._live:
            return
        self._enter_exclusive("release")
        cdef bint was_live
        # Mark the ring dead under the producer lock, without the GIL (see
        # reset()); once it is dead no producer touches the buffer, so the
        # buffer can be let go of afterwards, with the GIL.
        with nogil:
            pthread_mutex_lock(&self._plock)
            was_live = self._live
            self._live = False
            kc_ring_set_notifier(&self._r, -1, NULL)
            pthread_mutex_unlock(&self._plock)
        if was_live:
            PyBuffer_Release(&self._view)
        self._close_sleep_fd()
        pthread_mutex_unlock(&self._lock)

    def _sleep(self, int timeout_ms):
        """Sleep, without the GIL, until the notifier eventfd is readable or
        *timeout_ms* pass (-1: no limit); whether the ring then holds entries.

        False also after a signal (its handlers have run) and on a ring
        released meanwhile: the caller re-checks and decides.  True for a
        corrupted ring, so that the caller's next consumer call reports it.
        """
        cdef int rc, efd
        cdef uint32_t first, bad = 0
        self._check_live()
        efd = self._sleep_fd
        if efd < 0:
            raise ValueError("the ring has no notifier eventfd to sleep on")
        self._sleepers += 1
        with nogil:
            rc = kc_wait_readable(efd, timeout_ms)
        self._sleepers -= 1
        self._close_sleep_fd()
        if rc < 0:
            if errno != EINTR:
                PyErr_SetFromErrno(OSError)
            PyErr_CheckSignals()
            return False
        if not self._live:
            return False
        return kc_ring_begin(&self._r, &first, &bad) != 0

    def _share_notifier(self):
        """The notifier eventfd may now be held by other processes: check each of
        its reads and writes first (see kc_ring.efd_shared).  Idempotent."""
        kc_ring_share_efd(&self._r)

    def _dup_notifier_fd(self):
        """A new close-on-exec duplicate of the notifier eventfd; the caller closes it.

        For waiters that hand an fd to somebody else's poller (asyncio's
        add_reader): each registers its own number, which neither a
        concurrent CoalescedBuffer.close() nor another waiter's
        remove_reader can take away from under it.  Dups the ring's own
        duplicate, which only a GIL holder closes, so it is never a
        recycled number.
        """
        cdef int fd
        self._check_live()
        if self._sleep_fd < 0:
            raise ValueError("the ring has no notifier eventfd")
        fd = fcntl(self._sleep_fd, F_DUPFD_CLOEXEC, 0)
        if fd < 0:
            PyErr_SetFromErrno(OSError)
        return fd

    def _consuming_here(self):
        """Whether the calling thread is inside a consumer call (a consume handler)."""
        return self._owner == kc_thread_ident()

    def _release_after_fork(self):
        """In a forked child: release without the locks a parent thread may hold."""
        if self._live:
            self._live = False
            kc_ring_set_notifier(&self._r, -1, NULL)
            PyBuffer_Release(&self._view)
        self._forget_parent_threads()
        self._close_sleep_fd()

    def _forget_parent_threads(self):
        """In a forked child: the copied mutexes may be held, and the ring slept on,
        by threads of the parent's that do not exist here."""
        pthread_mutex_init(&self._plock, NULL)
        pthread_mutex_init(&self._lock, NULL)
        self._owner = 0
        self._sleepers = 0

    def __enter__(self):
        self._check_live()
        return self

    def __exit__(self, *exc_info):
        self.release()

    def push(self, phys_addr, data, *, pio=False):
        """Record a write as the kernel does; False if the kernel would refuse it."""
        cdef kc_entry e
        cdef int rc, err = 0
        cdef bint must_wake
        self._check_live()
        _fill_entry(&e, phys_addr, data, pio)
        rc = self.produce(&e, &must_wake)
        if rc == KC_PUSH_RELEASED:   # by the arguments' own code, or another thread
            self._check_live()
        if must_wake:
            with nogil:
                err = self.wake_consumer()
            check_wake(err)
        return rc == KC_PUSH_OK

    def push_many(self, records):
        """Push raw 24-byte records in order, each as the kernel would; how many it took."""
        cdef Py_buffer view
        cdef size_t n, bad_at, done = 0
        cdef int status = KC_OK, err = 0
        cdef uint32_t length = 0, pio = 0
        cdef bint must_wake = False
        self._check_live()
        _get_buffer(records, &view, "push_many()", writable=False)
        try:
            if view.len % KC_ENTRY_SIZE:
                raise ValueError(f"push_many() needs whole 24-byte records, not "
                                 f"{view.len} bytes")
            # Records read from the ring's own memory would read what this
            # call has just written there.
            if self._overlaps(view.buf, view.len):
                raise ValueError("push_many(): records overlap the ring's own memory")
            n = <size_t>view.len // KC_ENTRY_SIZE
            # Every record is checked before any is pushed: bad input pushes
            # nothing.  Pushing checks each again, on a private copy.
            if min(n, <size_t>self._r.max) * KC_ENTRY_SIZE <= _BATCH_WITH_GIL_BYTES:
                bad_at = kc_records_first_bad(view.buf, n, &length, &pio)
                if bad_at == n:
                    done = self.produce_many(view.buf, n, &status, &must_wake)
            else:
                with nogil:
                    bad_at = kc_records_first_bad(view.buf, n, &length, &pio)
                    if bad_at == n:
                        done = self.produce_many(view.buf, n, &status, &must_wake)
            if bad_at < n:
                raise ValueError(
                    f"push_many(): record {bad_at} has len={length} and pio={pio}; "
                    f"expected len 1 to {KC_MAX_DATA} and pio 0 or 1")
            if must_wake:
                with nogil:
                    err = self.wake_consumer()
        finally:
            PyBuffer_Release(&view)
        check_wake(err)
        if status < 0 and done == 0:
            # The caller changed the first record after it was checked.
            raise ValueError("push_many(): record 0 changed while it was pushed")
        # A later record changed meanwhile: those before it are in the ring,
        # and the count says so; a retry of the rest reports the bad one.
        return done

    cdef size_t produce_many(self, const void *records, size_t n, int *status,
                              bint *must_wake) noexcept nogil:
        """produce for a batch: one lock, one wakeup; returns how many were pushed."""
        cdef size_t done = 0
        must_wake[0] = False
        pthread_mutex_lock(&self._plock)
        if not self._live:
            status[0] = KC_PUSH_RELEASED
        else:
            done = kc_ring_push_records(&self._r, records, n, self._legacy, status)
            if done:
                kc_note_depth(&self._high_water, kc_ring_depth(&self._r))
                must_wake[0] = kc_ring_claim_wakeup(&self._r)
        pthread_mutex_unlock(&self._plock)
        return done

    cdef int produce_hold(self, uint32_t *room) noexcept nogil:
        cdef int rc
        pthread_mutex_lock(&self._plock)
        if not self._live:
            pthread_mutex_unlock(&self._plock)
            return KC_PUSH_RELEASED
        rc = kc_ring_room(&self._r, room)     # the modern full check, even on a legacy ring
        if rc != KC_OK:
            pthread_mutex_unlock(&self._plock)
        return rc

    cdef size_t produce_gathered(self, const unsigned char **runs, const uint32_t *lengths,
                                 size_t n, int *status, bint *must_wake) noexcept nogil:
        cdef size_t done = kc_ring_push_gather(&self._r, runs, lengths, n, status)
        if done:
            kc_note_depth(&self._high_water, kc_ring_depth(&self._r))
        must_wake[0] = kc_ring_claim_wakeup(&self._r) if done else False
        pthread_mutex_unlock(&self._plock)
        return done

    def pop(self):
        """Consume and return the oldest entry, or None if the ring is empty."""
        cdef uint32_t first, bad = 0
        cdef int rc
        cdef kc_entry e
        if not self._enter_consumer():
            return None
        try:
            if self._begin(1, &first) == 0:
                self._consumer_idle()
                return None
            rc = kc_ring_read(&self._r, first, &e, &bad)
            if rc != KC_OK:
                raise _corrupted(&self._r, rc, bad, first)
            entry = Entry._from(&e)
            kc_ring_publish_first(&self._r, kc_ring_next(&self._r, first))
            self._taken += 1
            self._passes += 1
            self._consumer_idle()
            return entry
        finally:
            self._exit_consumer()

    def drain(self, limit=None):
        """Consume and return the pending entries (at most *limit*), oldest first."""
        cdef Py_ssize_t n = _as_limit(limit), i
        cdef uint32_t first, idx, bad = 0
        cdef int rc
        cdef kc_entry e
        cdef list out = []
        if not self._enter_consumer():
            return out
        try:
            n = self._begin(n, &first)
            idx = first
            for i in range(n):
                rc = kc_ring_read(&self._r, idx, &e, &bad)
                if rc != KC_OK:
                    if i == 0:
                        raise _corrupted(&self._r, rc, bad, idx)
                    break  # deliver the good prefix; the next call raises
                out.append(Entry._from(&e))
                idx = kc_ring_next(&self._r, idx)
            if idx != first:
                kc_ring_publish_first(&self._r, idx)
                self._taken += len(out)
                self._passes += 1
            self._consumer_idle()
            return out
        finally:
            self._exit_consumer()

    def drain_into(self, out):
        """Copy pending entries into *out* as raw 24-byte records; returns how many."""
        cdef Py_buffer view
        cdef size_t done = 0, fits
        cdef int status = KC_OK
        cdef uint32_t bad = 0, bad_index = 0
        self._check_live()
        _get_buffer(out, &view, "drain_into()")
        try:
            # The batch is copied in one go, then checked where it landed:
            # that must be memory of the caller's, not the ring it reads.
            if self._overlaps(view.buf, view.len):
                raise ValueError("drain_into(): out overlaps the ring's own memory")
            if not self._enter_consumer():
                return 0
            try:
                fits = <size_t>self._routed_limit(view.len // KC_ENTRY_SIZE)
                if min(fits, <size_t>self._r.max - 1) * KC_ENTRY_SIZE <= _BATCH_WITH_GIL_BYTES:
                    # Releasing and retaking the GIL (about 60 ns here, and
                    # a wait of up to the switch interval when another thread
                    # takes it meanwhile) would cost more than the copy.
                    done = kc_ring_drain_into(&self._r, view.buf, fits,
                                              &status, &bad, &bad_index)
                else:
                    with nogil:
                        done = kc_ring_drain_into(&self._r, view.buf, fits,
                                                  &status, &bad, &bad_index)
                self._taken += done
                self._passes += done != 0
                self._consumer_idle()
            finally:
                self._exit_consumer()
        finally:
            PyBuffer_Release(&view)
        if done == 0 and status != KC_OK:
            raise _corrupted(&self._r, status, bad, bad_index)
        return done

    def consume(self, handler, limit=None):
        """Call ``handler(phys_addr, data, pio)`` for each pending entry, in order."""
        cdef Py_ssize_t n = _as_limit(limit), i
        cdef uint32_t first, idx, bad = 0
        cdef int rc
        cdef kc_entry e, prev
        # The handler is called through its vectorcall slot, looked up once:
        # per entry this is most of what consume() itself costs.  args[0] is
        # scratch space the callee may use (PY_VECTORCALL_ARGUMENTS_OFFSET).
        cdef PyObject *args[4]
        cdef PyObject *result
        cdef vectorcallfunc call
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__!r}")
        call = PyVectorcall_Function(<PyObject *>handler)
        args[0] = NULL
        if not self._enter_consumer():
            return 0
        try:
            n = self._begin(n, &first)
            idx = first
            addr = data = None
            for i in range(n):
                rc = kc_ring_read(&self._r, idx, &e, &bad)
                if rc != KC_OK:
                    raise _corrupted(&self._r, rc, bad, idx)
                # Chatty registers repeat their address, and often their value
                # (doorbells, fills): reuse the immutable int and bytes objects.
                if addr is None or e.phys_addr != prev.phys_addr:
                    addr = PyLong_FromUnsignedLongLong(e.phys_addr)
                if data is None or e.len != prev.len or memcmp(e.data, prev.data, KC_MAX_DATA):
                    data = PyBytes_FromStringAndSize(<const char *>e.data, e.len)
                prev = e
                # Consumed before the handler runs: a raising handler never
                # sees the same entry twice.
                idx = kc_ring_next(&self._r, idx)
                kc_ring_publish_first(&self._r, idx)
                self._taken += 1
                args[1] = <PyObject *>addr
                args[2] = <PyObject *>data
                args[3] = Py_True if e.pio else Py_False
                if call != NULL:
                    result = call(<PyObject *>handler, &args[1], 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL)
                else:
                    result = PyObject_Vectorcall(<PyObject *>handler, &args[1],
                                                 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL)
                if result == NULL:
                    _propagate()
                Py_DECREF(<object>result)
            self._passes += n != 0
            self._consumer_idle()
            return n
        finally:
            self._exit_consumer()

    def __iter__(self):
        self._check_live()
        return self

    def __next__(self):
        entry = self.pop()
        if entry is None:
            raise StopIteration
        return entry

