# cython: language_level=3
"""Other Cython code using the ring at C level, through kvmcoal/_ring.pxd."""

from libc.string cimport memcpy

from kvmcoal._ring cimport KC_MAX_DATA, KC_PUSH_OK, Ring, kc_entry, check_wake


def push(Ring ring, unsigned long long phys_addr, bytes data):
    """Push one write through the ring's C producer, without the GIL; whether it went in."""
    cdef kc_entry e
    cdef bint must_wake
    cdef int rc, err = 0
    if not 0 < len(data) <= KC_MAX_DATA:
        raise ValueError("1 to 8 bytes")
    e.phys_addr = phys_addr
    e.len = len(data)
    e.pio = 0
    memcpy(e.data, <const char *>data, e.len)
    with nogil:
        rc = ring.produce(&e, &must_wake)
        if must_wake:
            err = ring.wake_consumer()
    check_wake(err)
    return rc == KC_PUSH_OK


def slots(Ring ring):
    """The ring's slot count, read from its C struct."""
    return ring._r.max
