"""The v2 API's scenarios, identically on EmulatedVm and on a real guest (kvm.Vm).

From the series' selftest: before any zone, writes exit; a zone bound to a
buffer coalesces up to the ring's capacity and the next write exits (from
several start indices); two buffers and two zones with interleaved writes
land each in their own ring, in order; moving a zone moves later writes;
closing a buffer makes its zones exit.  From its review: every written value
encodes its address (a misrouted entry is caught), two vCPUs with two
buffers, registration changes racing guest writes.  On real KVM the router
moves the entries (kvmcoal/kvm/vm.py); both backends must agree exactly.
"""

from __future__ import annotations

import threading

import pytest

from kvmcoal import CoalescedBuffer, EmulatedVm, Zone

from .machines import EmulatedMachine, KvmMachine, Write, entries, kvm_machine, spin

Z1 = Zone(0x100000, 0x1000)
Z2 = Zone(0x101000, 0x1000)


def stores(zone: Zone, n: int, start: int = 0, size: int = 8) -> list[Write]:
    """n stores into *zone*, each value encoding its address and its number."""
    out = []
    for i in range(start, start + n):
        addr = zone.addr + (8 * i) % zone.size
        out.append(Write(addr, size, ((addr << 20) | i) & ((1 << (8 * size)) - 1)))
    return out


def test_before_any_zone_writes_exit(machine):
    writes = stores(Z1, 3)
    assert machine.run(writes) == writes


@pytest.mark.parametrize("start", [0, 1, 84, 85, 168])
def test_a_buffer_coalesces_up_to_its_capacity_then_writes_exit(machine, start):
    buf = machine.vm.create_coalesced_buffer()
    ring = buf.ring
    while ring.last != start:       # move the buffer's start index
        assert ring.push(0, b"\0") and ring.pop() is not None
    machine.vm.register_coalesced_mmio2(Z1, buf)
    cap = ring.capacity
    writes = stores(Z1, cap + 1)
    assert machine.run(writes) == writes[cap:]
    assert (ring.first, ring.last) == (start, (start + cap) % ring.max)
    assert entries(ring) == writes[:cap]


def test_two_buffers_two_zones_interleaved(machine):
    b1, b2 = machine.vm.create_coalesced_buffer(), machine.vm.create_coalesced_buffer()
    machine.vm.register_coalesced_mmio2(Z1, b1)
    machine.vm.register_coalesced_mmio2(Z2, b2)
    w1, w2 = stores(Z1, 50), stores(Z2, 50, start=1000, size=4)
    interleaved = [w for pair in zip(w1, w2) for w in pair]
    assert machine.run(interleaved) == []
    assert entries(b1.ring) == w1
    assert entries(b2.ring) == w2


def test_moving_a_zone_moves_later_writes(machine):
    vm = machine.vm
    b1, b2 = vm.create_coalesced_buffer(), vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(Z1, b1)
    first, later = stores(Z1, 10), stores(Z1, 10, start=10)
    assert machine.run(first) == []
    vm.unregister_coalesced_mmio2(Z1, b1)
    vm.register_coalesced_mmio2(Z1, b2)
    assert machine.run(later) == []
    assert entries(b1.ring) == first
    assert entries(b2.ring) == later


def test_closing_a_buffer_makes_its_zones_exit(machine):
    vm = machine.vm
    buf, other = vm.create_coalesced_buffer(), vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(Z1, buf)
    vm.register_coalesced_mmio2(Z2, other)
    buf.close()
    assert vm.zones == [(Z2, other)]
    w1, w2 = stores(Z1, 3), stores(Z2, 3)
    assert machine.run(w1 + w2) == w1
    assert entries(other.ring) == w2


def test_unregister_names_the_buffer(machine):
    vm = machine.vm
    b1, b2 = vm.create_coalesced_buffer(), vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(Z1, b1)
    vm.unregister_coalesced_mmio2(Z1, b2)        # not b2's zone: nothing happens
    vm.unregister_coalesced_mmio(Z1)             # nor the VM-wide ring's
    assert vm.zones == [(Z1, b1)]
    writes = stores(Z1, 4)
    assert machine.run(writes) == []
    assert entries(b1.ring) == writes


def test_a_buffers_zone_inside_a_vm_wide_zone(machine):
    """Unregistering one of them leaves the other registered (the kernel
    removes both; kvmcoal registers the other again)."""
    vm = machine.vm
    outer = Zone(Z1.addr, 0x2000)
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio(outer)
    vm.register_coalesced_mmio2(Z2, buf)
    vm.unregister_coalesced_mmio2(Z2, buf)
    assert vm.zones == [(outer, None)]
    writes = stores(Z2, 3)
    assert machine.run(writes) == []
    assert entries(vm.ring) == writes
    vm.register_coalesced_mmio2(Z2, buf)
    vm.unregister_coalesced_mmio(Zone(Z2.addr, 8))
    assert vm.zones == [(Z2, buf)]


def test_registration_errors(machine):
    vm = machine.vm
    buf = vm.create_coalesced_buffer()
    with pytest.raises(TypeError, match="pio must be True or False"):
        Zone(Z1.addr, 8, pio=2)
    with pytest.raises(TypeError, match="register_coalesced_mmio binds a zone"):
        vm.register_coalesced_mmio2(Z1, None)
    with pytest.raises(TypeError, match="zone must be a kvmcoal.Zone"):
        vm.register_coalesced_mmio2((Z1.addr, Z1.size), buf)
    with CoalescedBuffer() as stray:
        with pytest.raises(ValueError, match="belongs to another"):
            vm.register_coalesced_mmio2(Z1, stray)
    with EmulatedVm() as other:
        with pytest.raises(ValueError, match="belongs to another"):
            vm.register_coalesced_mmio2(Z1, other.create_coalesced_buffer())
    closed = vm.create_coalesced_buffer()
    closed.close()
    with pytest.raises(ValueError, match="the buffer is closed"):
        vm.register_coalesced_mmio2(Z1, closed)
    assert vm.zones == []
    assert machine.run(stores(Z1, 1)) == stores(Z1, 1)


def test_two_vcpus_two_buffers(machine):
    """Each vCPU writes its own zone, each drained by a poller thread: every
    write arrives once, in its own buffer in guest order, or as an exit (the
    vCPUs share the kernel's one ring, which two busy guests can fill)."""
    vm = machine.vm
    b1, b2 = vm.create_coalesced_buffer(), vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(Z1, b1)
    vm.register_coalesced_mmio2(Z2, b2)
    got: dict[int, list[Write]] = {0: [], 1: []}
    exited: dict[int, list[Write]] = {0: [], 1: []}
    plan = {0: (Z1, b1), 1: (Z2, b2)}
    done = threading.Event()

    def drain(cpu: int) -> None:
        _, buf = plan[cpu]
        while not done.is_set() or len(buf.ring):
            if buf.wait(0.05):
                got[cpu] += entries(buf.ring)

    def guest(cpu: int) -> None:
        zone, _ = plan[cpu]
        for r in range(10):
            exited[cpu] += machine.run(stores(zone, 100, start=100 * r), cpu=cpu)

    if isinstance(machine, KvmMachine):
        machine.vcpu(1)              # both vCPUs exist before the threads start
        vm.start_watcher()
    threads = [threading.Thread(target=guest, args=(c,)) for c in (0, 1)]
    drains = [threading.Thread(target=drain, args=(c,), daemon=True) for c in (0, 1)]
    for t in drains + threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    for t in drains:
        t.join(10)
    for cpu, zone in ((0, Z1), (1, Z2)):
        expected = stores(zone, 1000)
        assert got[cpu] == [w for w in expected if w in set(got[cpu])]   # in guest order
        assert sorted(got[cpu] + exited[cpu]) == sorted(expected)        # each exactly once
    assert len(got[0]) + len(got[1]) >= b1.ring.capacity    # the rings were used


def test_registration_changes_race_guest_writes(machine):
    """A thread moves the zone between two buffers (and away) while the guest
    writes: every write arrives exactly once, in one of the buffers or as an
    exit, and each buffer gets its share in guest order."""
    vm = machine.vm
    b1, b2 = vm.create_coalesced_buffer(), vm.create_coalesced_buffer()
    stop = threading.Event()
    seen: list[Write] = []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            buf = (b1, b2)[i % 2]
            vm.register_coalesced_mmio2(Z1, buf)
            vm.unregister_coalesced_mmio2(Z1, buf)
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        writes = stores(Z1, 1000, size=4)
        for r in range(0, 1000, 100):
            seen += machine.run(writes[r:r + 100])
            seen += entries(b1.ring) + entries(b2.ring)   # keep room in both
    finally:
        stop.set()
        t.join(30)
    seen += entries(b1.ring) + entries(b2.ring)
    assert sorted(seen) == sorted(writes)


def test_a_doorbell_reaches_its_poller_while_the_guest_runs(machine):
    """With the watcher (real KVM) the buffer's fd wakes before the guest exits."""
    vm = machine.vm
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(Z1, buf)
    if isinstance(machine, KvmMachine):
        machine.vcpu(0)
        vm.start_watcher(interval_us=50)
    woke = threading.Event()
    exits_then: list[int] = []

    def poller() -> None:
        if buf.wait(60):
            if isinstance(machine, KvmMachine):
                exits_then.append(machine.vcpus[0].exit_count)
            woke.set()

    t = threading.Thread(target=poller)
    t.start()
    exits_before = machine.vcpus[0].exit_count if isinstance(machine, KvmMachine) else 0
    doorbell = stores(Z1, 1)
    # The guest rings, then runs on for a long while without an exit.
    assert machine.run(doorbell + [spin(2_000_000)]) == []
    t.join(60)
    assert woke.is_set()
    if isinstance(machine, KvmMachine):
        assert exits_then == [exits_before]     # woken while the guest was still running
        vm.stop_watcher()
        assert not vm.watching
    assert entries(buf.ring) == doorbell
