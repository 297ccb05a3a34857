"""Coalesced zones: the guest-physical (or port) ranges whose writes go to a ring.

>>> z = Zone(0xFE000000, 0x1000)
>>> z.contains(0xFE000ff8, 8), z.contains(0xFE000ffc, 8)
(True, False)
"""

from __future__ import annotations

from typing import Any

__all__ = ["ZONE_LIMIT", "Zone"]

ZONE_LIMIT = 1000
"""Zones of one kind (MMIO, PIO) a VM may have: the kernel's NR_IOBUS_DEVS."""

_U64 = 1 << 64
_U32 = 1 << 32


def _check_int(name: str, value: Any, limit: int, kind: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__!r}")
    if not 0 <= value < limit:
        raise ValueError(f"{name}={value:#x} is out of the {kind} range")
    return value


class Zone:
    """A coalesced range ``[addr, addr + size)``, MMIO or (``pio=True``) port I/O.

    Immutable and hashable; the same triple as ``struct kvm_coalesced_mmio_zone``
    (u64 address, u32 size).  Zero-sized and overlapping zones are allowed, as
    the kernel allows them.
    """

    __slots__ = ("_addr", "_size", "_pio")
    _addr: int
    _size: int
    _pio: bool

    def __init__(self, addr: int, size: int, *, pio: bool = False) -> None:
        if hasattr(self, "_addr"):   # a registered zone's hash and place must not change
            raise TypeError("Zone is immutable: __init__ cannot be called again")
        object.__setattr__(self, "_addr", _check_int("addr", addr, _U64, "u64"))
        object.__setattr__(self, "_size", _check_int("size", size, _U32, "u32"))
        if not isinstance(pio, bool):
            raise TypeError(f"pio must be True or False, not {pio!r}")
        object.__setattr__(self, "_pio", pio)

    @property
    def addr(self) -> int:
        """First address (or port) of the zone."""
        return self._addr

    @property
    def size(self) -> int:
        """Bytes (or ports) the zone covers."""
        return self._size

    @property
    def pio(self) -> bool:
        """True for a port I/O zone, False for MMIO."""
        return self._pio

    @property
    def end(self) -> int:
        """``addr + size`` as the kernel computes it: modulo 2**64."""
        return (self._addr + self._size) % _U64

    def contains(self, addr: int, length: int) -> bool:
        """Whether a *length*-byte access at *addr* lies wholly inside the zone.

        The kernel's rule (coalesced_mmio_in_range): a negative length, or an
        access whose end overflows 64 bits, is never inside; otherwise it must
        start at or after ``addr`` and end at or before ``end`` (which itself
        wraps for a zone that reaches the top of the address space).
        """
        if length < 0 or not 0 <= addr < _U64:
            return False
        if addr + length >= _U64:
            return False
        return addr >= self._addr and addr + length <= self.end

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Zone is immutable; cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Zone):
            return NotImplemented
        return (self._addr, self._size, self._pio) == (other._addr, other._size, other._pio)

    def __hash__(self) -> int:
        return hash((self._addr, self._size, self._pio))

    def __repr__(self) -> str:
        pio = ", pio=True" if self._pio else ""
        return f"Zone({self._addr:#x}, {self._size:#x}{pio})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_zone, (self._addr, self._size, self._pio))


def _make_zone(addr: int, size: int, pio: bool) -> Zone:
    return Zone(addr, size, pio=pio)
