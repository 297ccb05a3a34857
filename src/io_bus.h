/*
 * io_bus.h - the kernel's I/O bus lookup (virt/kvm/kvm_main.c), for zones.
 *
 * A KVM bus (MMIO or PIO) is an array of ranges, each a coalesced zone here.
 * The kernel keeps it in the order its insertion rule produces and finds the
 * devices for an access with a binary search whose comparison is not an
 * ordering once ranges nest or overlap.  Which zone takes a write, and
 * whether any does, follows from exactly that walk, so kvmcoal's software
 * kernel (EmulatedVm) and the router on real KVM both use this code rather
 * than a cleaner search that would disagree with the kernel.
 *
 * The range length is the kernel's `int len` (a zone size of 2 GiB or more
 * is negative there); the zone's own in-range check uses its u32 size.
 */
#ifndef KVMCOAL_IO_BUS_H
#define KVMCOAL_IO_BUS_H

#include <stddef.h>
#include <stdint.h>

typedef struct kc_bus_range {
    uint64_t addr;
    int32_t len;            /* struct kvm_io_range.len: (int)zone.size */
    uint32_t size;          /* the zone's size, for coalesced_mmio_in_range */
    void *target;           /* the zone's ring (a borrowed PyObject *), or NULL */
} kc_bus_range;

/* kvm_io_bus_cmp(r1, r2): -1, 0 (r2 holds r1, or any overlap when r2 is empty), 1. */
static inline int kc_bus_cmp(uint64_t addr1, int32_t len1, uint64_t addr2, int32_t len2)
{
    if (addr1 < addr2)
        return -1;
    if (len2) {
        /* gpa_t + int: the length is sign-extended, the sum wraps. */
        addr1 += (uint64_t)(int64_t)len1;
        addr2 += (uint64_t)(int64_t)len2;
    }
    if (addr1 > addr2)
        return 1;
    return 0;
}

/*
 * kvm_io_bus_get_first_dev: the kernel's bsearch (lib/bsearch.c) for a
 * range comparing equal to the access, then back over equal neighbours.
 * The index of the first device the write is offered to, or -1.
 */
static inline ptrdiff_t kc_bus_first_dev(const kc_bus_range *r, size_t n,
                                         uint64_t addr, int32_t len)
{
    const kc_bus_range *base = r;
    size_t num = n;
    while (num > 0) {
        const kc_bus_range *pivot = base + (num >> 1);
        int result = kc_bus_cmp(addr, len, pivot->addr, pivot->len);
        if (result == 0) {
            ptrdiff_t off = pivot - r;
            while (off > 0 && kc_bus_cmp(addr, len, r[off - 1].addr, r[off - 1].len) == 0)
                off--;
            return off;
        }
        if (result > 0) {
            base = pivot + 1;
            num--;
        }
        num >>= 1;
    }
    return -1;
}

/* Whether the walk goes on to device idx (__kvm_io_bus_write's loop condition). */
static inline int kc_bus_offers(const kc_bus_range *r, size_t n, ptrdiff_t idx,
                                uint64_t addr, int32_t len)
{
    return idx >= 0 && (size_t)idx < n && kc_bus_cmp(addr, len, r[idx].addr, r[idx].len) == 0;
}

/* coalesced_mmio_in_range: whether the zone itself accepts the access. */
static inline int kc_zone_in_range(const kc_bus_range *z, uint64_t addr, uint32_t len)
{
    uint64_t end = addr + len;
    if (end < addr)
        return 0;
    return addr >= z->addr && end <= z->addr + (uint64_t)z->size;
}

/*
 * The zone a write to [addr, addr + len) lands in: the first device the
 * walk offers it to that accepts it (every zone's ring has room: the
 * router's case, where all zones share the kernel's one ring), or NULL.
 */
static inline const kc_bus_range *kc_bus_find(const kc_bus_range *r, size_t n,
                                              uint64_t addr, uint32_t len)
{
    ptrdiff_t idx = kc_bus_first_dev(r, n, addr, (int32_t)len);
    for (; kc_bus_offers(r, n, idx, addr, (int32_t)len); idx++)
        if (kc_zone_in_range(&r[idx], addr, len))
            return &r[idx];
    return NULL;
}

/*
 * kvm_io_bus_register_dev's insertion point for a new range: before the
 * first range that compares greater than it.
 */
static inline size_t kc_bus_insert_position(const kc_bus_range *r, size_t n,
                                            uint64_t addr, int32_t len)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (kc_bus_cmp(r[i].addr, r[i].len, addr, len) > 0)
            break;
    return i;
}

#endif
