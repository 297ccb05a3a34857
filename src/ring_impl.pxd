# Cython view of ring_impl.h: names only, the layout comes from <linux/kvm.h>.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cdef extern from "ring_impl.h" nogil:
    ctypedef struct kc_entry:
        uint64_t phys_addr
        uint32_t len
        uint32_t pio
        uint8_t data[8]

    ctypedef struct kc_ring:
        unsigned char *base
        uint32_t max
        int efd
        int efd_shared

    size_t KC_ENTRY_SIZE
    size_t KC_HEADER_SIZE
    size_t KC_MIN_RING_BYTES
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

    int kc_ring_init(kc_ring *r, void *base, size_t nbytes)
    int kc_ring_push(const kc_ring *r, uint64_t phys_addr, const void *data, uint32_t len,
                     uint32_t pio, int legacy_full_check)
    size_t kc_ring_drain_into(const kc_ring *r, void *out, size_t n, int *status,
                              uint32_t *bad, uint32_t *bad_index)
    void kc_ring_reset(const kc_ring *r)
    void kc_ring_set_notifier(kc_ring *r, int efd, uint32_t *signaled)
    void kc_ring_share_efd(kc_ring *r)

    ctypedef struct kc_grace:
        int epoch
    int kc_grace_enter(kc_grace *g)
    void kc_grace_exit(kc_grace *g, int idx)
    int kc_grace_flip(kc_grace *g)
    int kc_grace_done(kc_grace *g, int old)
    int kc_ring_claim_wakeup(const kc_ring *r)
    int kc_ring_signal(const kc_ring *r)
    int kc_ring_notify_producer(const kc_ring *r)
    int kc_ring_notify_consumer_idle(const kc_ring *r)
    int kc_wait_readable(int efd, int timeout_ms)
    size_t kc_records_first_bad(const void *records, size_t n, uint32_t *len, uint32_t *pio)
    size_t kc_ring_push_records(const kc_ring *r, const void *records, size_t n,
                                int legacy_full_check, int *status)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_trylock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
