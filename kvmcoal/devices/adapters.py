"""Plug existing device models into a Bus unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Avatar2Peripheral", "FunctionDevice", "UnicornMmio"]


class FunctionDevice:
    """A device from two callables: ``read(offset, size) -> int``, ``write(offset, size, value)``.

    Either may be None: reads then return 0 and writes are ignored.
    """

    def __init__(self, read: Callable[[int, int], int] | None = None,
                 write: Callable[[int, int, int], object] | None = None) -> None:
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        return self._read(offset, size) if self._read is not None else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self._write is not None:
            self._write(offset, size, value)


class UnicornMmio:
    """Callbacks written for unicorn's ``uc.mmio_map(...)``, on a kvmcoal Bus.

    unicorn calls ``read_cb(uc, offset, size, user_data) -> int`` and
    ``write_cb(uc, offset, size, value, user_data)``; *uc* is passed through
    as given (None by default), since there is no unicorn engine here.
    """

    def __init__(self, read_cb: Callable[..., int] | None, user_data_read: Any = None,
                 write_cb: Callable[..., object] | None = None, user_data_write: Any = None,
                 *, uc: Any = None) -> None:
        self._read_cb, self._user_data_read = read_cb, user_data_read
        self._write_cb, self._user_data_write = write_cb, user_data_write
        self._uc = uc

    def read(self, offset: int, size: int) -> int:
        if self._read_cb is None:
            return 0
        return self._read_cb(self._uc, offset, size, self._user_data_read)

    def write(self, offset: int, size: int, value: int) -> None:
        if self._write_cb is not None:
            self._write_cb(self._uc, offset, size, value, self._user_data_write)


class Avatar2Peripheral:
    """An avatar2-style peripheral (``hw_read(offset, size)``, ``hw_write(offset, size, value)``)."""

    def __init__(self, peripheral: Any) -> None:
        for method in ("hw_read", "hw_write"):
            if not callable(getattr(peripheral, method, None)):
                raise TypeError(f"{type(peripheral).__name__} has no {method}() method")
        self.peripheral = peripheral

    def read(self, offset: int, size: int) -> int:
        return int(self.peripheral.hw_read(offset, size))

    def write(self, offset: int, size: int, value: int) -> None:
        self.peripheral.hw_write(offset, size, value)
