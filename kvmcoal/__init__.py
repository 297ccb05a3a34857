"""kvmcoal: the Linux KVM coalesced MMIO/PIO ring for Python.

The ring is the shared page on which a producer (the kernel, or kvmcoal's
model of it) records guest writes to device registers, and from which a
consumer replays them, in order, without a VM exit per write.

Set ``KVMCOAL_NO_EXTENSIONS=1`` to make ``kvmcoal.Ring``, ``kvmcoal.Entry``
and ``kvmcoal.ring_max`` the pure-Python twin of the ring instead of the C
core (slower; the same behaviour).  The rings that ``EmulatedVm``,
``CoalescedBuffer`` and ``kvmcoal.kvm.Vm`` make stay C rings, with C
entries: they need the core's producer lock and wakeups.
"""

from __future__ import annotations

import importlib.util as _importlib_util
import os as _os
from typing import Any

from .errors import KvmcoalError, RingCorruptedError

if not _os.environ.get("KVMCOAL_NO_EXTENSIONS"):
    from . import _ring as _impl
else:
    from . import _ring_py as _impl  # type: ignore[no-redef]

ENTRY_SIZE: int = _impl.ENTRY_SIZE
RING_HEADER_SIZE: int = _impl.RING_HEADER_SIZE
MIN_RING_SIZE: int = _impl.MIN_RING_SIZE
PAGE_SIZE: int = _impl.PAGE_SIZE
RING_MAX: int = _impl.RING_MAX
ring_max = _impl.ring_max
Entry = _impl.Entry
Ring = _impl.Ring

from .buffers import BufferForkedError, CoalescedBuffer  # noqa: E402
from .bus import Bus, BusError, MappingOverlapError, UnmappedAccessError  # noqa: E402
from .emulated import BUS_DEVICE_LIMIT, BusFullError, EmulatedVm  # noqa: E402
from .zones import Zone  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BUS_DEVICE_LIMIT",
    "BufferForkedError",
    "Bus",
    "BusError",
    "BusFullError",
    "CoalescedBuffer",
    "ENTRY_DTYPE",
    "ENTRY_SIZE",
    "MIN_RING_SIZE",
    "PAGE_SIZE",
    "RING_HEADER_SIZE",
    "RING_MAX",
    "EmulatedVm",
    "Entry",
    "KvmcoalError",
    "MappingOverlapError",
    "Ring",
    "RingCorruptedError",
    "UnmappedAccessError",
    "Zone",
    "ring_max",
]
# numpy is optional: without it ENTRY_DTYPE does not exist, and
# ``from kvmcoal import *`` must not name it.
_HAVE_NUMPY = _importlib_util.find_spec("numpy") is not None
if not _HAVE_NUMPY:
    __all__.remove("ENTRY_DTYPE")


def __getattr__(name: str) -> Any:
    # ENTRY_DTYPE is built on first use so that importing kvmcoal never
    # imports numpy; without numpy the attribute does not exist.
    if name == "ENTRY_DTYPE":
        try:
            import numpy
        except ImportError:
            raise AttributeError(
                "kvmcoal.ENTRY_DTYPE needs numpy, which is not installed") from None
        dtype = numpy.dtype({
            "names": ["phys_addr", "len", "pio", "data"],
            "formats": ["<u8", "<u4", "<u4", ("u1", (8,))],
            "offsets": [0, 8, 12, 16],
            "itemsize": ENTRY_SIZE,
        })
        globals()["ENTRY_DTYPE"] = dtype
        return dtype
    raise AttributeError(f"module 'kvmcoal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | ({"ENTRY_DTYPE"} if _HAVE_NUMPY else set()))
