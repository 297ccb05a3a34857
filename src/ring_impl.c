/*
 * ring_impl.c - producer and batch consumer of the KVM coalesced MMIO ring.
 * See ring_impl.h for the rules every function here keeps.
 */
#include "ring_impl.h"

#include <errno.h>
#include <poll.h>
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
    r->efd_shared = 0;
    r->route = NULL;
    r->route_ctx = NULL;
    r->pending = NULL;
    r->pending_bit = 0;
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

static size_t kc_push_records_one_by_one(const kc_ring *r, const unsigned char *src, size_t n,
                                         int legacy_full_check, int *status)
{
    uint32_t bad;
    size_t done;

    *status = KC_OK;
    for (done = 0; done < n; done++) {
        kc_entry e;
        /* A private copy: what is checked is what is pushed. */
        memcpy(&e, src + done * KC_ENTRY_SIZE, KC_ENTRY_SIZE);
        *status = kc_check_copy(e.len, e.pio, &bad);
        if (*status != KC_OK)
            break;
        *status = kc_ring_push(r, e.phys_addr, e.data, e.len, e.pio, legacy_full_check);
        if (*status != KC_PUSH_OK)
            break;
    }
    return done;
}

size_t kc_ring_push_records(const kc_ring *r, const void *records, size_t n,
                            int legacy_full_check, int *status)
{
    const unsigned char *src = records;
    uint32_t insert = __atomic_load_n(kc_last_ptr(r), __ATOMIC_RELAXED);
    uint32_t first = __atomic_load_n(kc_first_ptr(r), __ATOMIC_ACQUIRE);
    uint32_t room, len, pio, bad;
    size_t take, head, i;

    /*
     * The old full check, and a first that is out of range (which the
     * kernel only compares: it never stops a push), keep the exact
     * record-by-record semantics.  Otherwise: one copy of as many records
     * as fit, checked where they landed, past last (no consumer reads
     * there yet), and one publication of last.
     */
    if (insert >= r->max) {
        *status = KC_PUSH_BAD_LAST;
        return 0;
    }
    if (legacy_full_check || first >= r->max)
        return kc_push_records_one_by_one(r, src, n, legacy_full_check, status);
    room = first > insert ? first - insert - 1 : r->max - 1 - (insert - first);
    take = n < room ? n : room;
    head = r->max - insert;
    if (head > take)
        head = take;
    /* memmove: a caller may hand over records that overlap the ring. */
    memmove(kc_slot(r, insert), src, head * KC_ENTRY_SIZE);
    memmove(kc_slot(r, 0), src + head * KC_ENTRY_SIZE, (take - head) * KC_ENTRY_SIZE);
    *status = take < n ? KC_PUSH_FULL : KC_OK;
    for (i = 0; i < take; i++) {
        unsigned char *slot = kc_slot(r, i < head ? insert + (uint32_t)i : (uint32_t)(i - head));
        kc_record_fields(slot, &len, &pio);
        if (__builtin_expect(kc_fields_bad(len, pio), 0)) {
            *status = kc_check_copy(len, pio, &bad);
            take = i;
            break;
        }
        /* As kc_ring_push leaves them: no stale bytes past len. */
        kc_mask_data(slot + offsetof(kc_entry, data), len);
    }
    __atomic_store_n(kc_last_ptr(r), (uint32_t)((insert + take) % r->max), __ATOMIC_RELEASE);
    return take;
}

int kc_ring_room(const kc_ring *r, uint32_t *room)
{
    uint32_t insert = __atomic_load_n(kc_last_ptr(r), __ATOMIC_RELAXED);
    uint32_t first = __atomic_load_n(kc_first_ptr(r), __ATOMIC_ACQUIRE);

    if (insert >= r->max)
        return KC_PUSH_BAD_LAST;
    if (first >= r->max)          /* never full to the kernel's check: a ring's worth */
        *room = r->max - 1;
    else
        *room = first > insert ? first - insert - 1 : r->max - 1 - (insert - first);
    return KC_OK;
}

size_t kc_ring_push_gather(const kc_ring *r, const unsigned char *const *runs,
                           const uint32_t *lengths, size_t n, int *status)
{
    uint32_t insert = __atomic_load_n(kc_last_ptr(r), __ATOMIC_RELAXED);
    uint32_t room, head;
    size_t i, total = 0, take;

    *status = kc_ring_room(r, &room);
    if (*status != KC_OK)
        return 0;
    for (i = 0; i < n && total < room; i++) {
        take = lengths[i];
        if (take > room - total) {
            take = room - total;
            *status = KC_PUSH_FULL;
        }
        if (take == 1) {                  /* interleaved devices: runs of one, inlined */
            memcpy(kc_slot(r, insert), runs[i], KC_ENTRY_SIZE);
            insert = kc_ring_next(r, insert);
            total += 1;
            continue;
        }
        head = r->max - insert;           /* the slots up to the ring's end */
        if (head > take)
            head = (uint32_t)take;
        memcpy(kc_slot(r, insert), runs[i], (size_t)head * KC_ENTRY_SIZE);
        memcpy(kc_slot(r, 0), runs[i] + (size_t)head * KC_ENTRY_SIZE,
               (take - head) * KC_ENTRY_SIZE);
        insert = (uint32_t)((insert + take) % r->max);
        total += take;
    }
    if (i < n)
        *status = KC_PUSH_FULL;
    __atomic_store_n(kc_last_ptr(r), insert, __ATOMIC_RELEASE);
    return total;
}

size_t kc_records_first_bad(const void *records, size_t n, uint32_t *len, uint32_t *pio)
{
    const unsigned char *src = records;
    size_t i;

    for (i = 0; i < n; i++) {
        kc_record_fields(src + i * KC_ENTRY_SIZE, len, pio);
        if (kc_fields_bad(*len, *pio))
            break;
    }
    return i;
}

size_t kc_ring_drain_into(const kc_ring *r, void *out, size_t n, int *status,
                          uint32_t *bad, uint32_t *bad_index)
{
    unsigned char *dst = out;
    uint32_t first;
    uint64_t any_bad = 0;
    int64_t pending = kc_ring_begin(r, &first, bad);
    size_t head, done;

    *status = KC_OK;
    if (pending < 0) {
        *status = (int)pending;
        *bad_index = 0;
        return 0;
    }
    if ((uint64_t)pending < n)
        n = (size_t)pending;
    if (n == 0)
        return 0;
    /*
     * The pending slots go to the caller's buffer in one copy (two when they
     * wrap), and are validated there: that buffer is private, so what is
     * checked is what the caller gets, whatever the producer writes into the
     * shared page meanwhile.  Copying slot by slot through a local and
     * checking each on the way cost four times the bare copy.
     */
    head = r->max - first;
    if (head > n)
        head = n;
    /* out must not overlap the ring: Ring.drain_into refuses such a buffer. */
    memcpy(dst, kc_slot(r, first), head * KC_ENTRY_SIZE);
    if (n > head)
        memcpy(dst + head * KC_ENTRY_SIZE, kc_slot(r, 0), (n - head) * KC_ENTRY_SIZE);
    /*
     * Check and mask every copy without a branch per entry; only a batch
     * with a bad entry in it goes round again to find the first one.
     */
    for (done = 0; done < n; done++) {
        unsigned char *rec = dst + done * KC_ENTRY_SIZE;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        /*
         * len and pio side by side, in one load: len - 1 in the low half
         * must be below 8 and pio in the high half below 2, so no bit of the
         * mask below may be set in (len | pio << 32) - 1 (len 0 borrows
         * all of the low half).
         */
        uint64_t len_pio;
        memcpy(&len_pio, rec + offsetof(kc_entry, len), sizeof len_pio);
        any_bad |= (len_pio - 1) & 0xfffffffefffffff8ull;
        kc_mask_data(rec + offsetof(kc_entry, data), (uint32_t)len_pio);
#else
        uint32_t len, pio;
        kc_record_fields(rec, &len, &pio);
        any_bad |= kc_fields_bad(len, pio);
        kc_mask_data(rec + offsetof(kc_entry, data), len);
#endif
    }
    if (any_bad) {
        for (done = 0; done < n; done++) {
            unsigned char *rec = dst + done * KC_ENTRY_SIZE;
            uint32_t len, pio;
            int rc;
            kc_record_fields(rec, &len, &pio);
            rc = kc_check_copy(len, pio, bad);
            if (rc != KC_OK) {
                *status = rc;
                *bad_index = (uint32_t)((first + done) % r->max);
                /* Undelivered copies, the corrupt one first, never reach the caller. */
                memset(rec, 0, (n - done) * KC_ENTRY_SIZE);
                break;
            }
        }
    }
    if (done)
        kc_ring_publish_first(r, (uint32_t)((first + done) % r->max));
    return done;
}

void kc_ring_reset(const kc_ring *r)
{
    __atomic_store_n(kc_first_ptr(r), 0, __ATOMIC_RELAXED);
    __atomic_store_n(kc_last_ptr(r), 0, __ATOMIC_RELEASE);
}

void kc_ring_share_efd(kc_ring *r)
{
    __atomic_store_n(&r->efd_shared, 1, __ATOMIC_RELAXED);
}

void kc_ring_set_notifier(kc_ring *r, int efd, uint32_t *signaled)
{
    r->efd = signaled ? efd : -1;
    r->signaled = efd >= 0 ? signaled : NULL;
}

int kc_ring_claim_wakeup(const kc_ring *r)
{
    uint32_t expected = 0;
    kc_pending *p = __atomic_load_n(&r->pending, __ATOMIC_ACQUIRE);

    if (r->efd < 0 && !p)
        return 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    /* The pending set is marked on every push, whatever the shared word
     * says: a peer that scribbles on it must not hide entries from a
     * flush.  The fence above orders the push before the look at the bit
     * (see kc_pending_note). */
    if (p)
        kc_pending_note(p, __atomic_load_n(&r->pending_bit, __ATOMIC_RELAXED));
    if (r->efd < 0)
        return 0;
    if (__atomic_load_n(r->signaled, __ATOMIC_RELAXED) != 0)
        return 0;
    return __atomic_compare_exchange_n(r->signaled, &expected, 1, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_RELAXED);
}

void kc_ring_set_pending(kc_ring *r, kc_pending *p, uint32_t bit)
{
    __atomic_store_n(&r->pending_bit, bit, __ATOMIC_RELAXED);
    __atomic_store_n(&r->pending, p, __ATOMIC_RELEASE);
}

/* The eventfd's O_NONBLOCK belongs to its open file description, which every
 * process sharing the buffer holds: a peer can clear it.  So once the fd is
 * shared neither side relies on it.  Each checks with a zero-timeout poll
 * that its read or write cannot block, and otherwise skips it: a counter
 * too full to write is readable already (the consumer will wake), and one
 * with nothing to read has nothing to clear.  1: go ahead. */
static int kc_efd_ready(const kc_ring *r, short events)
{
    struct pollfd p = {.fd = r->efd, .events = events};
    int rc;

    if (!__atomic_load_n(&r->efd_shared, __ATOMIC_RELAXED))
        return 1;
    while ((rc = poll(&p, 1, 0)) < 0) {
        if (errno != EINTR)
            return -1;
    }
    return rc > 0 && (p.revents & events);
}

int kc_ring_signal(const kc_ring *r)
{
    uint64_t one = 1;
    int ready = kc_efd_ready(r, POLLOUT);

    if (ready <= 0)
        return ready;
    while (write(r->efd, &one, sizeof one) < 0) {
        if (errno == EAGAIN)        /* filled meanwhile: readable, as a signal needs */
            return 0;
        if (errno != EINTR)
            return -1;
    }
    return 0;
}

int kc_ring_notify_producer(const kc_ring *r)
{
    return kc_ring_claim_wakeup(r) ? kc_ring_signal(r) : 0;
}

int kc_ring_notify_consumer_idle(const kc_ring *r, int force)
{
    uint64_t count;

    if (r->efd < 0)
        return 0;
    /* Not signalled since the last clear: the eventfd holds nothing to read. */
    if (!force && __atomic_load_n(r->signaled, __ATOMIC_SEQ_CST) == 0)
        return 0;
    switch (kc_efd_ready(r, POLLIN)) {
    case -1:
        return -1;
    case 1:
        while (read(r->efd, &count, sizeof count) < 0) {
            if (errno == EAGAIN)
                break;
            if (errno != EINTR)
                return -1;
        }
    }
    __atomic_store_n(r->signaled, 0, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (kc_ring_peek_first(r) != kc_ring_peek_last(r))
        return kc_ring_notify_producer(r);
    return 0;
}

int kc_wait_readable(int efd, int timeout_ms)
{
    struct pollfd p = {.fd = efd, .events = POLLIN};
    int rc = poll(&p, 1, timeout_ms);

    if (rc < 0)
        return -1;
    return rc > 0;
}
