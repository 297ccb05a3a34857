"""kvmcoal: the Linux KVM coalesced MMIO/PIO ring for Python.

The ring is the shared page on which a producer (the kernel, or kvmcoal's
model of it) records guest writes to device registers, and from which a
consumer replays them, in order, without a VM exit per write.

The package needs its C extensions (``kvmcoal._ring``, ``kvmcoal._zone_bus``,
``kvmcoal.kvm._abi``).  ``kvmcoal._ring_py`` is a pure-Python twin of the
ring, kept as the tests' oracle: every core ring test runs against both.
"""

from __future__ import annotations

import importlib.util as _importlib_util
import os as _os
from typing import Any

from .errors import (BufferForkedError, BusError, GuestError, KvmcoalError,  # noqa: F401
                     KvmUnavailableError, MappingOverlapError, RingCorruptedError,
                     UnmappedAccessError, ZoneLimitError)

try:
    from ._ring import (ENTRY_SIZE, MIN_RING_NBYTES, PAGE_SIZE, RING_HEADER_SIZE, RING_MAX,
                        Entry, Ring, ring_max)
except ImportError as _exc:
    _here = _os.path.dirname(_os.path.abspath(__file__))
    if not any(name.startswith("_ring.") and name.endswith(".so") for name in _os.listdir(_here)):
        raise ImportError(
            f"kvmcoal's C extension is not built in {_here}: this is a source tree "
            f"(it shadows any installed kvmcoal while it is the current directory or on "
            f"sys.path). Build it in place with pip install -e . (or python setup.py "
            f"build_ext --inplace), or run Python from another directory.") from _exc
    raise

from ._ring_py import ENTRY_STRUCT  # noqa: E402  (struct kvm_coalesced_mmio, for struct users)
from .buffers import CoalescedBuffer  # noqa: E402
from .bus import BATCH_LIMIT, BATCH_MIN, BatchDevice, Bus, Device, Mapping  # noqa: E402
from .emulated import EmulatedVm  # noqa: E402
from .zones import ZONE_LIMIT, Zone  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BATCH_LIMIT",
    "BATCH_MIN",
    "BatchDevice",
    "BufferForkedError",
    "Bus",
    "BusError",
    "CoalescedBuffer",
    "Device",
    "ENTRY_DTYPE",
    "ENTRY_SIZE",
    "ENTRY_STRUCT",
    "EmulatedVm",
    "Entry",
    "GuestError",
    "KvmUnavailableError",
    "KvmcoalError",
    "MIN_RING_NBYTES",
    "Mapping",
    "MappingOverlapError",
    "PAGE_SIZE",
    "RING_HEADER_SIZE",
    "RING_MAX",
    "Ring",
    "RingCorruptedError",
    "UnmappedAccessError",
    "ZONE_LIMIT",
    "Zone",
    "ZoneLimitError",
    "get_include",
    "ring_max",
]
# numpy is optional: without it ENTRY_DTYPE does not exist, and
# ``from kvmcoal import *`` must not name it.
_HAVE_NUMPY = _importlib_util.find_spec("numpy") is not None
if not _HAVE_NUMPY:
    __all__.remove("ENTRY_DTYPE")


def get_include() -> str:
    """The directory of ``ring_impl.h``, for Cython code that ``cimport``s kvmcoal._ring.

    >>> import os
    >>> os.path.isfile(os.path.join(get_include(), "ring_impl.h"))
    True
    """
    return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "include")


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
