"""The kernel's coalesced_io_test, re-expressed on real /dev/kvm with kvmcoal as consumer.

For every start index of the ring: MAX-1 interleaved 8-byte MMIO and 4-byte
PIO guest writes land in the ring in order; the next write exits as an
ordinary exit carrying its data; an exit that is not a coalesced access
leaves the indices alone; after unregistering a zone its next write exits.
"""

from __future__ import annotations

import pytest

from kvmcoal import Entry, Zone, kvm

from .conftest import load_guest

pytestmark = pytest.mark.kvm

MMIO = Zone(0xD0000, 0x1000)
PIO = Zone(0x400, 4, pio=True)
REG = MMIO.addr + 0x10
CODE = 0x1000


def mmio_value(v: int) -> int:
    return ((v ^ 0x5A5A5A5A) << 32) | v


def expected_entries(first_value: int, n: int):
    """The first n writes of the selftest guest from first_value on."""
    out = []
    v = first_value
    while len(out) < n:
        out.append(Entry(REG, mmio_value(v).to_bytes(8, "little")))
        out.append(Entry(PIO.addr, v.to_bytes(4, "little"), pio=True))
        v += 1
    return out[:n]


@pytest.fixture
def vm(kvm_vm):
    load_guest(kvm_vm, "selftest", CODE)
    kvm_vm.register_coalesced_mmio(MMIO)
    kvm_vm.register_coalesced_mmio(PIO)
    return kvm_vm


def run_guest(vcpu, first_value: int, iterations: int) -> None:
    vcpu.set_regs(rip=CODE, rax=first_value, rcx=iterations, rdi=REG, rdx=PIO.addr)


def test_fill_from_every_start_index(vm):
    """From odd start indices one host entry is pushed first, so the write that finds
    the ring full is an MMIO store there and a port write from even ones (the ring
    holds an odd number, and the guest alternates MMIO and PIO): both exit kinds,
    from every start index."""
    vcpu = vm.create_vcpu()
    vcpu.setup_long_mode(CODE)
    ring = vm.ring
    cap = ring.capacity
    exits_seen = set()
    for start in range(ring.max):
        ring.reset()
        while ring.last != start:   # the consumer may move the indices of an empty ring
            assert ring.push(0, b"\0") and ring.pop() is not None
        host = [Entry(0xF00D, bytes([start & 0xFF]))] * (start % 2)
        for entry in host:
            assert ring.push(entry.phys_addr, entry.data)
        fit = cap - len(host)                           # guest writes that fit
        first_value = start * 1000
        run_guest(vcpu, first_value, (cap + 2) // 2)   # cap + 1 writes, maybe one more
        exit_ = vcpu.run()
        # Guest write number fit found the ring full and exited, carrying its data.
        full_write = expected_entries(first_value, fit + 1)[fit]
        if full_write.pio:
            assert isinstance(exit_, kvm.IoExit) and exit_.is_out
            assert (exit_.port, exit_.size, exit_.data) == (PIO.addr, 4, full_write.data)
        else:
            assert isinstance(exit_, kvm.MmioExit) and exit_.is_write
            assert (exit_.phys_addr, exit_.data) == (REG, full_write.data)
        exits_seen.add(type(exit_))
        # The exit (not a coalesced access) left the indices where the
        # coalesced writes put them.
        assert (ring.first, ring.last) == (start, (start + cap) % ring.max), f"start={start}"
        assert ring.drain() == host + expected_entries(first_value, fit), f"start={start}"
        # Run to the end: the writes left coalesce, then HLT, which moves nothing.
        writes = 2 * ((cap + 2) // 2)
        exit_ = vcpu.run()
        assert isinstance(exit_, kvm.HltExit)
        assert ring.drain() == expected_entries(first_value, writes)[fit + 1:]
        assert ring.first == ring.last == (start + len(host) + writes - 1) % ring.max
    assert exits_seen == {kvm.IoExit, kvm.MmioExit}


@pytest.mark.parametrize("zone", [MMIO, PIO], ids=["mmio", "pio"])
def test_unregistered_zone_exits_at_once(vm, zone):
    vcpu = vm.create_vcpu()
    vcpu.setup_long_mode(CODE)
    vm.unregister_coalesced_mmio(zone)
    run_guest(vcpu, 7, 2)
    exit_ = vcpu.run()
    if zone.pio:   # the MMIO write before it still coalesces
        assert isinstance(exit_, kvm.IoExit) and exit_.data == (7).to_bytes(4, "little")
        assert vm.ring.drain() == expected_entries(7, 1)
    else:
        assert isinstance(exit_, kvm.MmioExit) and exit_.data == mmio_value(7).to_bytes(8, "little")
        assert vm.ring.drain() == []
