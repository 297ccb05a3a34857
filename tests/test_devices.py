"""The example devices under the access sequences real drivers make, through a Bus.

The sequences follow Linux's own probing: the 8250 driver's autoconfig()
(IER, loopback and FIFO tests, divisor set-up) and arch/x86/pci/direct.c's
pci_check_type1() and sanity check (a byte write to 0xcfb, dword round trip
of CONFIG_ADDRESS, then 16-bit reads of the class and vendor words at
0xcfc + (reg & 2)).
"""

from __future__ import annotations

import pytest

from kvmcoal import Bus, EmulatedVm
from kvmcoal.devices import IndexDataPair, PciConfig, Uart16550

COM1 = 0x3F8


@pytest.fixture
def bus():
    with EmulatedVm() as vm, Bus(vm) as bus:
        yield bus


@pytest.fixture
def uart(bus):
    uart = Uart16550()
    bus.map(uart, COM1, 1, pio=True, coalesced=True)
    bus.map(uart, COM1 + 1, 7, pio=True, flush_on_access=True, device_offset=1)
    return uart


def outb(bus, port, value):
    bus.write(port, 1, value, pio=True)


def inb(bus, port):
    return bus.read(port, 1, pio=True)


def test_linux_8250_autoconfig_finds_a_16550a(bus, uart):
    ier, mcr, lcr, msr, fcr, iir, scr = (COM1 + r for r in (1, 4, 3, 6, 2, 2, 7))
    # The IER test: the low nibble reads back what was written.
    saved = inb(bus, ier)
    outb(bus, ier, 0)
    assert inb(bus, ier) & 0x0F == 0
    outb(bus, ier, 0x0F)
    assert inb(bus, ier) & 0x0F == 0x0F
    outb(bus, ier, saved)
    # The loopback test: MCR's OUT2 and RTS come back as DCD and CTS.
    save_mcr = inb(bus, mcr)
    outb(bus, mcr, 0x10 | 0x0A)
    assert inb(bus, msr) & 0xF0 == 0x90
    outb(bus, mcr, save_mcr)
    # No EFR (offset 2 under LCR 0x80 and 0xbf reads IIR, never 0): not a 16650.
    for conf in (0x80, 0xBF):
        outb(bus, lcr, conf)
        assert inb(bus, iir) != 0
    outb(bus, lcr, 0)
    # FIFO detection: IIR's top bits 3 after enabling the FIFOs: a 16550A.
    outb(bus, fcr, 0x01)
    assert inb(bus, iir) >> 6 == 3
    outb(bus, fcr, 0x01 | 0x20)                 # no 64-byte FIFO bit: not a 16750
    assert inb(bus, iir) & 0xE0 == 0xC0
    # The scratch register holds a byte.
    outb(bus, scr, 0xA5)
    assert inb(bus, scr) == 0xA5


def test_divisor_latch_and_line_settings(bus, uart):
    lcr = COM1 + 3
    outb(bus, lcr, 0x80 | 0x03)                 # DLAB, 8N1
    outb(bus, COM1, 0x01)                       # DLL: 115200 baud (coalesced, in order)
    outb(bus, COM1 + 1, 0x00)                   # DLM
    assert (inb(bus, COM1), inb(bus, COM1 + 1)) == (0x01, 0x00)
    outb(bus, lcr, 0x03)
    assert uart.divisor == 1 and uart.output == b""   # no byte was sent while DLAB was set
    for ch in b"ok\n":
        outb(bus, COM1, ch)
    assert inb(bus, COM1 + 5) & 0x60 == 0x60    # LSR: THR empty, transmitter empty
    assert bytes(uart.output) == b"ok\n"


def test_receive_and_loopback(bus, uart):
    lsr = COM1 + 5
    assert inb(bus, lsr) & 0x01 == 0
    uart.feed(b"hi")
    assert inb(bus, lsr) & 0x01
    assert (inb(bus, COM1), inb(bus, COM1)) == (ord("h"), ord("i"))
    assert inb(bus, lsr) & 0x01 == 0
    outb(bus, COM1 + 4, 0x10)                   # loopback: what is sent is received
    outb(bus, COM1, ord("x"))
    assert inb(bus, lsr) & 0x01 and inb(bus, COM1) == ord("x")
    assert uart.output == b""


@pytest.fixture
def pci(bus):
    pci = PciConfig()
    pci.add_function(0, 0, 0, vendor_id=0x8086, device_id=0x1237, class_code=0x060000)
    pci.add_function(0, 1, 0, vendor_id=0x8086, device_id=0x7000, class_code=0x060100)
    vga = pci.add_function(0, 2, 0, vendor_id=0x1234, device_id=0x1111, class_code=0x030000)
    vga[0x10:0x14] = (0xFD000008).to_bytes(4, "little")       # BAR0
    bus.map(pci.index, 0xCF8, 4, pio=True, coalesced=True)
    bus.map(pci.data, 0xCFC, 4, pio=True, flush_on_access=True)
    return pci


def conf1(bus, dev, fn, reg, size):
    bus.write(0xCF8, 4, 0x80000000 | dev << 11 | fn << 8 | (reg & 0xFC), pio=True)
    return bus.read(0xCFC + (reg & (4 - size)), size, pio=True)


def test_linux_pci_check_type1(bus, pci):
    outb(bus, 0xCFB, 0x01)                      # not a dword: CONFIG_ADDRESS is untouched
    saved = bus.read(0xCF8, 4, pio=True)
    bus.write(0xCF8, 4, 0x80000000, pio=True)
    assert bus.read(0xCF8, 4, pio=True) == 0x80000000
    # pci_sanity_check: a host bridge or VGA among bus 0's functions.
    found = {}
    for devfn in range(256):
        dev, fn = devfn >> 3, devfn & 7
        class_code = conf1(bus, dev, fn, 0x0A, 2)       # inw(0xcfe)
        vendor = conf1(bus, dev, fn, 0x00, 2)           # inw(0xcfc)
        if vendor != 0xFFFF:
            found[dev, fn] = (vendor, class_code)
    bus.write(0xCF8, 4, saved, pio=True)
    assert found == {(0, 0): (0x8086, 0x0600), (1, 0): (0x8086, 0x0601),
                     (2, 0): (0x1234, 0x0300)}


def test_pci_sub_dword_accesses_and_read_only_ids(bus, pci):
    assert conf1(bus, 2, 0, 0x00, 4) == 0x11111234
    assert conf1(bus, 2, 0, 0x02, 2) == 0x1111          # inw(0xcfe): the device ID
    assert conf1(bus, 2, 0, 0x0B, 1) == 0x03            # inb(0xcff): the base class
    assert conf1(bus, 2, 0, 0x10, 4) == 0xFD000008
    bus.write(0xCF8, 4, 0x80000000 | 2 << 11 | 0x04, pio=True)
    bus.write(0xCFC, 2, 0x0007, pio=True)              # the command register
    bus.write(0xCF8, 4, 0x80000000 | 2 << 11, pio=True)
    bus.write(0xCFC, 4, 0xDEADBEEF, pio=True)          # IDs are read-only
    assert conf1(bus, 2, 0, 0x04, 2) == 0x0007
    assert conf1(bus, 2, 0, 0x00, 4) == 0x11111234


def test_pci_absent_functions_and_the_enable_bit(bus, pci):
    assert conf1(bus, 5, 0, 0x00, 4) == 0xFFFFFFFF
    bus.write(0xCF8, 4, 0x00000000, pio=True)           # enable bit clear
    assert bus.read(0xCFC, 4, pio=True) == 0xFFFFFFFF
    bus.write(0xCFC, 4, 0, pio=True)                    # dropped
    assert conf1(bus, 0, 0, 0x00, 4) == 0x12378086
    assert bus.read(0xCF9, 1, pio=True) == 0xFF          # not a dword access
    bus.write(0xCF8, 4, 0xFFFFFFFF, pio=True)
    assert bus.read(0xCF8, 4, pio=True) == 0x80FFFFFC     # reserved bits read 0


def test_a_byte_wide_pair_like_the_rtc(bus):
    cmos = IndexDataPair({0x0A: 0x26, 0x0B: 0x02}, width=1)
    bus.map(cmos.index, 0x70, 1, pio=True, coalesced=True)
    bus.map(cmos.data, 0x71, 1, pio=True, flush_on_access=True)
    outb(bus, 0x70, 0x0B)
    assert inb(bus, 0x71) == 0x02
    outb(bus, 0x70, 0x0E)
    assert inb(bus, 0x71) == 0xFF                       # no such register
    outb(bus, 0x71, 0x42)
    assert cmos.registers[0x0E] == 0x42


def test_a_wide_pair_is_byte_addressable(bus):
    pair = IndexDataPair({0x01020304: 0xAABBCCDD})
    bus.map(pair.index, 0x100, 4, pio=True, coalesced=True)
    bus.map(pair.data, 0x104, 4, pio=True, flush_on_access=True)
    bus.write(0x100, 2, 0x0304, pio=True)
    bus.write(0x102, 2, 0x0102, pio=True)                 # the index, in two halves
    assert bus.read(0x100, 4, pio=True) == 0x01020304
    assert bus.read(0x106, 2, pio=True) == 0xAABB          # the data's upper half
    bus.write(0x105, 1, 0x11, pio=True)
    assert pair.registers[0x01020304] == 0xAABB11DD
    with pytest.raises(ValueError, match="width"):
        IndexDataPair(width=3)


def test_iir_identifies_the_pending_interrupt_as_a_16550a_does(bus, uart):
    """Linux's 8250 driver without an IRQ polls IIR and stops at 'no interrupt'."""
    iir, ier = COM1 + 2, COM1 + 1
    outb(bus, COM1 + 2, 0x01)                   # FIFOs on
    assert inb(bus, iir) == 0xC1                # nothing enabled: none pending
    uart.feed(b"k")
    assert inb(bus, iir) == 0xC1                # received data, but RDI not enabled
    outb(bus, ier, 0x01)
    assert inb(bus, iir) == 0xC4                # received data available
    assert inb(bus, COM1) == ord("k")
    assert inb(bus, iir) == 0xC1
    outb(bus, ier, 0x03)                        # THRI on, THR empty: raised
    assert inb(bus, iir) == 0xC2
    assert inb(bus, iir) == 0xC1                # reading IIR cleared it
    outb(bus, COM1, ord("x"))                   # sent at once: THR empty again
    assert inb(bus, iir) == 0xC2
    uart.feed(b"y")
    assert inb(bus, iir) == 0xC4                # received data outranks THRE
