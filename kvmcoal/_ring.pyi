"""Type stubs of the C ring (kvmcoal._ring); the pure-Python twin
kvmcoal._ring_py has the same public API and behaviour.  Cython code can
cimport the ring's C-level interface from kvmcoal/_ring.pxd."""

from collections.abc import Callable, Iterator
from typing import Any, Final, final

from typing_extensions import Buffer, Self

ENTRY_SIZE: Final[int]
"""Bytes of one ``struct kvm_coalesced_mmio`` record: 24."""
RING_HEADER_SIZE: Final[int]
"""Bytes before the first entry (``first`` and ``last``): 8."""
MIN_RING_NBYTES: Final[int]
"""Smallest ring: a header and two slots, 56 bytes (one slot always stays empty,
so a ring of one slot could hold no entry)."""
PAGE_SIZE: Final[int]
"""The host's page size, read at import time."""
RING_MAX: Final[int]
"""Slots of a one-page ring, ``ring_max(PAGE_SIZE)``: 170 on 4 KiB pages."""

def ring_max(nbytes: int) -> int:
    """Number of slots of a ring occupying *nbytes* bytes.

    ``(nbytes - 8) // 24``, like the kernel's ``KVM_COALESCED_MMIO_MAX`` for
    a page of *nbytes*.  A ring holds at most ``ring_max(nbytes) - 1``
    entries.  Raises ValueError if *nbytes* is below :data:`MIN_RING_NBYTES`
    or gives more than 2**32 - 1 slots, TypeError if it is not an int.

    >>> ring_max(4096), ring_max(16384), ring_max(65536)
    (170, 682, 2730)
    """

@final
class Entry:
    """One coalesced write, as the consumer delivers it (immutable).

    >>> e = Entry(0xfe000000, b"\\x2a\\x00", pio=False)
    >>> e.len, e.value, e.pio
    (2, 42, False)
    """

    def __init__(self, phys_addr: int, data: Buffer, pio: bool = False) -> None: ...
    @property
    def phys_addr(self) -> int:
        """Guest-physical address (MMIO) or port number (PIO) written."""
    @property
    def len(self) -> int:
        """Width of the write in bytes, 1 to 8."""
    @property
    def pio(self) -> bool:
        """True for a port I/O write, False for MMIO."""
    @property
    def data(self) -> bytes:
        """The bytes written, ``len`` of them."""
    @property
    def value(self) -> int:
        """``data`` as a little-endian unsigned integer."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __reduce__(self) -> tuple[Any, ...]: ...

Handler = Callable[[int, bytes, bool], object]

@final
class Ring:
    """A coalesced MMIO/PIO ring over a writable, C-contiguous buffer.

    The ring uses the first *nbytes* bytes of *buffer* (default: all of it) in
    the layout of ``struct kvm_coalesced_mmio_ring``; its number of slots
    follows from that length.  The buffer is held, never copied, for the
    ring's lifetime, and the indices are left as they are: attaching to a
    live ring (the kernel's page in a vCPU mapping, a peer's shared memory)
    is the normal case.  Use :meth:`reset` to start from an empty ring.

    Consumer calls (pop, drain, drain_into, consume, iteration) are
    serialized: a second thread waits for the first to finish, and a call
    made from inside a :meth:`consume` handler on the same ring delivers
    nothing (the outer call goes on delivering in order, as QEMU's
    flush-in-progress flag does).  :meth:`push` is the producer side; one
    producer process at a time, like the kernel's ring lock.

    If *legacy_full_check* is true, :meth:`push` uses the full test of Linux
    before 6.12, whose unsigned wraparound made a ring look full early (85
    entries from index 0 on 4 KiB pages), for regression tests.

    >>> ring = Ring(bytearray(4096))
    >>> ring.push(0xfe000000, b"\\x01")
    True
    >>> [e.value for e in ring.drain()]
    [1]
    """

    def __init__(self, buffer: Buffer, *, nbytes: int | None = None,
                 legacy_full_check: bool = False) -> None: ...
    @property
    def max(self) -> int:
        """Slots in the ring, ``ring_max(nbytes)``."""
    @property
    def capacity(self) -> int:
        """Entries the ring can hold: ``max - 1``."""
    @property
    def nbytes(self) -> int:
        """Bytes of the buffer the ring occupies (the *nbytes* it was made with)."""
    @property
    def first(self) -> int:
        """The consumer index as it is in memory now (not validated)."""
    @property
    def last(self) -> int:
        """The producer index as it is in memory now (not validated)."""
    @property
    def legacy_full_check(self) -> bool:
        """Whether :meth:`push` reproduces the pre-6.12 full check."""
    @property
    def released(self) -> bool:
        """True after :meth:`release`."""
    def __len__(self) -> int:
        """Entries pending; RingCorruptedError if an index is out of range."""
    def reset(self) -> None:
        """Empty the ring: set ``first`` and ``last`` to 0."""
    def release(self) -> None:
        """Let go of the buffer; later calls raise ValueError.  Idempotent."""
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...

    def push(self, phys_addr: int, data: Buffer, *, pio: bool = False) -> bool:
        """Record a write as the kernel does.

        Returns True if the write was coalesced into the ring, False if the
        kernel would refuse it (the ring is full, or ``last`` is out of range)
        and the write must take the ordinary exit path instead.  *data* is 1
        to 8 bytes.
        """
    def push_many(self, records: Buffer) -> int:
        """Push raw 24-byte ABI records in order, each as :meth:`push` would.

        *records* is a C-contiguous buffer of whole records in the layout
        :meth:`drain_into` writes (a numpy array of
        :data:`kvmcoal.ENTRY_DTYPE`, bytes, a memoryview).  Every record is
        checked first (len 1 to 8, pio 0 or 1; ValueError names the first
        bad one, and nothing is pushed); then they are pushed under one
        producer lock with at most one wakeup, stopping at the first the
        kernel would refuse.  Returns how many were pushed: fewer than given
        when the ring filled, and the rest are the caller's to retry or to
        deliver another way.  Data bytes past each record's len are ignored.
        *records* must not overlap the ring's own memory (ValueError).  Each
        record is checked again as it is pushed, on a private copy: if
        another thread changes one meanwhile, the count says how many went
        in, and pushing the rest again reports the bad record.
        """
    def pop(self) -> Entry | None:
        """Consume and return the oldest entry, or None if the ring is empty."""
    def drain(self, limit: int | None = None) -> list[Entry]:
        """Consume and return the pending entries (at most *limit*), oldest first."""
    def drain_into(self, out: Buffer) -> int:
        """Copy pending entries into *out* as raw 24-byte ABI records.

        Copies as many as fit in ``len(out) // 24`` records, consumes them and
        returns how many.  Creates no Python object per entry.  Data bytes
        past each entry's ``len`` are zero in the copy.  A numpy array of
        :data:`kvmcoal.ENTRY_DTYPE` is a good *out*.

        The records are copied in one go and checked in *out*, so what was
        checked is what the caller gets.  If that check meets a corrupted
        entry, the good entries before it are delivered (and counted), the
        records from it on are zeroed in *out*, and it stays in the ring
        (:class:`RingCorruptedError` if it is the first).  *out* must not
        overlap the ring's own memory (ValueError).  The GIL is
        released around a copy that may exceed 64 KiB; a smaller one takes
        less time than releasing and retaking it.
        """
    def consume(self, handler: Handler, limit: int | None = None) -> int:
        """Call ``handler(phys_addr, data, pio)`` for each pending entry, in order.

        Returns the number of entries delivered.  An entry is consumed before
        its handler runs: if the handler raises, the exception propagates,
        that entry is not delivered again and the entries after it stay in
        the ring.  Entries pushed while consume runs wait for the next call.
        """
    def _attach_notifier(self, efd: int, offset: int) -> None: ...
    def _release_after_fork(self) -> None: ...
    def _sleep(self, timeout_ms: int) -> bool: ...
    def _dup_notifier_fd(self) -> int: ...
    def _share_notifier(self) -> None: ...
    def _consuming_here(self) -> bool: ...
    def _forget_parent_threads(self) -> None: ...
    def _clear_wakeup(self) -> None: ...
    def _stats(self) -> tuple[int, int, int]: ...
    def __iter__(self) -> Iterator[Entry]:
        """Iterate by popping: each step consumes one entry; stops when empty."""
    def __next__(self) -> Entry: ...
