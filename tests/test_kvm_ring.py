"""The kernel as producer: a real guest on /dev/kvm writes through coalesced zones.

These tests run wherever /dev/kvm works and are skipped, with the reason,
only where it does not.
"""

from __future__ import annotations

import mmap

import pytest

from kvmcoal import RING_MAX, Entry, Zone, kvm

from .conftest import load_guest

pytestmark = pytest.mark.kvm

MMIO_BASE = 0xD0000   # es = 0xd000; no memory slot here, so stores are MMIO
MMIO_REG = MMIO_BASE + 0x10
PORT = 0x400
CODE_ADDR = 0x1000


@pytest.fixture
def vm(kvm_vm):
    load_guest(kvm_vm, "store_loop", CODE_ADDR)
    return kvm_vm


def start_guest(vm, iterations: int, first_value: int = 0x100):
    vcpu = vm.create_vcpu()
    vcpu.setup_real_mode(CODE_ADDR, segments={"es": MMIO_BASE >> 4}, rax=first_value,
                         rcx=iterations, rdi=MMIO_REG - MMIO_BASE, rdx=PORT)
    return vcpu


def expected_writes(iterations: int, first_value: int = 0x100):
    """(addr, len, pio, value) of every write store_loop.S makes, in order."""
    writes = []
    for v in range(first_value, first_value + iterations):
        writes += [(MMIO_REG, 4, False, v), (MMIO_REG + 8, 2, False, v & 0xFFFF),
                   (PORT, 1, True, v & 0xFF)]
    return writes


def as_write(item):
    if isinstance(item, Entry):
        return (item.phys_addr, item.len, item.pio, item.value)
    if isinstance(item, kvm.MmioExit):
        return (item.phys_addr, item.len, False, int.from_bytes(item.data, "little"))
    return (item.port, item.size, True, int.from_bytes(item.data, "little"))


def run_to_halt(vcpu, ring):
    """Run the guest, draining the ring after every exit before looking at it."""
    events = []  # ("ring", [entries]) and ("exit", exit), in the order they happened
    while True:
        exit_ = vcpu.run()
        events.append(("ring", ring.drain()))
        if isinstance(exit_, kvm.HltExit):
            return events
        assert isinstance(exit_, (kvm.MmioExit, kvm.IoExit)), exit_
        events.append(("exit", exit_))


def test_capabilities_here():
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm is not usable here: {reason}")
    with kvm.Kvm() as k:
        assert k.api_version == 12
        assert k.coalesced_mmio_page_offset >= 1
        assert k.vcpu_mmap_size > k.coalesced_mmio_page_offset * mmap.PAGESIZE


@pytest.mark.parametrize("start", [0, 1, 84, 85, 168, 169])
def test_guest_writes_reach_the_ring_in_order_and_full_ring_exits(vm, start):
    vm.register_coalesced_mmio(Zone(MMIO_BASE, 0x1000))
    vm.register_coalesced_mmio(Zone(PORT, 1, pio=True))
    vcpu = start_guest(vm, iterations=100)
    ring = vm.ring
    assert ring.max == RING_MAX
    # Start the kernel's ring at `start`, as its selftest does: the consumer
    # may move both indices of an empty ring.
    while ring.last != start:
        assert ring.push(0, b"\0") and ring.pop() is not None
    assert ring.first == ring.last == start

    events = run_to_halt(vcpu, ring)
    writes = expected_writes(100)

    # The first KVM_RUN returns when write number `capacity` finds the ring full.
    kind, first_batch = events[0]
    assert kind == "ring" and len(first_batch) == ring.capacity
    assert events[1][0] == "exit" and as_write(events[1][1]) == writes[ring.capacity]
    # Every write arrives exactly once, in guest order, through the ring or an exit.
    delivered = []
    for kind, payload in events:
        delivered += [as_write(e) for e in payload] if kind == "ring" else [as_write(payload)]
    assert delivered == writes
    assert ring.first == ring.last == (start + len(writes) - (len(events) // 2)) % ring.max


def test_non_coalesced_exit_leaves_the_indices_alone(vm):
    vm.register_coalesced_mmio(Zone(MMIO_BASE, 0x1000))  # MMIO coalesced, the port not
    vcpu = start_guest(vm, iterations=3)
    ring = vm.ring
    exit_ = vcpu.run()
    assert isinstance(exit_, kvm.IoExit) and exit_.port == PORT and exit_.is_out
    assert (ring.first, ring.last) == (0, 2)  # the two MMIO stores, nothing else
    assert [as_write(e) for e in ring.drain()] == expected_writes(1)[:2]
    exit_ = vcpu.run()
    assert isinstance(exit_, kvm.IoExit)
    assert (ring.first, ring.last) == (2, 4)


def test_single_pio_byte_and_word_mmio_then_unregister(vm):
    vm.register_coalesced_mmio(Zone(MMIO_REG + 8, 2))    # exactly the 2-byte register
    vm.register_coalesced_mmio(Zone(PORT, 1, pio=True))  # exactly the 1-byte port
    vcpu = start_guest(vm, iterations=2, first_value=0x4241)
    ring = vm.ring
    exit_ = vcpu.run()  # the 4-byte store is outside both zones: an ordinary exit
    assert as_write(exit_) == (MMIO_REG, 4, False, 0x4241)
    exit_ = vcpu.run()
    assert as_write(exit_) == (MMIO_REG, 4, False, 0x4242)
    assert ring.drain() == [Entry(MMIO_REG + 8, b"\x41\x42"), Entry(PORT, b"\x41", pio=True)]

    vm.unregister_coalesced_mmio(Zone(MMIO_REG + 8, 1))  # any range inside removes it
    vm.unregister_coalesced_mmio(Zone(PORT, 1, pio=True))
    assert as_write(vcpu.run()) == (MMIO_REG + 8, 2, False, 0x4242)
    assert as_write(vcpu.run()) == (PORT, 1, True, 0x42)
    assert isinstance(vcpu.run(), kvm.HltExit)
    assert len(ring) == 0


def test_zone_arguments_are_checked(vm):
    with pytest.raises(TypeError, match="Zone"):
        vm.register_coalesced_mmio((MMIO_BASE, 0x1000))
    with pytest.raises(ValueError, match="u32"):
        Zone(MMIO_BASE, 1 << 32)
