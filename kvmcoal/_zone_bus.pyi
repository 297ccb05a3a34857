"""Type stubs of the emulated kernel's zone bus (kvmcoal._zone_bus, from src/zone_bus.pyx),
the write path of kvmcoal.EmulatedVm."""

from typing_extensions import Buffer, disjoint_base

from kvmcoal._ring import Ring


@disjoint_base
class _ZoneBus:
    def _forget_writers(self) -> None: ...
    def _set_zones(self, pio: bool, entries: list[tuple[int, int, Ring]]) -> None: ...
    def write(self, phys_addr: int, data: Buffer, *, pio: bool = False) -> bool:
        """A guest store: True if coalesced into a zone's ring, False for the exit path."""
