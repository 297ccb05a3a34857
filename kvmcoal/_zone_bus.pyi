"""Type stubs of the emulated kernel's zone bus (kvmcoal._zone_bus, from src/zone_bus.pyx),
the write path of kvmcoal.EmulatedVm."""

from typing import final

from typing_extensions import Buffer, disjoint_base

from kvmcoal._ring import Ring


@final
class _ZoneTable:
    """One bus's zones ``(addr, size, ring or None)`` in the kernel's bus order."""
    def __init__(self, entries: list[tuple[int, int, Ring | None]]) -> None: ...

def insert_position(entries: list[tuple[int, int, object]], addr: int, size: int) -> int:
    """Where kvm_io_bus_register_dev inserts the zone (addr, size) into *entries*."""

@disjoint_base
class _ZoneBus:
    def _forget_writers(self) -> None: ...
    def _write_stats(self) -> tuple[int, int, int, int]: ...
    def _set_zones(self, pio: bool, entries: list[tuple[int, int, Ring | None]]) -> None: ...
    def write(self, phys_addr: int, data: Buffer, *, pio: bool = False) -> bool:
        """A guest store: True if coalesced into a zone's ring, False for the exit path."""
