/*
 * ring_impl.c - producer and batch consumer of the KVM coalesced MMIO ring.
 * See ring_impl.h for the rules every function here keeps.
 */
#include "ring_impl.h"

#include <errno.h>
#include <unistd.h>

int kc_ring_init(kc_ring *r, void *base, size_t nbytes)
{
    uint64_t max = kc_ring_max_for(nbytes);

    if (max == 0)
        return KC_E_TOO_SMALL;
    if (max > KC_MAX_SLOTS)
        return KC_E_TOO_LARGE;
    /* The indices are accessed atomically, which needs natural alignment. */
    if ((uintptr_t)base % _Alignof(uint32_t) != 0)
        return KC_E_MISALIGNED;
    r->base = base;
    r->max = (uint32_t)max;
    r->efd = -1;
    r->signaled = NULL;
    return KC_OK;
}

static int kc_ring_full(const kc_ring *r, uint32_t insert, uint32_t first, int legacy)
{
    if (legacy) {
        /*
         * Before Linux 6.12 coalesced_mmio_has_room() computed the free space
         * as (first - last - 1) % MAX in unsigned 32-bit arithmetic; the
         * wraparound of first - last - 1 is not a multiple of MAX, so e.g. a
         * 170-slot ring starting at 0 looked full after 85 entries.
         */
        return (uint32_t)(first - insert - 1) % r->max == 0;
    }
    return (insert + 1) % r->max == first;
}

int kc_ring_push(const kc_ring *r, uint64_t phys_addr, const void *data, uint32_t len,
                 uint32_t pio, int legacy_full_check)
{
    kc_entry e;
    /* last is ours, but anyone with the mapping may have scribbled on it. */
    uint32_t insert = __atomic_load_n(kc_last_ptr(r), __ATOMIC_RELAXED);
    /*
     * Acquire pairs with the consumer's release of first: its reads of the
     * slot we are about to reuse happen before our writes to it.  first is
     * only compared, never used as an index, so a bad value cannot hurt us.
     */
    uint32_t first = __atomic_load_n(kc_first_ptr(r), __ATOMIC_ACQUIRE);

    if (insert >= r->max)
        return KC_PUSH_BAD_LAST;
    if (kc_ring_full(r, insert, first, legacy_full_check))
        return KC_PUSH_FULL;

    memset(&e, 0, sizeof e);
    e.phys_addr = phys_addr;
    e.len = len;
    e.pio = pio;
    memcpy(e.data, data, len);
    memcpy(kc_slot(r, insert), &e, KC_ENTRY_SIZE);
    /* The entry is complete before last moves past it (the kernel's smp_wmb). */
    __atomic_store_n(kc_last_ptr(r), kc_ring_next(r, insert), __ATOMIC_RELEASE);
    return KC_PUSH_OK;
}

size_t kc_ring_drain_into(const kc_ring *r, void *out, size_t n, int *status,
                          uint32_t *bad, uint32_t *bad_index)
{
    /* out is any caller buffer, so records go through an aligned local. */
    unsigned char *dst = out;
    kc_entry e;
    uint32_t first, idx;
    int64_t pending = kc_ring_begin(r, &first, bad);
    size_t done;

    *status = KC_OK;
    if (pending < 0) {
        *status = (int)pending;
        *bad_index = 0;
        return 0;
    }
    if ((uint64_t)pending < n)
        n = (size_t)pending;
    idx = first;
    for (done = 0; done < n; done++) {
        int rc = kc_ring_read(r, idx, &e, bad);
        if (rc != KC_OK) {
            *status = rc;
            *bad_index = idx;
            break;
        }
        memcpy(dst + done * KC_ENTRY_SIZE, &e, KC_ENTRY_SIZE);
        idx = kc_ring_next(r, idx);
    }
    if (done)
        kc_ring_publish_first(r, idx);
    return done;
}

void kc_ring_reset(const kc_ring *r)
{
    __atomic_store_n(kc_first_ptr(r), 0, __ATOMIC_RELAXED);
    __atomic_store_n(kc_last_ptr(r), 0, __ATOMIC_RELEASE);
}

void kc_ring_set_notifier(kc_ring *r, int efd, uint32_t *signaled)
{
    r->efd = signaled ? efd : -1;
    r->signaled = efd >= 0 ? signaled : NULL;
}

int kc_ring_claim_wakeup(const kc_ring *r)
{
    uint32_t expected = 0;

    if (r->efd < 0)
        return 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(r->signaled, __ATOMIC_RELAXED) != 0)
        return 0;
    return __atomic_compare_exchange_n(r->signaled, &expected, 1, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_RELAXED);
}

int kc_ring_signal(const kc_ring *r)
{
    uint64_t one = 1;

    while (write(r->efd, &one, sizeof one) < 0) {
        if (errno != EINTR)
            return -1;
    }
    return 0;
}

int kc_ring_notify_producer(const kc_ring *r)
{
    return kc_ring_claim_wakeup(r) ? kc_ring_signal(r) : 0;
}

int kc_ring_notify_consumer_idle(const kc_ring *r)
{
    uint64_t count;

    if (r->efd < 0)
        return 0;
    while (read(r->efd, &count, sizeof count) < 0) {
        if (errno == EAGAIN)
            break;
        if (errno != EINTR)
            return -1;
    }
    __atomic_store_n(r->signaled, 0, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (kc_ring_peek_first(r) != kc_ring_peek_last(r))
        return kc_ring_notify_producer(r);
    return 0;
}
