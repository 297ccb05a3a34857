/*
 * grace.h - the grace period of the emulated kernel's zone tables.
 *
 * The kernel frees a replaced I/O bus only after an SRCU grace period, so
 * that no vCPU still walking the old bus can write through it.  EmulatedVm
 * does the same with a writer count per epoch: writers count themselves in
 * the current epoch's counter while they use a zone table; whoever installs
 * a new table flips the epoch and waits for the old epoch's counter to reach
 * zero, after which no writer still uses the old table.
 */
#ifndef KVMCOAL_GRACE_H
#define KVMCOAL_GRACE_H

typedef struct kc_grace {
    int epoch;
    int writers[2];
} kc_grace;

static inline int kc_grace_enter(kc_grace *g)
{
    int idx = __atomic_load_n(&g->epoch, __ATOMIC_SEQ_CST);

    __atomic_fetch_add(&g->writers[idx], 1, __ATOMIC_SEQ_CST);
    return idx;
}

static inline void kc_grace_exit(kc_grace *g, int idx)
{
    __atomic_fetch_sub(&g->writers[idx], 1, __ATOMIC_SEQ_CST);
}

/* Flip the epoch; returns the old one, for kc_grace_done(). */
static inline int kc_grace_flip(kc_grace *g)
{
    int old = __atomic_load_n(&g->epoch, __ATOMIC_SEQ_CST);

    __atomic_store_n(&g->epoch, old ^ 1, __ATOMIC_SEQ_CST);
    return old;
}

static inline int kc_grace_done(kc_grace *g, int old)
{
    return __atomic_load_n(&g->writers[old], __ATOMIC_SEQ_CST) == 0;
}

#endif
