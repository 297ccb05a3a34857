"""Type stubs of the v2 API's router on real KVM (kvmcoal.kvm._router, from src/router.pyx).

kvmcoal.kvm.Vm makes and drives it; see its docstring and docs/WAKEUPS.md.
"""

from typing import final

from kvmcoal._ring import Ring
from kvmcoal._zone_bus import _ZoneTable


@final
class Router:
    """Moves the kernel ring's entries of buffer-bound zones into their buffers."""

    held: int
    """Entries the last pass left in the kernel ring behind a full buffer."""
    routed: int
    """Entries moved into buffers so far."""
    dropped: int
    """Entries dropped: their buffer was closed, or its consumer broke its ring."""
    watching: bool
    """Whether the watcher thread runs."""
    passes: int
    """Passes the watcher made (idle ones included)."""
    watcher_cpu_ns: int
    """CPU time the last watcher thread used, set when it stopped."""

    def __init__(self, kernel_ring: Ring) -> None: ...
    def route(self) -> int:
        """Route now; how many entries a full buffer still holds back."""
    def check(self) -> None:
        """Raise the OSError of a buffer wakeup that failed since the last check."""
    def install(self, mmio: _ZoneTable, pio: _ZoneTable) -> None:
        """Route entries written from here on with these tables."""
    def attach(self) -> None:
        """Make the kernel ring's consumer calls route first."""
    def stop(self) -> None:
        """No more passes: stops the watcher and detaches from the ring."""
    def forked(self) -> None:
        """In a forked child: the watcher is not here, the ring is the parent's."""
    def start_watcher(self, interval_us: int, spin_us: int) -> None:
        """Start the watcher thread."""
    def stop_watcher(self) -> None:
        """Stop the watcher thread and wait for it.  Idempotent."""
    def trace(self, mmio_id: int, pio_id: int) -> None:
        """Make the watcher sleep on tracepoint hits instead of a timer."""
    def trace_thread(self, tid: int, mmio_filter: bytes, pio_filter: bytes) -> None:
        """Open the tracepoint events of thread *tid* and watch them."""
    def traced(self) -> set[int]:
        """The threads whose tracepoint events are open."""
    def untrace(self) -> None:
        """Close every tracepoint event (the watcher is stopped)."""
