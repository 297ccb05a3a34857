"""Pure-Python baseline consumers, kept as readable reference code.

Each function works directly on a ring buffer in the kernel's layout
(``struct kvm_coalesced_mmio_ring``, see DESIGN.md "The ring ABI"):

* header at offset 0: ``<II`` -- ``first`` (consumer index), ``last``
  (producer index);
* entries at offset 8, 24 bytes each: ``<QII8s`` -- ``phys_addr``, ``len``,
  ``pio``, ``data[8]``.

They use only the standard library, so they measure what a Python program
without kvmcoal would have to do.  They are honest baselines: they really
consume (advance ``first`` in the buffer) and deliver the same
``(phys_addr, data, pio)`` triples, in the same order, as
``kvmcoal.Ring.consume``.  The struct formats are precompiled
(``struct.Struct``), the fastest plain form of ``unpack_from``/``pack_into``,
so that the baseline is not made artificially slow.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("<II")       # first, last
FIRST = struct.Struct("<I")         # first alone, at offset 0
LAST = struct.Struct("<I")          # last alone, at offset 4
ENTRY = struct.Struct("<QII8s")     # phys_addr, len, pio, data[8]

HEADER_SIZE = HEADER.size           # 8
ENTRY_SIZE = ENTRY.size             # 24
FIRST_OFFSET = 0
LAST_OFFSET = 4

Handler = Callable[[int, bytes, bool], Any]


def qemu_style_drain(buf: Any, max_: int, handler: Handler) -> int:
    """Consume every pending entry the way QEMU does; return how many.

    Shaped like QEMU's ``kvm_flush_coalesced_mmio_buffer`` (accel/kvm)::

        while (ring->first != ring->last) {
            ent = &ring->coalesced_mmio[ring->first];
            if (ent->pio == 1) address_space_write(&address_space_io, ...);
            else cpu_physical_memory_write(ent->phys_addr, ent->data, ent->len);
            smp_wmb();
            ring->first = (ring->first + 1) % KVM_COALESCED_MMIO_MAX;
        }

    For each entry: ``unpack_from`` the record at ``first``, call
    ``handler(phys_addr, data[:len], pio)``, then store the new ``first``
    into the buffer with ``pack_into`` (one store of ``first`` per entry, as
    QEMU does) and re-read ``last`` (QEMU's loop condition reads both
    indices from the shared page on every iteration).

    Like QEMU, it trusts the indices and ``len`` (no validation), so it can
    only be faster than a bounds-checked consumer, not slower.
    """
    first, last = HEADER.unpack_from(buf, 0)
    count = 0
    while first != last:
        phys_addr, length, pio, data = ENTRY.unpack_from(
            buf, HEADER_SIZE + first * ENTRY_SIZE)
        handler(phys_addr, data[:length], pio == 1)
        first = (first + 1) % max_
        FIRST.pack_into(buf, FIRST_OFFSET, first)
        last = LAST.unpack_from(buf, LAST_OFFSET)[0]
        count += 1
    return count


def plain_handler_loop(handler: Handler, n: int, args: tuple[Any, ...]) -> int:
    """Call ``handler`` *n* times with the same constant arguments.

    The floor for :meth:`kvmcoal.Ring.consume`: a plain Python ``for`` loop
    that does nothing but call the handler, with no ring, no decoding and
    no object creation.  The arguments are unpacked into locals once, so
    each iteration is a plain positional call ``handler(a, d, p)`` (the
    cheapest form, which makes the comparison stricter for ``consume``).
    Returns *n*.
    """
    a, d, p = args
    for _ in range(n):
        handler(a, d, p)
    return n


def plain_handler_loop_star(handler: Handler, n: int, args: tuple[Any, ...]) -> int:
    """:func:`plain_handler_loop` written as ``handler(*args)``.

    The same loop, but each call unpacks the argument tuple.  That costs
    about a third more per call on CPython 3.11, so against this form
    ``consume`` looks better than against :func:`plain_handler_loop`; it is
    kept only to show the difference, and the consume target is judged
    against :func:`plain_handler_loop`.  Returns *n*.
    """
    for _ in range(n):
        handler(*args)
    return n
