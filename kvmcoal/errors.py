"""Exceptions raised by kvmcoal.

Every error kvmcoal raises on its own account derives from
:class:`KvmcoalError`.  Bad arguments raise the built-in :class:`ValueError`
or :class:`TypeError` instead, with a message that names the bad value, and
failures of the operating system keep their :class:`OSError` and ``errno``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kvm.exits import Exit

__all__ = ["BufferForkedError", "BusError", "CBuildUnavailable", "GuestError", "InvalidSample",
           "KvmUnavailableError", "KvmcoalError", "MappingOverlapError", "PeerMissing",
           "RingCorruptedError", "UnmappedAccessError", "Unmeasured", "ZoneLimitError"]


class KvmcoalError(Exception):
    """Base class of the errors that kvmcoal raises on its own account."""


class RingCorruptedError(KvmcoalError):
    """The shared ring holds a value its producer can never have written.

    Raised by the consumer side when ``first`` or ``last`` is out of range or
    an entry's ``len`` (1..8) or ``pio`` flag (0 or 1) is invalid.  Nothing is
    read or written out of bounds before it is raised.  Entries in front of a
    corrupt one are still delivered; the corrupt entry stays at ``first``, so
    every later consumer call raises again until the ring is :meth:`reset`.

    Attributes:
        field: which value is bad: ``"first"``, ``"last"``, ``"len"`` or ``"pio"``.
        value: the bad value as it was read.
        index: the slot of the bad entry (``None`` for ``first``/``last``).
    """

    def __init__(self, message: str, field: str = "", value: int = 0,
                 index: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value
        self.index = index


class BufferForkedError(KvmcoalError):
    """A buffer or a VM's ring was used in a child process that inherited it across fork().

    The child's copy of a :class:`~kvmcoal.CoalescedBuffer` (and of its Ring),
    and of a :class:`kvmcoal.kvm.Vm`'s ring, is cut loose at the fork, so
    nothing in the child consumes or writes the parent's ring by accident.
    To use a buffer's ring in the child on purpose, attach to it:
    ``CoalescedBuffer.attach(*fds)`` with the file descriptors from
    :meth:`~kvmcoal.CoalescedBuffer.fds`, which the child inherited.
    """


class BusError(KvmcoalError):
    """Base of the bus's own errors."""


class MappingOverlapError(BusError, ValueError):
    """A new mapping overlaps an existing one; the message names both."""


class UnmappedAccessError(BusError, LookupError):
    """An access hit no mapping (with ``unmapped="raise"``)."""


class ZoneLimitError(KvmcoalError, OSError):
    """A VM already holds :data:`kvmcoal.ZONE_LIMIT` zones of one kind, MMIO or PIO.

    The kernel keeps each kind's zones on an I/O bus of at most NR_IOBUS_DEVS
    devices and fails with ENOSPC past it; this is that limit, not anything
    of :class:`kvmcoal.Bus`.
    """

    def __init__(self, pio: bool, limit: int) -> None:
        kind = "PIO" if pio else "MMIO"
        super().__init__(errno.ENOSPC, f"this VM already has {limit} {kind} zones, the "
                                       f"kernel's limit of devices on its {kind} bus")


class KvmUnavailableError(KvmcoalError):
    """/dev/kvm cannot be used here; the message says why and what to do."""


class GuestError(KvmcoalError):
    """The guest stopped in a way the run loop cannot continue from.

    ``exit`` is the exit that ended it (shutdown, failed entry, internal
    error or an exit reason the loop does not handle).
    """

    def __init__(self, exit: Exit) -> None:
        super().__init__(f"the guest stopped: {exit}")
        self.exit = exit


# -- kvmcoal bench: how a benchmark says that a figure cannot be had here --


class CBuildUnavailable(KvmcoalError, RuntimeError):
    """A C baseline cannot be built here; the message says why."""


class InvalidSample(KvmcoalError):
    """A sample failed its benchmark's own timing check (a busy machine): measure it again.

    Only for checks about timing.  A data check that fails (an entry lost,
    reordered or wrong) raises AssertionError instead: that is a bug, and
    no retry may hide it.
    """


class Unmeasured(KvmcoalError):
    """A figure whose samples kept failing their timing check; the message is the reason."""


class PeerMissing(KvmcoalError):
    """A peer's package does not import, so its figures are reported as missing.

    ``package`` is the name it is installed by (the ``bench`` extra lists
    it); the message, the ``reason`` of a "missing" entry or of a pytest
    skip, names it and carries the ImportError's text.
    """

    def __init__(self, package: str, error: ImportError) -> None:
        super().__init__(f"{package} does not import: {error}")
        self.package = package
