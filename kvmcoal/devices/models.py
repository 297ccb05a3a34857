"""Small device models that show where coalescing pays."""

from __future__ import annotations

import threading

__all__ = ["Doorbell", "Framebuffer", "IndexDataPair", "Uart16550"]


class Uart16550:
    """The transmit side of a 16550 UART at 8 consecutive ports.

    Offset 0 is THR (transmit: written bytes are appended to :attr:`output`),
    offset 5 is LSR (always "transmitter empty", 0x60).  Map THR coalesced
    and the rest flush-on-access::

        bus.map(uart, 0x3F8, 1, pio=True, coalesced=True)
        bus.map(uart, 0x3F9, 7, pio=True, flush_on_access=True, device_offset=1)
    """

    THR, LSR = 0, 5
    LSR_EMPTY = 0x60

    def __init__(self) -> None:
        self.output = bytearray()

    def read(self, offset: int, size: int) -> int:
        return self.LSR_EMPTY if offset == self.LSR else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == self.THR:
            self.output.append(value & 0xFF)


class Framebuffer:
    """A linear framebuffer: an MMIO region backed by a bytearray.

    Mapped over a range larger than its memory, it reads the bytes past the
    end as zero and ignores writes there (the memory never grows or shifts).
    """

    def __init__(self, size: int) -> None:
        self.memory = bytearray(size)
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        if offset < 0:       # bytes before the memory read as zero
            return int.from_bytes(self.memory[0:max(offset + size, 0)], "little") << (-8 * offset) \
                if offset + size > 0 else 0
        return int.from_bytes(self.memory[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        # Only the bytes inside the memory land: a slice reaching past either
        # end would grow the bytearray or count from its far end.
        start, end = max(offset, 0), min(offset + size, len(self.memory))
        if start < end:
            self.memory[start:end] = value.to_bytes(size, "little")[start - offset:end - offset]
        self.writes += 1


class IndexDataPair:
    """An index register and a data register over a register file (PCI config 0xcf8/0xcfc).

    Map :attr:`index` coalesced and :attr:`data` flush-on-access: a data
    access then always sees the index the guest wrote last.
    """

    def __init__(self, registers: dict[int, int] | None = None) -> None:
        self.registers: dict[int, int] = dict(registers or {})
        self.current = 0
        self.index = _IndexRegister(self)
        self.data = _DataRegister(self)


class _IndexRegister:
    def __init__(self, pair: IndexDataPair) -> None:
        self._pair = pair

    def read(self, offset: int, size: int) -> int:
        return self._pair.current

    def write(self, offset: int, size: int, value: int) -> None:
        self._pair.current = value


class _DataRegister:
    def __init__(self, pair: IndexDataPair) -> None:
        self._pair = pair

    def read(self, offset: int, size: int) -> int:
        return self._pair.registers.get(self._pair.current, 0xFFFFFFFF) & ((1 << 8 * size) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self._pair.registers[self._pair.current] = value


class Doorbell:
    """A doorbell register: every written value is a request, kept in :attr:`requests`.

    Map it ``coalesced=True, own_buffer=True`` and start the bus's pollers:
    the values reach it as they are written, on the poller thread.
    """

    def __init__(self) -> None:
        self.requests: list[int] = []
        self.event = threading.Event()

    def read(self, offset: int, size: int) -> int:
        return len(self.requests)

    def write(self, offset: int, size: int, value: int) -> None:
        self.requests.append(value)
        self.event.set()
