"""Exceptions raised by kvmcoal.

Every error kvmcoal raises on its own account derives from
:class:`KvmcoalError`.  Bad arguments raise the built-in :class:`ValueError`
or :class:`TypeError` instead, with a message that names the bad value, and
failures of the operating system keep their :class:`OSError` and ``errno``.
"""

from __future__ import annotations

__all__ = ["KvmcoalError", "RingCorruptedError"]


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
