"""Type stubs of the Bus's delivery in C (kvmcoal._dispatch, from src/dispatch.pyx).

Internal to :class:`kvmcoal.Bus`: it makes one Dispatcher and a Target per mapping.
"""

from collections.abc import Callable, Iterable
from typing import Any, final

from typing_extensions import Buffer, Self

from kvmcoal._ring import Ring

BATCH_LIMIT: int
BATCH_MIN: int


@final
class Target:
    """One mapping as delivery sees it."""
    @property
    def mapping(self) -> Any: ...
    def __init__(self, mapping: Any, device: Any, base: int, size: int, pio: bool,
                 delta: int, ring: Ring | None) -> None: ...
    def stats(self) -> dict[str, int]:
        """The mapping's counters: delivered, direct, flushes, largest_batch."""
    def count_direct(self) -> None:
        """Count one access delivered at once."""


@final
class Dispatcher:
    """The delivery of one Bus, from its rings to its devices."""
    @property
    def flushes(self) -> int: ...
    @property
    def flushes_with_entries(self) -> int: ...
    @property
    def delivered(self) -> int: ...
    def __init__(self, unmapped: Callable[[int, int, bool, str], object],
                 records: Callable[[bytes], Any]) -> None: ...
    def set_vm_ring(self, ring: Ring | None, source: Callable[[], Ring | None] | None = None
                    ) -> None: ...
    def set_targets(self, pio: bool, targets: Iterable[Target]) -> None: ...
    def add_buffer(self, t: Target) -> None: ...
    def remove_buffer(self, t: Target) -> None: ...
    def find(self, addr: int, size: int, pio: bool) -> Any: ...
    def target(self, addr: int, size: int, pio: bool) -> Target | None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...
    def owned(self) -> bool: ...
    def _after_fork(self) -> None: ...
    def flush(self) -> int:
        """Deliver every pending entry; how many."""
    def drain(self, t: Target) -> int:
        """Deliver what *t*'s own buffer holds; how many."""
    def deliver(self, addr: int, data: Buffer, pio: bool) -> None:
        """Deliver one write now (an exit's)."""
