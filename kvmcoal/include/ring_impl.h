/*
 * ring_impl.h - the KVM coalesced MMIO/PIO ring, without any Python.
 *
 * The layout is the kernel's (struct kvm_coalesced_mmio_ring from
 * <linux/kvm.h>); only the number of slots is ours, derived from the length
 * of the memory the ring lives in, because the uapi KVM_COALESCED_MMIO_MAX
 * needs the kernel's PAGE_SIZE and userspace must not assume 4 KiB.
 *
 * Both indices live in memory that another party may write at any moment
 * (the kernel, a producer process, or a hostile one).  Every value read from
 * the ring is therefore loaded once into a local and validated before it is
 * used as an index or a length; entries are copied out before they are
 * checked, so a concurrent writer cannot change what was validated.
 *
 * Small consumer helpers are static inline so the Cython hot loops inline
 * them; the batch loops and the producer live in ring_impl.c.
 */
#ifndef KVMCOAL_RING_IMPL_H
#define KVMCOAL_RING_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <linux/kvm.h>

typedef struct kvm_coalesced_mmio kc_entry;

#define KC_ENTRY_SIZE       (sizeof(struct kvm_coalesced_mmio))
#define KC_HEADER_SIZE      (offsetof(struct kvm_coalesced_mmio_ring, coalesced_mmio))
/* Two slots: one always stays empty, so a smaller ring could hold no entry. */
#define KC_MIN_RING_NBYTES   (KC_HEADER_SIZE + 2 * KC_ENTRY_SIZE)
#define KC_MAX_DATA         (sizeof(((kc_entry *)0)->data))
/* Index arithmetic is 32-bit, like the kernel's. */
#define KC_MAX_SLOTS        UINT32_MAX

_Static_assert(sizeof(struct kvm_coalesced_mmio) == 24, "ABI: entry is 24 bytes");
_Static_assert(offsetof(struct kvm_coalesced_mmio_ring, coalesced_mmio) == 8,
               "ABI: entries start at offset 8");
_Static_assert(offsetof(struct kvm_coalesced_mmio, data) == 16, "ABI: data at 16");

/* Status codes shared by the C functions; 0 is success. */
enum kc_status {
    KC_OK = 0,
    /* kc_ring_init */
    KC_E_TOO_SMALL = -1,      /* fewer than KC_MIN_RING_NBYTES */
    KC_E_TOO_LARGE = -2,      /* more than KC_MAX_SLOTS slots */
    KC_E_MISALIGNED = -3,     /* indices would not be 4-byte aligned */
    /* consumer: the shared memory holds something the kernel never writes */
    KC_E_BAD_FIRST = -10,
    KC_E_BAD_LAST = -11,
    KC_E_BAD_LEN = -12,
    KC_E_BAD_PIO = -13,
};

/* Producer results: the kernel either records the write or refuses it. */
enum kc_push_result {
    KC_PUSH_OK = 0,
    KC_PUSH_FULL = 1,         /* (last + 1) % max == first */
    KC_PUSH_BAD_LAST = 2,     /* last >= max: refused since CVE-2019-14821 */
    KC_PUSH_RELEASED = 3,     /* the Python Ring was released (never from kc_ring_push) */
};

/*
 * A set of rings that say when they hold entries, without a system call and
 * without being scanned (a Bus with hundreds of per-device buffers): after
 * every push (a full fence after publishing `last`) a producer looks at the
 * ring's bit and, if it is clear, sets it and `any`.  The consumer
 * exchanges `any`, then each word, with 0 and drains the rings whose bits
 * were set; a ring it leaves non-empty it marks again itself.  A producer
 * that finds the bit set skips: the consumer has not taken it yet, so its
 * later drain sees the entry (store-buffering: the fence against the
 * consumer's exchange).  Producers of one ring hold its lock, so the one
 * that set the bit set `any` before the next could look.  Process-local: a
 * producer in another process (or through a second Ring over the same
 * memory) wakes the ring's eventfd but sets no bit.
 */
#define KC_PENDING_BITS 2048
typedef struct kc_pending {
    uint32_t any;
    uint64_t bits[KC_PENDING_BITS / 64];
} kc_pending;

static inline void kc_pending_mark(kc_pending *p, uint32_t bit)
{
    __atomic_fetch_or(&p->bits[bit / 64], (uint64_t)1 << (bit % 64), __ATOMIC_SEQ_CST);
    __atomic_store_n(&p->any, 1, __ATOMIC_SEQ_CST);
}

/* The producer's look after a push: set the bit (and `any`) unless it is set. */
static inline void kc_pending_note(kc_pending *p, uint32_t bit)
{
    uint64_t mask = (uint64_t)1 << (bit % 64);
    if (!(__atomic_load_n(&p->bits[bit / 64], __ATOMIC_SEQ_CST) & mask))
        kc_pending_mark(p, bit);
}

/* The consumer's side: take `any`, then a word's bits, clearing them. */
static inline int kc_pending_take_any(kc_pending *p)
{
    return __atomic_exchange_n(&p->any, 0, __ATOMIC_SEQ_CST) != 0;
}

static inline int kc_pending_maybe(const kc_pending *p)
{
    return __atomic_load_n(&p->any, __ATOMIC_SEQ_CST) != 0;
}

static inline uint64_t kc_pending_take_word(kc_pending *p, uint32_t word)
{
    return __atomic_exchange_n(&p->bits[word], 0, __ATOMIC_SEQ_CST);
}

/* Put back bits a consumer took but did not get to (it raised). */
static inline void kc_pending_restore(kc_pending *p, uint32_t word, uint64_t bits)
{
    if (bits)
        __atomic_fetch_or(&p->bits[word], bits, __ATOMIC_SEQ_CST);
    __atomic_store_n(&p->any, 1, __ATOMIC_SEQ_CST);
}

typedef struct kc_ring {
    unsigned char *base;      /* struct kvm_coalesced_mmio_ring, maybe unaligned past 4 */
    uint32_t max;             /* slots; at most max - 1 entries are pending */
    /*
     * Optional wakeup notifier (see "Wakeups" below): an eventfd that is
     * readable while the ring holds entries, and a word in shared memory
     * that says whether it has been (or is being) signalled.  efd < 0: none.
     */
    int efd;
    uint32_t *signaled;
    /*
     * Set once the eventfd may be held by another process (its fds were
     * handed out): its O_NONBLOCK, shared by every holder, can no longer be
     * trusted, and each read or write of it is checked first (one poll()).
     * A peer racing to fill the counter between that check and the write
     * can still block the write: the check narrows the hazard to that
     * race, it cannot close it (eventfd has no per-call non-blocking flag).
     */
    int efd_shared;
    /*
     * A router that owns some of the entries (kvmcoal.kvm's on real KVM: the
     * kernel's one ring also carries the writes of zones bound to other
     * buffers).  Every consumer call runs it first, under the consumer lock,
     * with move = 1: it moves those entries out and returns how many at the
     * head are this ring's to deliver, or -1 for all.  With move = 0 (a call
     * nested in a consumer's handler, which must not move what the outer
     * call is delivering) it only counts them.  NULL: none.
     */
    int64_t (*route)(void *ctx, int move);
    void *route_ctx;
    /* The pending set the ring belongs to (see kc_pending), and its bit;
     * changed only under the producer's lock.  NULL: none. */
    kc_pending *pending;
    uint32_t pending_bit;
} kc_ring;

/* Number of slots a ring of nbytes holds, 0 if nbytes is too small. */
static inline uint64_t kc_ring_max_for(size_t nbytes)
{
    if (nbytes < KC_MIN_RING_NBYTES)
        return 0;
    return (uint64_t)(nbytes - KC_HEADER_SIZE) / KC_ENTRY_SIZE;
}

static inline uint32_t *kc_first_ptr(const kc_ring *r)
{
    return (uint32_t *)(r->base + offsetof(struct kvm_coalesced_mmio_ring, first));
}

static inline uint32_t *kc_last_ptr(const kc_ring *r)
{
    return (uint32_t *)(r->base + offsetof(struct kvm_coalesced_mmio_ring, last));
}

static inline unsigned char *kc_slot(const kc_ring *r, uint32_t idx)
{
    return r->base + KC_HEADER_SIZE + (size_t)idx * KC_ENTRY_SIZE;
}

/* Raw index reads for diagnostics (no validation, no ordering). */
static inline uint32_t kc_ring_peek_first(const kc_ring *r)
{
    return __atomic_load_n(kc_first_ptr(r), __ATOMIC_RELAXED);
}

static inline uint32_t kc_ring_peek_last(const kc_ring *r)
{
    return __atomic_load_n(kc_last_ptr(r), __ATOMIC_ACQUIRE);
}

/*
 * Start a consumer batch: load first (ours) and last (the producer's, with
 * acquire so the entries it published are visible), validate both and return
 * how many entries are pending.  On corruption returns a negative kc_status
 * and leaves the offending value in *bad.
 */
static inline int64_t kc_ring_begin(const kc_ring *r, uint32_t *first_out, uint32_t *bad)
{
    uint32_t first = __atomic_load_n(kc_first_ptr(r), __ATOMIC_RELAXED);
    uint32_t last = __atomic_load_n(kc_last_ptr(r), __ATOMIC_ACQUIRE);
    if (first >= r->max) {
        *bad = first;
        return KC_E_BAD_FIRST;
    }
    if (last >= r->max) {
        *bad = last;
        return KC_E_BAD_LAST;
    }
    *first_out = first;
    return last >= first ? (int64_t)(last - first) : (int64_t)r->max - first + last;
}

/*
 * Zero data[len..8) of the 8 data bytes at *data (any alignment) with a
 * fixed-size mask, not a variable-length memset call.  Any len is safe: one
 * outside 1..8 keeps every byte, and kc_check_copy rejects that entry anyway.
 */
static inline void kc_mask_data(unsigned char *data, uint32_t len)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* The bytes data[0..len) of a little-endian load; one load per entry. */
    static const uint64_t keep[16] = {
        ~0ull, 0xffull, 0xffffull, 0xffffffull, 0xffffffffull, 0xffffffffffull,
        0xffffffffffffull, 0xffffffffffffffull, ~0ull,
        ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull,
    };
    uint64_t d;
    memcpy(&d, data, sizeof d);
    d &= keep[len & 15];
    memcpy(data, &d, sizeof d);
#else
    if (len < KC_MAX_DATA)
        memset(data + len, 0, KC_MAX_DATA - len);
#endif
}

static inline void kc_zero_data_tail(kc_entry *e)
{
    kc_mask_data(e->data, e->len);
}

/*
 * Validate a copied entry's len and pio (the copy is private: the producer
 * cannot change it between this check and its use).  KC_OK, or the error
 * with the offending value in *bad.
 */
/* Nonzero if len is outside 1..8 or pio is not 0 or 1; no branch (len - 1 wraps for 0). */
static inline uint32_t kc_fields_bad(uint32_t len, uint32_t pio)
{
    return (len - 1u > KC_MAX_DATA - 1u) | (pio > 1u);
}

/* The len and pio of a raw 24-byte record at any alignment. */
static inline void kc_record_fields(const unsigned char *rec, uint32_t *len, uint32_t *pio)
{
    memcpy(len, rec + offsetof(kc_entry, len), sizeof *len);
    memcpy(pio, rec + offsetof(kc_entry, pio), sizeof *pio);
}

static inline int kc_check_copy(uint32_t len, uint32_t pio, uint32_t *bad)
{
    if (__builtin_expect(kc_fields_bad(len, pio), 0) == 0)
        return KC_OK;
    if (len == 0 || len > KC_MAX_DATA) {
        *bad = len;
        return KC_E_BAD_LEN;
    }
    if (pio > 1) {
        *bad = pio;
        return KC_E_BAD_PIO;
    }
    return KC_OK;
}

/*
 * Copy slot idx (< max, checked by the caller) into *out and validate the copy.
 * Data bytes past len are zeroed in the copy so that callers see a clean
 * little-endian value whatever stale bytes the producer left behind.
 */
static inline int kc_ring_read(const kc_ring *r, uint32_t idx, kc_entry *out, uint32_t *bad)
{
    int rc;
    memcpy(out, kc_slot(r, idx), KC_ENTRY_SIZE);
    rc = kc_check_copy(out->len, out->pio, bad);
    if (rc == KC_OK)
        kc_zero_data_tail(out);
    return rc;
}

/* Hand slots up to (not including) first back to the producer. */
static inline void kc_ring_publish_first(const kc_ring *r, uint32_t first)
{
    __atomic_store_n(kc_first_ptr(r), first, __ATOMIC_RELEASE);
}

/* Raise *high_water to depth: a statistic that producers (under their lock)
 * and the consumer (under its own) both update. */
static inline void kc_note_depth(uint32_t *high_water, uint32_t depth)
{
    uint32_t seen = __atomic_load_n(high_water, __ATOMIC_RELAXED);
    while (depth > seen &&
           !__atomic_compare_exchange_n(high_water, &seen, depth, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
        ;
}

/* Entries pending, from a raw look at the indices (0 for corrupted ones). */
static inline uint32_t kc_ring_depth(const kc_ring *r)
{
    uint32_t first = kc_ring_peek_first(r), last = kc_ring_peek_last(r);
    if (first >= r->max || last >= r->max)
        return 0;
    return last >= first ? last - first : r->max - first + last;
}

static inline uint32_t kc_ring_next(const kc_ring *r, uint32_t idx)
{
    return idx + 1 == r->max ? 0 : idx + 1;
}

/* Little-endian value of a validated entry's data. */
static inline uint64_t kc_entry_value(const kc_entry *e)
{
    uint64_t v = 0;
    for (uint32_t i = e->len; i-- > 0;)
        v = (v << 8) | e->data[i];
    return v;
}

int kc_ring_init(kc_ring *r, void *base, size_t nbytes);

/*
 * Wakeups.  The eventfd must be readable whenever the ring is non-empty (no
 * lost wakeup) and should cost no system call per entry.  The shared word
 * `signaled` is 1 from the moment a producer decides to signal until the
 * consumer clears the eventfd.
 *
 *   producer, after publishing last:   fence; if signaled == 0 and
 *                                      CAS(signaled, 0 -> 1): write(efd, 1)
 *   consumer, on leaving it empty:     if signaled: read(efd) (clears it);
 *                                      signaled = 0;
 *                                      fence; if the ring is not empty after
 *                                      all, signal as a producer would
 *
 * The two full fences form a store-buffering pair: either the consumer's
 * re-check sees the new entry, or the producer sees signaled == 0 and
 * signals; both cannot miss.  Only the first entry after the consumer went
 * idle costs the producer a write(); the consumer pays one read() each time
 * it empties the ring.  In one narrow race (a producer that won the CAS
 * writes the eventfd after the consumer cleared it) the fd is spuriously
 * readable once; the next idle clears it.  A peer that scribbles on the word
 * can cause spurious or missed wakeups, never a memory error.
 */
void kc_ring_set_notifier(kc_ring *r, int efd, uint32_t *signaled);
/* The eventfd may now be held by other processes (see kc_ring.efd_shared);
 * atomic, as producers and consumers read the flag without a lock. */
void kc_ring_share_efd(kc_ring *r);
/*
 * The producer's step in two halves, so that a caller can drop a lock (the
 * GIL) around the system call: claim returns 1 if this producer must signal
 * (it won the CAS), and signal writes the eventfd.  notify_producer does
 * both.  They return 0, or -1 with errno set if the eventfd write failed.
 */
int kc_ring_claim_wakeup(const kc_ring *r);
int kc_ring_signal(const kc_ring *r);
int kc_ring_notify_producer(const kc_ring *r);
/* Whether the signalled word is set (a producer claimed the wakeup). */
static inline int kc_ring_signalled(const kc_ring *r)
{
    return r->signaled && __atomic_load_n(r->signaled, __ATOMIC_SEQ_CST) != 0;
}
/* Join the pending set p as bit (NULL: leave it); under the producer lock.
 * Atomic: a consumer re-signalling on its idle path reads it without that lock. */
void kc_ring_set_pending(kc_ring *r, kc_pending *p, uint32_t bit);
/* force = 0 reads the eventfd only when the signalled word says it was
 * signalled (a consumer pass that found the ring empty makes no system
 * call); force = 1 reads it regardless, as a consumer about to sleep must (a
 * peer may have written the eventfd, or the word, outside the protocol). */
int kc_ring_notify_consumer_idle(const kc_ring *r, int force);
/*
 * The consumer's sleep: poll() the eventfd until it is readable or
 * timeout_ms (-1: no limit) passes.  1 readable, 0 timed out, -1 with errno
 * set (EINTR included: the caller runs the signal handlers and decides).
 * In C because the code between the wakeup and the return runs cold (the
 * thread slept): here it is a few instructions, where a Python poll object
 * and the checks after it added more than a microsecond to the wake latency.
 */
int kc_wait_readable(int efd, int timeout_ms);

/*
 * The kernel's producer (virt/kvm/coalesced_mmio.c, Linux 6.12+): refuse if
 * last >= max or the ring is full, else fill slot last and publish last + 1
 * with a release store.  legacy_full_check reproduces the pre-6.12 check whose
 * unsigned wraparound made the ring look full early.  len must be 1..8 and pio
 * 0 or 1 (the caller validates).
 */
int kc_ring_push(const kc_ring *r, uint64_t phys_addr, const void *data, uint32_t len,
                 uint32_t pio, int legacy_full_check);
/*
 * kc_ring_push for each of n raw 24-byte records at *records (any alignment,
 * the caller's memory), in order; stops at the first the kernel would refuse
 * (*status: a kc_push_result) or whose len/pio is bad (*status: a kc_status,
 * as the caller may have changed it since checking).  Returns how many were
 * pushed; *status is KC_OK if all were.  As many as fit are copied at once
 * and checked where they landed (past last, where no consumer reads yet),
 * then last moves once: the router pushes runs of the kernel ring this way.
 */
size_t kc_ring_push_records(const kc_ring *r, const void *records, size_t n,
                            int legacy_full_check, int *status);
/*
 * How many more entries a producer may push now (KC_OK), or KC_PUSH_BAD_LAST.
 * The kernel's modern full check; a first out of range (which the kernel
 * only compares) counts as a ring's worth.  A consumer can only add room.
 */
int kc_ring_room(const kc_ring *r, uint32_t *room);
/*
 * Push n runs of raw records, run i being lengths[i] adjacent records at
 * runs[i] (any alignment), in order: copied a run at a time as they are,
 * last published once; no more than fit (*status KC_PUSH_FULL then).  The
 * caller has checked every record's len and pio: the router, pushing one
 * buffer's entries gathered from the kernel ring (the kernel's own
 * producer leaves the bytes past len as they were too; a consumer masks
 * them).  Without the old full check.  Returns how many records went in.
 */
size_t kc_ring_push_gather(const kc_ring *r, const unsigned char *const *runs,
                           const uint32_t *lengths, size_t n, int *status);
/*
 * The index of the first of n raw records whose len or pio is bad (its
 * values in *len and *pio), or n if all are good.
 */
size_t kc_records_first_bad(const void *records, size_t n, uint32_t *len, uint32_t *pio);

/*
 * Batch consumer: copy up to n pending entries into out (raw ABI records),
 * validating each, then publish first once.  Returns the number copied.  If
 * the ring is corrupt *status is set to a negative kc_status, *bad to the
 * offending value and *bad_index to its slot; the entries before it are still
 * copied and consumed, and the corrupt one stays at first.
 */
size_t kc_ring_drain_into(const kc_ring *r, void *out, size_t n, int *status,
                          uint32_t *bad, uint32_t *bad_index);

/* Empty the ring by setting both indices to 0. */
void kc_ring_reset(const kc_ring *r);

#endif
