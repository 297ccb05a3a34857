"""Small device models that show where coalescing pays."""

from __future__ import annotations

import threading
from typing import Any

from .._ring_py import ENTRY_STRUCT

__all__ = ["Doorbell", "Framebuffer", "IndexDataPair", "PciConfig", "Uart16550"]


class Uart16550:
    """A 16550A UART in polled mode, at 8 consecutive ports (0x3F8 for COM1).

    Every register a driver probes behaves as the 16550A's: THR/RBR and
    DLL at offset 0 and IER and DLM at 1 (chosen by LCR's DLAB bit), IIR
    (read) and FCR (write) at 2, LCR at 3, MCR at 4, LSR at 5, MSR at 6 and
    SCR at 7, with the loopback mode (MCR bit 4) that Linux's 8250 driver
    uses to detect the chip.  Transmitted bytes are appended to
    :attr:`output` at once (the transmitter is always empty); bytes given to
    :meth:`feed` are what the guest receives.  No interrupt line is raised
    (polled mode), but IIR identifies the pending interrupt as the chip
    does (received data, then transmitter empty, as IER enables them), so a
    driver polling IIR, as Linux's 8250 driver does without an IRQ, works.

    Map THR coalesced and the rest flush-on-access::

        bus.map(uart, 0x3F8, 1, pio=True, coalesced=True)
        bus.map(uart, 0x3F9, 7, pio=True, flush_on_access=True, device_offset=1)

    With DLAB set, offset 0 is the divisor latch: those writes are coalesced
    too, and still reach the device in order, after the LCR write that set
    DLAB (an access to LCR flushes first).
    """

    THR = RBR = DLL = 0
    IER = DLM = 1
    IIR = FCR = 2
    LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7
    LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
    LSR_EMPTY = LSR_THRE | LSR_TEMT
    LCR_DLAB = 0x80
    MCR_LOOP = 0x10

    def __init__(self, *, modem_status: int = 0xB0) -> None:
        self.output = bytearray()
        self.input = bytearray()
        #: What MSR's top four bits read outside loopback (DCD, RI, DSR, CTS).
        self.modem_status = modem_status & 0xF0
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.divisor = 0
        # The transmitter-empty interrupt: raised when THR empties (at once,
        # here) or IER enables it, cleared by reading IIR while it is the one
        # IIR reports, or by writing THR.
        self._thre_pending = False

    def feed(self, data: bytes) -> None:
        """Bytes the guest will read from RBR, in order."""
        self.input += data

    def read(self, offset: int, size: int) -> int:
        """A register's value (each is one byte: a wider read repeats nothing)."""
        dlab = self.lcr & self.LCR_DLAB
        if offset == self.RBR:
            if dlab:
                return self.divisor & 0xFF
            if self.input:
                return self.input.pop(0)
            return 0
        if offset == self.IER:
            return (self.divisor >> 8) & 0xFF if dlab else self.ier
        if offset == self.IIR:
            fifos = 0xC0 if self.fcr & 0x01 else 0
            if self.ier & 0x01 and self.input:
                return fifos | 0x04                          # received data available
            if self.ier & 0x02 and self._thre_pending:
                self._thre_pending = False                   # reading IIR clears it
                return fifos | 0x02                          # transmitter holding register empty
            return fifos | 0x01                              # no interrupt pending
        if offset == self.LCR:
            return self.lcr
        if offset == self.MCR:
            return self.mcr
        if offset == self.LSR:
            return self.LSR_EMPTY | (self.LSR_DR if self.input else 0)
        if offset == self.MSR:
            if self.mcr & self.MCR_LOOP:    # the outputs wired back to the inputs
                m = self.mcr
                return ((m & 0x02) << 3 | (m & 0x01) << 5 | (m & 0x04) << 4 | (m & 0x08) << 4)
            return self.modem_status
        if offset == self.SCR:
            return self.scr
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        """A register write (one byte; the bits above the first are ignored)."""
        value &= 0xFF
        dlab = self.lcr & self.LCR_DLAB
        if offset == self.THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                if self.mcr & self.MCR_LOOP:
                    self.input.append(value)     # loopback: what is sent is received
                else:
                    self.output.append(value)
                self._thre_pending = True        # sent at once: THR is empty again
        elif offset == self.IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | value << 8
            else:
                if value & 0x02 and not self.ier & 0x02:
                    self._thre_pending = True    # enabling it with THR empty raises it
                self.ier = value & 0x0F
        elif offset == self.FCR:
            self.fcr = value & 0xC9           # enable, DMA mode, trigger level
            if value & 0x02:
                self.input.clear()            # reset the receive FIFO
        elif offset == self.LCR:
            self.lcr = value
        elif offset == self.MCR:
            self.mcr = value & 0x1F
        elif offset == self.SCR:
            self.scr = value
        # LSR and MSR writes (factory test) are ignored.

    def write_many(self, records: Any) -> None:
        """A run of coalesced register writes (a Bus batch device, see kvmcoal.BatchDevice).

        A burst of bytes to THR, the common case, is appended in one go;
        anything else (a divisor latch, loopback, other registers) goes
        through :meth:`write`, in order.
        """
        data = bytes(records)
        n = len(data) // _RECORD
        if n and not self.lcr & self.LCR_DLAB and _all_at(data, n, self.THR, 1):
            if self.mcr & self.MCR_LOOP:
                self.input += data[_DATA::_RECORD]
            else:
                self.output += data[_DATA::_RECORD]
            self._thre_pending = True
            return
        for offset, size, _pio, raw in ENTRY_STRUCT.iter_unpack(data):
            self.write(offset, size, int.from_bytes(raw[:size], "little"))


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

    def write_many(self, records: Any) -> None:
        """A run of coalesced stores (a Bus batch device, see kvmcoal.BatchDevice).

        With numpy, the run lands in a few vectorised steps (later stores
        to a byte win, as in order); without, store by store.
        """
        np = _numpy()
        if np is None:
            for offset, size, _pio, raw in ENTRY_STRUCT.iter_unpack(bytes(records)):
                self.write(offset, size, int.from_bytes(raw[:size], "little"))
            return
        from .. import ENTRY_DTYPE
        recs = np.frombuffer(records, ENTRY_DTYPE)
        # Every byte stored, in order, as (position in memory, value); the
        # offsets are signed (a mapping may start before the memory).
        offsets = recs["phys_addr"].view(np.int64)
        lanes = np.arange(8)
        stored = lanes[None, :] < recs["len"].astype(np.int64)[:, None]
        positions = (offsets[:, None] + lanes[None, :])[stored]
        values = recs["data"][stored]
        inside = (positions >= 0) & (positions < len(self.memory))
        positions, values = positions[inside], values[inside]
        # The last store to each byte wins: the first of each in reverse order.
        where, last = np.unique(positions[::-1], return_index=True)
        np.frombuffer(self.memory, np.uint8)[where] = values[::-1][last]
        self.writes += len(recs)


_RECORD = ENTRY_STRUCT.size
_DATA = 16          # offset of data in the record


def _numpy() -> Any:
    """numpy, or None without it (imported at the first batch, not with kvmcoal)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _all_at(data: bytes, n: int, addr: int, size: int) -> bool:
    """Whether all *n* records in *data* are *size*-byte writes at *addr*."""
    head = ENTRY_STRUCT.pack(addr, size, data[12], b"")[:16]
    return all(data[k::_RECORD] == head[k:k + 1] * n for k in range(16))


def _field(value: int, offset: int, size: int) -> int:
    """Bytes [offset, offset + size) of the little-endian *value*."""
    return (value >> 8 * offset) & ((1 << 8 * size) - 1)


def _with_field(value: int, offset: int, size: int, field: int) -> int:
    """*value* with bytes [offset, offset + size) replaced by *field*'s."""
    mask = ((1 << 8 * size) - 1) << 8 * offset
    return (value & ~mask) | ((field << 8 * offset) & mask)


class IndexDataPair:
    """An index register and a data register over a register file (RTC 0x70/0x71 style).

    *registers* maps an index to its register's value; *width* is the
    width in bytes of both registers (4: a PCI-style pair, 1: the RTC's).
    Both are byte-addressable: an access of *size* bytes at *offset* into
    either register reads or replaces just those bytes of it, so a byte
    write to the index's top byte or a 16-bit read of the data register's
    upper half does what it does on hardware.  An index with no register
    reads as all-ones; a write creates it.

    Map :attr:`index` coalesced and :attr:`data` flush-on-access: a data
    access then always sees the index the guest wrote last.
    :class:`PciConfig` is the PCI configuration mechanism #1 on this pair.
    """

    def __init__(self, registers: dict[int, int] | None = None, *, width: int = 4) -> None:
        if width not in (1, 2, 4, 8):
            raise ValueError(f"width must be 1, 2, 4 or 8 bytes, not {width!r}")
        self.registers: dict[int, int] = dict(registers or {})
        self.width = width
        self.current = 0
        self.index = _IndexRegister(self)
        self.data = _DataRegister(self)

    def latched(self, offset: int, size: int) -> int:
        """An index register read."""
        return _field(self.current, offset, size)

    def latch(self, offset: int, size: int, value: int) -> None:
        """An index register write."""
        self.current = _with_field(self.current, offset, size, value)

    def load(self, offset: int, size: int) -> int:
        """A data register read: bytes of the register the index selects."""
        return _field(self.registers.get(self.current, (1 << 8 * self.width) - 1), offset, size)

    def store(self, offset: int, size: int, value: int) -> None:
        """A data register write: those bytes of the selected register."""
        old = self.registers.get(self.current, 0)
        self.registers[self.current] = _with_field(old, offset, size, value)


class _IndexRegister:
    def __init__(self, pair: IndexDataPair) -> None:
        self._pair = pair

    def read(self, offset: int, size: int) -> int:
        return self._pair.latched(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._pair.latch(offset, size, value)


class _DataRegister:
    def __init__(self, pair: IndexDataPair) -> None:
        self._pair = pair

    def read(self, offset: int, size: int) -> int:
        return self._pair.load(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._pair.store(offset, size, value)


class PciConfig(IndexDataPair):
    """PCI configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC.

    A dword written to CONFIG_ADDRESS selects bus (bits 23-16), device
    (15-11), function (10-8) and register (7-2) when its enable bit (31) is
    set; CONFIG_DATA then reads and writes that register's bytes, at
    0xCFC + (register & 3) for byte and word accesses, as Linux's pci=conf1
    accessors do.  Accesses to CONFIG_ADDRESS that are not whole dwords do
    not touch it (reads give all-ones), as on a PC chipset.  With the enable
    bit clear, or for a function that is not there, data reads give
    all-ones and writes are dropped.

    Each function is a 256-byte configuration space (:meth:`add_function`);
    its identification bytes (vendor and device ID, revision and class) are
    read-only.  BAR sizing and capabilities are not modelled.

        pci = PciConfig()
        pci.add_function(0, 0, 0, vendor_id=0x8086, device_id=0x1237, class_code=0x060000)
        bus.map(pci.index, 0xCF8, 4, pio=True, coalesced=True)
        bus.map(pci.data, 0xCFC, 4, pio=True, flush_on_access=True)
    """

    ENABLE = 1 << 31
    _READ_ONLY = frozenset(range(0x00, 0x04)) | frozenset(range(0x08, 0x0C))

    def __init__(self) -> None:
        super().__init__(width=4)
        self.functions: dict[tuple[int, int, int], bytearray] = {}

    def add_function(self, bus: int, device: int, function: int, *, vendor_id: int,
                     device_id: int, class_code: int = 0, revision: int = 0) -> bytearray:
        """Add a function's configuration space; returns its 256 bytes (writable)."""
        if not (0 <= bus < 256 and 0 <= device < 32 and 0 <= function < 8):
            raise ValueError(f"no PCI function {bus:02x}:{device:02x}.{function}")
        space = bytearray(256)
        space[0:4] = (vendor_id | device_id << 16).to_bytes(4, "little")
        space[8:12] = (revision | class_code << 8).to_bytes(4, "little")
        self.functions[bus, device, function] = space
        return space

    def _selected(self) -> tuple[bytearray, int] | None:
        address = self.current
        if not address & self.ENABLE:
            return None
        space = self.functions.get(((address >> 16) & 0xFF, (address >> 11) & 0x1F,
                                    (address >> 8) & 0x7))
        return None if space is None else (space, address & 0xFC)

    def latched(self, offset: int, size: int) -> int:
        return self.current if (offset, size) == (0, 4) else (1 << 8 * size) - 1

    def latch(self, offset: int, size: int, value: int) -> None:
        if (offset, size) == (0, 4):
            self.current = value & 0x80FFFFFC      # reserved bits read back as 0

    def load(self, offset: int, size: int) -> int:
        selected = self._selected()
        if selected is None:
            return (1 << 8 * size) - 1
        space, register = selected
        start = register + offset
        return int.from_bytes(space[start:start + size], "little")

    def store(self, offset: int, size: int, value: int) -> None:
        selected = self._selected()
        if selected is not None:
            space, register = selected
            for i, byte in enumerate(value.to_bytes(size, "little")):
                if register + offset + i not in self._READ_ONLY:
                    space[register + offset + i] = byte


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
