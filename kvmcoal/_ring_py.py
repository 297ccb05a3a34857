"""Pure-Python twin of the C ring extension :mod:`kvmcoal._ring`.

It has the same public API and behaviour (see ``_ring.pyi``) and serves as a
test oracle: the tests run one suite against both and compare the results,
the way msgpack's ``fallback.py`` or multidict's ``_multidict_py.py`` do.

It reads and writes the caller's buffer in place through a ``memoryview``
and the ``struct`` module, following ``src/ring_impl.c`` step by step.  It
is correct within one process, but it has no atomic loads or stores and is
slow: it is not meant for a ring shared with another thread or process that
runs at speed, nor for the kernel's page of a live vCPU.
"""

from __future__ import annotations

import ctypes
import mmap
import operator
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import RingCorruptedError

__all__ = ["ENTRY_SIZE", "RING_HEADER_SIZE", "MIN_RING_NBYTES", "PAGE_SIZE", "RING_MAX",
           "ring_max", "Entry", "Ring"]

_HEADER = struct.Struct("<II")      # struct kvm_coalesced_mmio_ring: first, last
_INDEX = struct.Struct("<I")
ENTRY_STRUCT = struct.Struct("<QII8s")    # struct kvm_coalesced_mmio: phys_addr, len, pio, data
_FIRST_OFFSET = 0
_LAST_OFFSET = _INDEX.size
_MAX_DATA = 8
_MAX_SLOTS = 2**32 - 1              # index arithmetic is 32-bit, like the kernel's

ENTRY_SIZE = ENTRY_STRUCT.size
RING_HEADER_SIZE = _HEADER.size
MIN_RING_NBYTES = RING_HEADER_SIZE + 2 * ENTRY_SIZE   # one slot stays empty: 2 hold 1 entry
PAGE_SIZE = mmap.PAGESIZE


def _typename(obj: object) -> str:
    return repr(type(obj).__name__)


def ring_max(nbytes: int) -> int:
    """Number of slots of a ring occupying *nbytes* bytes (see ``_ring.pyi``)."""
    try:
        nbytes = operator.index(nbytes)
    except TypeError:
        raise TypeError(f"nbytes must be an int, not {_typename(nbytes)}") from None
    if nbytes < MIN_RING_NBYTES:
        raise ValueError(f"nbytes={nbytes} is smaller than the {MIN_RING_NBYTES}-byte minimum ring")
    slots = (nbytes - RING_HEADER_SIZE) // ENTRY_SIZE
    if slots > _MAX_SLOTS:
        raise ValueError(f"nbytes={nbytes} gives {slots} slots, more than the "
                         f"{_MAX_SLOTS} that 32-bit indices can address")
    return slots


RING_MAX = ring_max(PAGE_SIZE)


def _check_phys_addr(phys_addr: int) -> int:
    try:
        phys_addr = operator.index(phys_addr)
    except TypeError:
        raise TypeError(f"phys_addr must be an int, not {_typename(phys_addr)}") from None
    if not 0 <= phys_addr < 2**64:
        raise ValueError(f"phys_addr={phys_addr} is out of the u64 range")
    return phys_addr


def _check_data(data: Any) -> bytes:
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be a bytes-like object, not {_typename(data)} "
                        f"(the bytes written; Bus.write takes an int)") from None
    with view:
        # Check the length first so a huge buffer is refused without a copy.
        if not 1 <= view.nbytes <= _MAX_DATA:
            raise ValueError(f"data must be 1 to {_MAX_DATA} bytes, got {view.nbytes}")
        return view.tobytes()


def _check_pio(pio: Any) -> bool:
    if not isinstance(pio, bool):
        raise TypeError(f"pio must be True or False, not {pio!r}")
    return pio


def _check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    try:
        limit = operator.index(limit)
    except TypeError:
        raise TypeError(f"limit must be an int or None, not {_typename(limit)}") from None
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return limit


def _byte_view(obj: Any, needs: str, writable: bool = True) -> memoryview:
    """A flat, writable (or, with *writable* false, any) byte view of *obj*;
    *needs* starts the error messages."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{needs} a {'writable ' if writable else ''}bytes-like object, "
                        f"not {_typename(obj)}") from None
    with view:
        if writable and view.readonly:
            raise TypeError(f"{needs} a writable bytes-like object, and this one is read-only")
        if not view.c_contiguous:
            raise ValueError(f"{needs} a C-contiguous buffer")
        # The cast shares the exporter's buffer, which stays held until the
        # cast view itself is released.
        return view.cast("B")


def _address(view: memoryview) -> int:
    """The address of a non-empty writable byte view's first byte."""
    # The temporary c_char holds an export of view; it dies at once, so that
    # the view (and the caller's buffer behind it) can be released.
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class Entry:
    """One coalesced write, as the consumer delivers it (immutable); see ``_ring.pyi``."""

    __slots__ = ("_phys_addr", "_data", "_pio")
    _phys_addr: int
    _data: bytes
    _pio: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        raise TypeError("Entry cannot be subclassed (as the C Entry cannot)")

    def __init__(self, phys_addr: int, data: Any, pio: bool = False) -> None:
        if hasattr(self, "_data"):
            raise TypeError("Entry is immutable: __init__ cannot be called again")
        phys_addr = _check_phys_addr(phys_addr)
        pio = _check_pio(pio)
        self._init(phys_addr, _check_data(data), pio)

    def _init(self, phys_addr: int, data: bytes, pio: bool) -> None:
        object.__setattr__(self, "_phys_addr", phys_addr)
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_pio", pio)

    @classmethod
    def _trusted(cls, phys_addr: int, data: bytes, pio: bool) -> Entry:
        """An Entry from values the ring has already validated."""
        entry = cls.__new__(cls)
        entry._init(phys_addr, data, pio)
        return entry

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def phys_addr(self) -> int:
        """Guest-physical address (MMIO) or port number (PIO) written."""
        return self._phys_addr

    @property
    def len(self) -> int:
        """Width of the write in bytes, 1 to 8."""
        return len(self._data)

    @property
    def pio(self) -> bool:
        """True for a port I/O write, False for MMIO."""
        return self._pio

    @property
    def data(self) -> bytes:
        """The bytes written, ``len`` of them."""
        return self._data

    @property
    def value(self) -> int:
        """``data`` as a little-endian unsigned integer."""
        return int.from_bytes(self._data, "little")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return ((self._phys_addr, self._data, self._pio)
                == (other._phys_addr, other._data, other._pio))

    def __hash__(self) -> int:
        return hash((self._phys_addr, self._data, self._pio))

    def __repr__(self) -> str:
        return f"Entry(phys_addr={self._phys_addr:#x}, data={self._data!r}, pio={self._pio})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Entry, (self._phys_addr, self._data, self._pio))


Handler = Callable[[int, bytes, bool], object]
_Record = tuple[int, bytes, bool]


# Rings alive in this process; a forked child gets fresh locks, as the C ring does.
_live_rings: weakref.WeakSet[Ring] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for ring in list(_live_rings):
        ring._forget_parent_threads()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Ring:
    """A coalesced MMIO/PIO ring over a writable, C-contiguous buffer; see ``_ring.pyi``."""

    def __init__(self, buffer: Any, *, nbytes: int | None = None,
                 legacy_full_check: bool = False) -> None:
        if getattr(self, "_view", None) is not None:
            raise RuntimeError("Ring.__init__ called on a live ring")
        view = _byte_view(buffer, "Ring needs")
        try:
            if view.nbytes < MIN_RING_NBYTES:
                raise ValueError(f"Ring buffer of {view.nbytes} bytes is smaller than the "
                                 f"{MIN_RING_NBYTES}-byte minimum ring")
            if nbytes is None:
                nbytes = view.nbytes
            else:
                try:
                    nbytes = operator.index(nbytes)
                except TypeError:
                    raise TypeError(f"nbytes must be an int, not {_typename(nbytes)}") from None
                if not MIN_RING_NBYTES <= nbytes <= view.nbytes:
                    raise ValueError(f"nbytes={nbytes} must be between {MIN_RING_NBYTES} and the "
                                     f"buffer's {view.nbytes} bytes")
            slots = ring_max(nbytes)
            address = _address(view)
            if address % _INDEX.size:
                raise ValueError(f"Ring buffer at {address:#x} is not 4-byte aligned")
        except BaseException:
            view.release()
            raise
        self._view: memoryview | None = view
        self._address = address
        self._max = slots
        self._nbytes = nbytes
        self._legacy = bool(legacy_full_check)
        self._lock = threading.Lock()
        self._owner: int | None = None   # thread running a consumer call
        _live_rings.add(self)

    def _forget_parent_threads(self) -> None:
        """In a forked child: the lock and owner were a parent thread's, which is not here."""
        self._lock = threading.Lock()
        self._owner = None

    # -- state -------------------------------------------------------------

    def _live(self) -> memoryview:
        if self._view is None:
            raise ValueError("operation on a released Ring")
        return self._view

    def _in_consumer(self) -> bool:
        # Only the owner itself can see its own ident here, so no race.
        return self._owner == threading.get_ident()

    @contextmanager
    def _consumer(self) -> Iterator[memoryview | None]:
        """Serialize consumer calls; yields None to a call nested in a handler."""
        if self._in_consumer():
            yield None
            return
        with self._lock:
            # release() may have run while we waited.
            view = self._live()
            self._owner = threading.get_ident()
            try:
                yield view
            finally:
                self._owner = None

    @property
    def max(self) -> int:
        """Slots in the ring, ``ring_max(nbytes)``."""
        self._live()
        return self._max

    @property
    def capacity(self) -> int:
        """Entries the ring can hold: ``max - 1``."""
        self._live()
        return self._max - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer the ring occupies."""
        self._live()
        return self._nbytes

    @property
    def first(self) -> int:
        """The consumer index as it is in memory now (not validated)."""
        return _INDEX.unpack_from(self._live(), _FIRST_OFFSET)[0]

    @property
    def last(self) -> int:
        """The producer index as it is in memory now (not validated)."""
        return _INDEX.unpack_from(self._live(), _LAST_OFFSET)[0]

    @property
    def legacy_full_check(self) -> bool:
        """Whether :meth:`push` reproduces the pre-6.12 full check."""
        self._live()
        return self._legacy

    @property
    def released(self) -> bool:
        """True after :meth:`release`."""
        return self._view is None

    def __len__(self) -> int:
        """Entries pending; RingCorruptedError if an index is out of range."""
        return self._begin(self._live())[1]

    def reset(self) -> None:
        """Empty the ring: set ``first`` and ``last`` to 0."""
        self._live()
        if self._in_consumer():
            raise RuntimeError("Ring.reset() called from inside consume() on the same ring")
        with self._lock:
            _HEADER.pack_into(self._live(), 0, 0, 0)

    def release(self) -> None:
        """Let go of the buffer; later calls raise ValueError.  Idempotent."""
        if self._view is None:
            return
        if self._in_consumer():
            raise RuntimeError("Ring.release() called from inside consume() on the same ring")
        with self._lock:
            if self._view is not None:
                self._view.release()
                self._view = None

    def __enter__(self) -> Ring:
        self._live()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        name = f"{type(self).__module__}.{type(self).__qualname__}"
        if self._view is None:
            return f"<{name} released>"
        return f"<{name} max={self._max} first={self.first} last={self.last}>"

    # -- producer ----------------------------------------------------------

    def push(self, phys_addr: int, data: Any, *, pio: bool = False) -> bool:
        """Record a write as the kernel does; False if the kernel would refuse it."""
        view = self._live()
        phys_addr = _check_phys_addr(phys_addr)
        pio = _check_pio(pio)
        raw = _check_data(data)
        # first is only compared, never used as an index, so it needs no check.
        first, insert = _HEADER.unpack_from(view, 0)
        if insert >= self._max:
            return False
        if self._legacy:
            # Linux < 6.12: unsigned 32-bit (first - last - 1) % MAX == 0.
            full = ((first - insert - 1) & 0xFFFFFFFF) % self._max == 0
        else:
            full = (insert + 1) % self._max == first
        if full:
            return False
        # "8s" pads with zeros; the entry is complete before last moves.
        ENTRY_STRUCT.pack_into(view, RING_HEADER_SIZE + insert * ENTRY_SIZE,
                         phys_addr, len(raw), int(pio), raw)
        _INDEX.pack_into(view, _LAST_OFFSET, (insert + 1) % self._max)
        return True

    def push_many(self, records: Any) -> int:
        """Push raw 24-byte records in order, each as :meth:`push` would; how many it took."""
        self._live()
        with _byte_view(records, "push_many() needs", writable=False) as src:
            # (ctypes finds the address of writable memory only; a read-only
            # view of the ring's own memory goes unnoticed here.)
            if src.nbytes and not src.readonly and (
                    _address(src) < self._address + self._nbytes
                    and self._address < _address(src) + src.nbytes):
                raise ValueError("push_many(): records overlap the ring's own memory")
            raw = src.tobytes()
        if len(raw) % ENTRY_SIZE:
            raise ValueError(f"push_many() needs whole 24-byte records, not {len(raw)} bytes")
        batch = list(ENTRY_STRUCT.iter_unpack(raw))
        # Every record is checked before any is pushed: bad input pushes nothing.
        for i, (_phys_addr, length, pio, _data) in enumerate(batch):
            if not (1 <= length <= _MAX_DATA and pio in (0, 1)):
                raise ValueError(
                    f"push_many(): record {i} has len={length} and pio={pio}; "
                    f"expected len 1 to {_MAX_DATA} and pio 0 or 1")
        done = 0
        for phys_addr, length, pio, data in batch:
            if not self.push(phys_addr, data[:length], pio=bool(pio)):
                break
            done += 1
        return done

    # -- consumer ----------------------------------------------------------

    def _begin(self, view: memoryview) -> tuple[int, int]:
        """Validate both indices; return ``(first, pending)``."""
        first, last = _HEADER.unpack_from(view, 0)
        for field, value in (("first", first), ("last", last)):
            if value >= self._max:
                raise RingCorruptedError(
                    f"ring index {field}={value} is out of range for a ring of {self._max} slots",
                    field=field, value=value, index=None)
        return first, (last - first) % self._max

    def _read(self, view: memoryview, idx: int) -> _Record:
        """Copy slot *idx* out once and validate the copy."""
        phys_addr, length, pio, data = ENTRY_STRUCT.unpack_from(view, RING_HEADER_SIZE + idx * ENTRY_SIZE)
        if not 1 <= length <= _MAX_DATA:
            raise RingCorruptedError(
                f"entry at slot {idx} has len={length}, expected 1 to {_MAX_DATA}",
                field="len", value=length, index=idx)
        if pio > 1:
            raise RingCorruptedError(f"entry at slot {idx} has pio={pio}, expected 0 or 1",
                                     field="pio", value=pio, index=idx)
        return phys_addr, data[:length], bool(pio)

    def _collect(self, view: memoryview, limit: int | None) -> list[_Record]:
        """Consume up to *limit* entries, publishing ``first`` once at the end.

        A corrupt entry ends the batch: the good ones before it are returned
        and it stays at ``first``; if it is the first one, raise instead.
        """
        first, pending = self._begin(view)
        count = pending if limit is None else min(pending, limit)
        records: list[_Record] = []
        idx = first
        for _ in range(count):
            try:
                records.append(self._read(view, idx))
            except RingCorruptedError:
                if not records:
                    raise
                break
            idx = (idx + 1) % self._max
        if records:
            _INDEX.pack_into(view, _FIRST_OFFSET, idx)
        return records

    def pop(self) -> Entry | None:
        """Consume and return the oldest entry, or None if the ring is empty."""
        self._live()
        with self._consumer() as view:
            if view is None:
                return None
            records = self._collect(view, 1)
        return Entry._trusted(*records[0]) if records else None

    def drain(self, limit: int | None = None) -> list[Entry]:
        """Consume and return the pending entries (at most *limit*), oldest first."""
        self._live()
        limit = _check_limit(limit)
        with self._consumer() as view:
            if view is None:
                return []
            records = self._collect(view, limit)
        return [Entry._trusted(*record) for record in records]

    def drain_into(self, out: Any) -> int:
        """Copy pending entries into *out* as raw 24-byte ABI records; return how many."""
        self._live()
        with _byte_view(out, "out must be") as dst:
            # As in the C core, which copies the batch, then checks it in out.
            if dst.nbytes and (_address(dst) < self._address + self._nbytes
                               and self._address < _address(dst) + dst.nbytes):
                raise ValueError("drain_into(): out overlaps the ring's own memory")
            with self._consumer() as view:
                if view is None:
                    return 0
                _first, pending = self._begin(view)
                batch = min(pending, dst.nbytes // ENTRY_SIZE)
                try:
                    records = self._collect(view, batch)
                except RingCorruptedError:
                    records = []
                    raise
                finally:
                    # Like the C core, which copies the batch and checks the
                    # copy: the records from a corrupt entry on are zeroed.
                    dst[len(records) * ENTRY_SIZE:batch * ENTRY_SIZE] = bytes(
                        (batch - len(records)) * ENTRY_SIZE)
            for i, (phys_addr, data, pio) in enumerate(records):
                ENTRY_STRUCT.pack_into(dst, i * ENTRY_SIZE, phys_addr, len(data), int(pio), data)
        return len(records)

    def consume(self, handler: Handler, limit: int | None = None) -> int:
        """Call ``handler(phys_addr, data, pio)`` for each pending entry, in order."""
        self._live()
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {_typename(handler)}")
        limit = _check_limit(limit)
        with self._consumer() as view:
            if view is None:
                return 0
            first, pending = self._begin(view)
            count = pending if limit is None else min(pending, limit)
            idx = first
            for _ in range(count):
                record = self._read(view, idx)
                idx = (idx + 1) % self._max
                # Consumed before the handler runs: a raising handler never
                # sees the same entry twice.
                _INDEX.pack_into(view, _FIRST_OFFSET, idx)
                handler(*record)
            return count

    def __iter__(self) -> Ring:
        """Iterate by popping: each step consumes one entry; stops when empty."""
        self._live()
        return self

    def __next__(self) -> Entry:
        entry = self.pop()
        if entry is None:
            raise StopIteration
        return entry
