# The C-level interface of kvmcoal._ring, for other Cython code:
#
#     from kvmcoal._ring cimport Ring, kc_entry
#
# compiled with include_dirs=[kvmcoal.get_include()] (ring_impl.h lives there).
# The first part is the Cython view of ring_impl.h (names only: the layout
# comes from <linux/kvm.h>); the second declares the Ring and Entry types.
cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cdef extern from "ring_impl.h" nogil:
    ctypedef struct kc_entry:
        uint64_t phys_addr
        uint32_t len
        uint32_t pio
        uint8_t data[8]

    ctypedef struct kc_pending:
        uint32_t any
        uint64_t bits[1]      # KC_PENDING_BITS / 64 words

    enum: KC_PENDING_BITS
    void kc_pending_mark(kc_pending *p, uint32_t bit)
    int kc_pending_take_any(kc_pending *p)
    int kc_pending_maybe(const kc_pending *p)
    uint64_t kc_pending_take_word(kc_pending *p, uint32_t word)
    void kc_pending_restore(kc_pending *p, uint32_t word, uint64_t bits)

    ctypedef struct kc_ring:
        unsigned char *base
        uint32_t max
        int efd
        int efd_shared
        int64_t (*route)(void *ctx, int move) noexcept nogil
        void *route_ctx
        kc_pending *pending
        uint32_t pending_bit

    size_t KC_ENTRY_SIZE
    size_t KC_HEADER_SIZE
    size_t KC_MIN_RING_NBYTES
    size_t KC_MAX_DATA
    uint32_t KC_MAX_SLOTS

    enum kc_status:
        KC_OK
        KC_E_TOO_SMALL
        KC_E_TOO_LARGE
        KC_E_MISALIGNED
        KC_E_BAD_FIRST
        KC_E_BAD_LAST
        KC_E_BAD_LEN
        KC_E_BAD_PIO

    enum kc_push_result:
        KC_PUSH_OK
        KC_PUSH_FULL
        KC_PUSH_BAD_LAST
        KC_PUSH_RELEASED

    uint64_t kc_ring_max_for(size_t nbytes)
    uint32_t kc_ring_peek_first(const kc_ring *r)
    uint32_t kc_ring_peek_last(const kc_ring *r)
    int64_t kc_ring_begin(const kc_ring *r, uint32_t *first, uint32_t *bad)
    int kc_ring_read(const kc_ring *r, uint32_t idx, kc_entry *out, uint32_t *bad)
    void kc_ring_publish_first(const kc_ring *r, uint32_t first)
    uint32_t kc_ring_next(const kc_ring *r, uint32_t idx)
    uint64_t kc_entry_value(const kc_entry *e)
    void kc_note_depth(uint32_t *high_water, uint32_t depth)
    uint32_t kc_ring_depth(const kc_ring *r)

    int kc_ring_init(kc_ring *r, void *base, size_t nbytes)
    int kc_ring_push(const kc_ring *r, uint64_t phys_addr, const void *data, uint32_t len,
                     uint32_t pio, int legacy_full_check)
    size_t kc_ring_drain_into(const kc_ring *r, void *out, size_t n, int *status,
                              uint32_t *bad, uint32_t *bad_index)
    void kc_ring_reset(const kc_ring *r)
    void kc_ring_set_notifier(kc_ring *r, int efd, uint32_t *signaled)
    void kc_ring_share_efd(kc_ring *r)

    int kc_ring_claim_wakeup(const kc_ring *r)
    int kc_ring_signal(const kc_ring *r)
    int kc_ring_notify_producer(const kc_ring *r)
    int kc_ring_signalled(const kc_ring *r)
    void kc_ring_set_pending(kc_ring *r, kc_pending *p, uint32_t bit)
    int kc_ring_notify_consumer_idle(const kc_ring *r, int force)
    int kc_wait_readable(int efd, int timeout_ms)
    size_t kc_records_first_bad(const void *records, size_t n, uint32_t *len, uint32_t *pio)
    void kc_record_fields(const unsigned char *rec, uint32_t *len, uint32_t *pio)
    uint32_t kc_fields_bad(uint32_t len, uint32_t pio)
    size_t kc_ring_push_records(const kc_ring *r, const void *records, size_t n,
                                int legacy_full_check, int *status)
    int kc_ring_room(const kc_ring *r, uint32_t *room)
    size_t kc_ring_push_gather(const kc_ring *r, const unsigned char *const *runs,
                               const uint32_t *lengths, size_t n, int *status)

# PyThread_get_thread_ident needs no GIL (it is pthread_self); Cython's
# declaration says otherwise.
cdef extern from "pythread.h" nogil:
    unsigned long kc_thread_ident "PyThread_get_thread_ident" ()

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_trylock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)


# Argument checks shared with the other extensions (they raise TypeError or
# ValueError naming *what*).
cdef object _index(object value, str what, str also=*)
cdef uint64_t _as_u64(object value, str what) except? 0xFFFFFFFFFFFFFFFF
cdef int _get_buffer(object obj, Py_buffer *view, str what, bint writable=*) except -1
# Validate a write given from Python (phys_addr, data, pio) and build its record.
cdef int _fill_entry(kc_entry *e, object phys_addr, object data, object pio) except -1
# The RingCorruptedError for a consumer's kc_status (bad: the value, index: the slot).
cdef object _corrupted(const kc_ring *r, int status, uint32_t bad, uint32_t index)
# Raise OSError for a failed wake_consumer() (err is -errno; 0 is success).
cdef int check_wake(int err) except -1


@cython.final
cdef class Entry:
    cdef kc_entry _e
    # Set once the entry holds a write: __init__ called again must not
    # change an entry that may already be a dict key or in a set.
    cdef bint _made

    @staticmethod
    cdef Entry _from(const kc_entry *e)


@cython.final
cdef class Ring:
    cdef kc_ring _r
    cdef Py_buffer _view
    cdef object __weakref__   # a device model may hold its ring weakly, as it can the twin's
    cdef bint _live
    cdef bint _legacy
    cdef Py_ssize_t _nbytes
    # Serializes consumers; _owner tells a nested call from another thread's.
    # A pthread mutex: its uncontended trylock/unlock cost a fraction of a
    # PyThread lock's, and drain_into() of a one-page ring is ~0.3 µs in all.
    cdef pthread_mutex_t _lock
    cdef unsigned long _owner
    # The producer side's lock, the kernel's per-ring spinlock: push() and
    # EmulatedVm.write (which runs without the GIL) take it.
    cdef pthread_mutex_t _plock
    # _sleep() polls a duplicate of the notifier eventfd that the ring owns,
    # so that CoalescedBuffer.close() in another thread can close its own fd
    # while a consumer sleeps without that number being reused under it; the
    # last sleeper out of a released ring closes it.  Both fields change
    # only with the GIL held.
    cdef int _sleep_fd
    cdef int _sleepers
    cdef bint _initialising
    # Statistics (Ring._stats()): the most entries seen pending at once, by
    # a producer of this process after a push or by a consumer call at its
    # start; how many entries consumer calls have taken out, and in how many calls.
    cdef uint32_t _high_water
    cdef uint64_t _taken
    cdef uint64_t _passes      # consumer calls that took entries

    cdef int _init(self, buffer, nbytes, legacy_full_check) except -1
    cdef bint _overlaps(self, const void *buf, Py_ssize_t n)
    cdef int _check_live(self) except -1

    # The consumer side.  _enter_consumer takes the consumer lock (1), or
    # says the call is nested in a handler of this thread's (0: deliver
    # nothing); _begin is every consumer call's start, under that lock.
    cdef int _enter_consumer(self) except -1
    # The same without the GIL, for C callers (the router): 1 taken, 0 nested
    # (this thread holds it), -1 released.  Leave with _exit_consumer.
    cdef int _enter_consumer_nogil(self) noexcept nogil
    cdef void _exit_consumer(self) noexcept nogil
    cdef Py_ssize_t _begin(self, Py_ssize_t limit, uint32_t *first) except -1
    cdef Py_ssize_t _routed_limit(self, Py_ssize_t limit) noexcept
    cdef int64_t _begin_unrouted(self, uint32_t *first) except -1
    # On leaving the ring empty: clear the wakeup (the eventfd is read only
    # if it was signalled, unless *force*: a consumer about to sleep).
    cdef int _consumer_idle(self, bint force=*) except -1
    # Join the pending set *p* as bit *bit* (NULL: leave it); see kc_pending.
    cdef void _join_pending(self, kc_pending *p, uint32_t bit) noexcept

    # The producer side, callable without the GIL: produce pushes one
    # entry under the producer lock (a kc_push_result, or KC_PUSH_RELEASED)
    # and says whether the consumer must be woken; wake_consumer wakes it (call it
    # without the GIL: the consumer that wakes needs it).
    cdef int produce(self, const kc_entry *e, bint *must_wake) noexcept nogil
    cdef size_t produce_many(self, const void *records, size_t n, int *status,
                              bint *must_wake) noexcept nogil
    cdef int wake_consumer(self) noexcept nogil
    # A producer that holds the ring across a batch it gathers (the router):
    # produce_hold takes the producer lock and says how many entries fit
    # (KC_OK), or releases it and returns KC_PUSH_RELEASED or
    # KC_PUSH_BAD_LAST; produce_gathered pushes the gathered records,
    # as n runs of adjacent raw records whose len and pio the caller checked
    # (no more than fit in all), claims
    # the wakeup and lets go of the lock; it returns how many records went in.
    cdef int produce_hold(self, uint32_t *room) noexcept nogil
    cdef size_t produce_gathered(self, const unsigned char **runs, const uint32_t *lengths,
                                 size_t n, int *status, bint *must_wake) noexcept nogil

    cdef void _close_sleep_fd(self)
    cdef int _enter_exclusive(self, str what) except -1
