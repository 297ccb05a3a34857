"""Pure-Python baseline consumers, kept as readable reference code.

Each consumer works directly on a ring buffer in the kernel's layout
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

There are four, one per way a Python program would plausibly read the ring:

* :func:`qemu_style_drain`: QEMU's flush loop, ``struct.unpack_from`` per
  entry and a store of ``first`` per entry;
* :func:`ctypes_drain`: ``ctypes`` structures laid over the buffer with
  ``from_buffer``, the same loop;
* :func:`iter_unpack_drain`: a batch reader, ``struct.iter_unpack`` over the
  pending slice(s) and one store of ``first`` at the end;
* :func:`rust_vmm_style_drain`: a loop over a one-entry-per-call reader
  (:class:`RustVmmStyleRing`) shaped like rust-vmm's kvm-ioctls.

Like QEMU, rust-vmm and kvmtool, none of them validates ``first``, ``last``
or ``len``: they can only be faster than a bounds-checked consumer.
"""

from __future__ import annotations

import ctypes
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


class RingHeader(ctypes.Structure):
    """``struct kvm_coalesced_mmio_ring``'s header, in native byte order as the kernel's."""

    _fields_ = [("first", ctypes.c_uint32), ("last", ctypes.c_uint32)]


class CoalescedMmio(ctypes.Structure):
    """``struct kvm_coalesced_mmio``: one 24-byte entry, native byte order."""

    # data is c_ubyte, not c_char: a c_char array field reads back as bytes
    # cut at the first NUL, which would lose zero bytes of the data.
    _fields_ = [("phys_addr", ctypes.c_uint64), ("len", ctypes.c_uint32),
                ("pio", ctypes.c_uint32), ("data", ctypes.c_ubyte * 8)]


assert ctypes.sizeof(RingHeader) == HEADER_SIZE and ctypes.sizeof(CoalescedMmio) == ENTRY_SIZE


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


def ctypes_drain(buf: Any, max_: int, handler: Handler) -> int:
    """:func:`qemu_style_drain` written with ``ctypes`` structures; return how many.

    A :class:`RingHeader` and an array of *max_* :class:`CoalescedMmio` are
    laid over the writable *buf* with ``from_buffer`` (no copy: the fields
    read and write the ring itself), as a ctypes user maps a C struct.
    Then, per entry, as QEMU does: read the entry's fields, call
    ``handler(phys_addr, data[:len], pio)``, store the new ``first`` and
    re-read ``last`` in the loop condition.

    Laying the two structures over the buffer costs about 1 µs per call
    (two ``from_buffer``), which is most of the time for a batch of one
    entry and about 1% of a full ring; a program that kept them between
    calls would save that, and nothing per entry.
    """
    header = RingHeader.from_buffer(buf)
    entries = (CoalescedMmio * max_).from_buffer(buf, HEADER_SIZE)
    first = header.first
    count = 0
    while first != header.last:
        entry = entries[first]
        handler(entry.phys_addr, bytes(entry.data)[:entry.len], entry.pio == 1)
        first = (first + 1) % max_
        header.first = first
        count += 1
    return count


def iter_unpack_drain(buf: Any, max_: int, handler: Handler) -> int:
    """Consume every pending entry in one batch with ``struct.iter_unpack``; return how many.

    The batch form of the pure-Python consumer: read ``first`` and ``last``
    once, run ``ENTRY.iter_unpack`` over the pending entries, which are one
    contiguous slice of a memoryview of *buf* (two when they wrap past the
    end of the ring: from ``first`` to the end, then from slot 0 to
    ``last``), call ``handler(phys_addr, data[:len], pio)`` per record, and
    store ``first = last`` once at the end.  It publishes ``first`` once per
    batch, as kvmcoal's ``drain``/``drain_into`` do, instead of per entry.
    """
    first, last = HEADER.unpack_from(buf, 0)
    if first == last:
        return 0
    view = memoryview(buf)
    start = HEADER_SIZE + first * ENTRY_SIZE
    spans: tuple[memoryview, ...]
    if first < last:
        spans = (view[start:HEADER_SIZE + last * ENTRY_SIZE],)
    else:
        spans = (view[start:HEADER_SIZE + max_ * ENTRY_SIZE],
                 view[HEADER_SIZE:HEADER_SIZE + last * ENTRY_SIZE])
    for span in spans:
        for phys_addr, length, pio, data in ENTRY.iter_unpack(span):
            handler(phys_addr, data[:length], pio == 1)
    FIRST.pack_into(buf, FIRST_OFFSET, last)
    return (last - first) % max_


class RustVmmStyleRing:
    """A reader of one entry per call, shaped like rust-vmm's kvm-ioctls.

    kvm-ioctls (``src/ioctls/mod.rs``, ``KvmCoalescedIoRing::read_entry``,
    behind ``VcpuFd::coalesced_mmio_read()`` in ``src/ioctls/vcpu.rs``)
    reads the ring one entry per call::

        pub(crate) fn read_entry(&mut self) -> Option<kvm_coalesced_mmio> {
            let ring_max = self.ring_max();
            let ring = self.ring_mut();
            if ring.first == ring.last {
                return None;
            }
            let entries = ring.coalesced_mmio.as_ptr();
            let elem = unsafe { entries.add(ring.first as usize).read() };
            ring.first = (ring.first + 1) % ring_max as u32;
            Some(elem)
        }

    :meth:`read_entry` is that, in Python: read ``first`` and ``last`` from
    the buffer, return None if they are equal, else copy the entry out
    (``unpack_from``: ``(phys_addr, len, pio, data[8])``, the fields of
    ``kvm_coalesced_mmio``), store ``first + 1`` and return the copy.  Like
    the Rust code it trusts ``first`` and uses plain loads and stores.
    """

    def __init__(self, buf: Any, max_: int) -> None:
        self._buf = buf
        self._max = max_

    def read_entry(self) -> tuple[int, int, int, bytes] | None:
        """The oldest entry as ``(phys_addr, len, pio, data[8])``, now consumed; or None."""
        buf = self._buf
        first, last = HEADER.unpack_from(buf, 0)
        if first == last:
            return None
        entry = ENTRY.unpack_from(buf, HEADER_SIZE + first * ENTRY_SIZE)
        FIRST.pack_into(buf, FIRST_OFFSET, (first + 1) % self._max)
        return entry


def rust_vmm_style_drain(buf: Any, max_: int, handler: Handler) -> int:
    """Consume every pending entry through :class:`RustVmmStyleRing`; return how many.

    The loop a rust-vmm VMM writes around ``coalesced_mmio_read()``: take
    entries until it returns None, and hand each one's
    ``(phys_addr, data[:len], pio)`` to the device.
    """
    ring = RustVmmStyleRing(buf, max_)
    count = 0
    while (entry := ring.read_entry()) is not None:
        phys_addr, length, pio, data = entry
        handler(phys_addr, data[:length], pio == 1)
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
