"""The router on real KVM: what stays in Vm.ring, holding back behind a full
buffer, the Bus over a kvm.Vm with own buffers, the watcher, fork and close."""

from __future__ import annotations

import os
import threading
import time

import pytest

from kvmcoal import Bus, BufferForkedError, RingCorruptedError, Zone, kvm
from kvmcoal.devices import Doorbell, FunctionDevice

from .machines import Write, entries, kvm_machine, spin

pytestmark = pytest.mark.kvm

BUF_ZONE = Zone(0x100000, 0x1000)
VM_ZONE = Zone(0x200000, 0x1000)


@pytest.fixture
def machine():
    with kvm_machine() as m:
        yield m


def at(zone: Zone, i: int, size: int = 4) -> Write:
    addr = zone.addr + (4 * i) % zone.size
    return Write(addr, size, ((addr << 8) | i) & ((1 << (8 * size)) - 1))


def test_vm_ring_keeps_only_its_zones_entries_in_order(machine):
    vm = machine.vm
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio(VM_ZONE)
    vm.register_coalesced_mmio2(BUF_ZONE, buf)
    writes = [at(VM_ZONE if i % 3 else BUF_ZONE, i) for i in range(150)]
    assert machine.run(writes) == []
    assert len(vm.ring) == 100
    assert entries(vm.ring) == [w for w in writes if w.addr >= VM_ZONE.addr]
    assert entries(buf.ring) == [w for w in writes if w.addr < VM_ZONE.addr]


def test_a_full_buffer_holds_routing_back_in_order(machine):
    vm = machine.vm
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio(VM_ZONE)
    vm.register_coalesced_mmio2(BUF_ZONE, buf)
    cap = buf.ring.capacity
    fill = [at(BUF_ZONE, i) for i in range(cap)]
    assert machine.run(fill) == []
    more = [at(BUF_ZONE, cap), at(VM_ZONE, 1000), at(BUF_ZONE, cap + 1), at(VM_ZONE, 1001)]
    assert machine.run(more) == []
    # The buffer is full: everything behind its next entry waits, Vm.ring's too.
    assert vm.route() == 4
    assert len(vm.ring) == 0
    assert entries(buf.ring) == fill
    assert vm.route() == 0
    assert entries(vm.ring) == [more[1], more[3]]
    assert entries(buf.ring) == [more[0], more[2]]


def test_the_bus_delivers_every_write_in_order_through_a_full_buffer(machine):
    """More writes than the buffer and the kernel ring hold, with no poller:
    the exits' flushes deliver everything, per device in guest order."""
    vm = machine.vm
    fast, slow = [], []
    bus = Bus(vm)
    bus.map(FunctionDevice(write=lambda o, s, v: fast.append(v)), BUF_ZONE.addr, BUF_ZONE.size,
            coalesced=True, own_buffer=True)
    bus.map(FunctionDevice(write=lambda o, s, v: slow.append(v)), VM_ZONE.addr, VM_ZONE.size,
            coalesced=True)
    writes = [at(BUF_ZONE if i % 4 else VM_ZONE, i) for i in range(1000)]
    vcpu = machine.load(writes)
    assert isinstance(bus.run(vcpu), kvm.HltExit)
    bus.flush()
    assert fast == [w.value for w in writes if w.addr < VM_ZONE.addr]
    assert slow == [w.value for w in writes if w.addr >= VM_ZONE.addr]
    assert vcpu.exit_count > 1                      # the rings filled: writes exited
    bus.close()


def test_a_doorbell_on_its_own_buffer_served_by_a_poller(machine):
    vm = machine.vm
    machine.vcpu(0)
    bus = Bus(vm)
    bell = Doorbell()
    bus.map(bell, BUF_ZONE.addr, 4, coalesced=True, own_buffer=True)
    bus.start_pollers()
    vm.start_watcher(interval_us=50)
    try:
        done = threading.Event()
        runner = threading.Thread(target=lambda: (machine.run([at(BUF_ZONE, 0, 4),
                                                               spin(2_000_000)]), done.set()))
        runner.start()
        assert bell.event.wait(60)
        assert not done.is_set(), "the poller was woken only after the guest finished"
        runner.join(60)
    finally:
        vm.stop_watcher()
        bus.close()
    assert bell.requests == [at(BUF_ZONE, 0, 4).value]


def test_watcher_arguments_and_lifetime(machine):
    vm = machine.vm
    with pytest.raises(ValueError, match="create one first"):
        vm.start_watcher()
    machine.vcpu(0)
    with pytest.raises(TypeError, match="interval_us must be an int"):
        vm.start_watcher(interval_us=1.5)
    with pytest.raises(ValueError, match="interval_us must be 1"):
        vm.start_watcher(interval_us=0)
    vm.start_watcher()
    assert vm.watching
    with pytest.raises(RuntimeError, match="already running"):
        vm.start_watcher()
    vm.stop_watcher()
    vm.stop_watcher()
    assert not vm.watching
    vm.start_watcher()
    buf = vm.create_coalesced_buffer()
    vm.close()                      # stops the watcher, closes the buffers
    assert not vm.watching and buf.closed


def test_a_forked_child_cannot_route_the_parents_entries(machine):
    vm = machine.vm
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(BUF_ZONE, buf)
    vm.register_coalesced_mmio(VM_ZONE)
    assert machine.run([at(VM_ZONE, 0)]) == []
    pid = os.fork()
    if pid == 0:
        code = 0
        for attempt in (vm.route, lambda: vm.ring, lambda: buf.ring,
                        lambda: vm.register_coalesced_mmio2(Zone(0x300000, 8), buf)):
            try:
                attempt()
                code = 1
            except BufferForkedError:
                pass
        buf.close()              # closing the inherited buffer changes nothing of the parent's
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert vm.zones == [(BUF_ZONE, buf), (VM_ZONE, None)]
    assert machine.run([at(BUF_ZONE, 1)]) == []
    assert entries(buf.ring) == [at(BUF_ZONE, 1)]
    assert entries(vm.ring) == [at(VM_ZONE, 0)]


def test_a_corrupted_kernel_ring_is_reported_not_routed(machine):
    vm = machine.vm
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(BUF_ZONE, buf)
    machine.vcpu(0)
    vm._ring_map[0:4] = (0xFFFF).to_bytes(4, "little")     # first: out of range
    assert vm.route() == 0
    with pytest.raises(RingCorruptedError):
        vm.ring.drain()
    vm._ring_map[0:8] = bytes(8)
    assert machine.run([at(BUF_ZONE, 0)]) == []
    assert entries(buf.ring) == [at(BUF_ZONE, 0)]


DEVICE_PROCESS = """
import socket, sys
from kvmcoal import CoalescedBuffer
sock = socket.socket(fileno=int(sys.argv[1]))
buf = CoalescedBuffer.receive(sock)
want, got = int(sys.argv[2]), bytearray()
out = bytearray(24 * buf.ring.capacity)
while len(got) < 24 * want:
    if not buf.wait(30):
        sys.exit("no entries for 30 s")
    got += out[:24 * buf.ring.drain_into(out)]
sock.sendall(bytes(got))
"""


def test_a_device_process_is_fed_by_the_router(machine):
    """The device model's process receives its buffer once; the router fills it
    from the kernel ring while the guest runs, in guest order."""
    import socket
    import subprocess
    import sys
    vm = machine.vm
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(BUF_ZONE, buf)
    vm.register_coalesced_mmio(VM_ZONE)
    # 150 for the device, 10 for Vm.ring: 160 writes, which fit the kernel
    # ring even if nothing routes until the HLT, and 150 fit the buffer even
    # if the device lags, so none can exit.
    writes = [at(VM_ZONE if i % 16 == 0 else BUF_ZONE, i) for i in range(160)]
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", DEVICE_PROCESS, str(theirs.fileno()),
                             "150"], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        buf.send(ours)
        machine.vcpu(0)
        vm.start_watcher()
        assert machine.run(writes) == []
        ours.settimeout(30)
        data = b""
        while len(data) < 150 * 24:
            chunk = ours.recv(65536)
            assert chunk, "the device process ended early"
            data += chunk
        assert proc.wait(30) == 0
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    got = [Write(int.from_bytes(data[i:i + 8], "little"), 4,
                 int.from_bytes(data[i + 16:i + 20], "little")) for i in range(0, len(data), 24)]
    assert got == [w for w in writes if w.addr < VM_ZONE.addr]
    assert entries(vm.ring) == [w for w in writes if w.addr >= VM_ZONE.addr]


def test_the_tracepoint_wake_up_reaches_a_poller_while_the_guest_runs(machine):
    """wake="tracepoint": the watcher sleeps until the vCPU thread writes into a
    buffer's zone (kvm:kvm_mmio), not on a timer; zones bound later are traced too."""
    from kvmcoal.bench.doorbell import _tracepoint_unavailable
    why = _tracepoint_unavailable(machine.vm.kvm)
    if why:
        pytest.skip(f"the tracepoint wake-up cannot run here: {why}")
    vm = machine.vm
    machine.vcpu(0)
    vm.start_watcher(wake="tracepoint", interval_us=10**6)    # safety pass: once a second
    try:
        buf = vm.create_coalesced_buffer()
        vm.register_coalesced_mmio2(BUF_ZONE, buf)              # after the start: filter updated
        woke = threading.Event()

        def poller() -> None:
            if buf.wait(30):
                woke.set()
        t = threading.Thread(target=poller)
        t.start()
        exits_before = machine.vcpus[0].exit_count
        runner = threading.Thread(target=machine.run, args=([at(BUF_ZONE, 0), spin(2_000_000)],))
        started = time.monotonic()
        runner.start()
        assert woke.wait(30)
        waited = time.monotonic() - started
        assert machine.vcpus[0].exit_count == exits_before, "woken only by the guest's exit"
        assert waited < 0.9, f"woken after {waited:.2f} s: by the 1 s safety pass, not the event"
        runner.join(60)
        t.join(5)
    finally:
        vm.stop_watcher()
    assert not vm.watching and vm._router.traced() == set()
    assert entries(buf.ring) == [at(BUF_ZONE, 0)]


def test_watcher_wake_must_be_known(machine):
    machine.vcpu(0)
    with pytest.raises(ValueError, match="wake must be 'timer' or 'tracepoint'"):
        machine.vm.start_watcher(wake="poll")
    assert not machine.vm.watching


def test_a_buffer_its_consumer_corrupted_stops_nobody_else(machine):
    """A device process that breaks its own buffer's last index loses its own
    entries (and is told so by its next consumer call); Vm.ring and the other
    buffers go on."""
    vm = machine.vm
    broken, other = vm.create_coalesced_buffer(), vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(BUF_ZONE, broken)
    vm.register_coalesced_mmio2(Zone(0x101000, 0x1000), other)
    vm.register_coalesced_mmio(VM_ZONE)
    broken._map[4:8] = (0xFFFF).to_bytes(4, "little")         # last: out of range
    writes = [at(BUF_ZONE, 0), at(VM_ZONE, 1), at(Zone(0x101000, 0x1000), 2)]
    assert machine.run(writes) == []
    assert entries(vm.ring) == [writes[1]]
    assert entries(other.ring) == [writes[2]]
    assert vm._router.dropped == 1
    with pytest.raises(RingCorruptedError):
        broken.ring.drain()


def test_more_buffers_than_a_pass_holds(machine):
    """A pass holds at most 8 buffers at once; entries for 12 interleaved
    buffers still all arrive, each buffer's in guest order."""
    vm = machine.vm
    zones = [Zone(0x100000 + 0x1000 * i, 0x1000) for i in range(12)]
    buffers = [vm.create_coalesced_buffer() for _ in zones]
    for zone, buf in zip(zones, buffers):
        vm.register_coalesced_mmio2(zone, buf)
    writes = [at(zones[i % 12], i) for i in range(144)]
    assert machine.run(writes) == []
    for n, buf in enumerate(buffers):
        assert entries(buf.ring) == writes[n::12]


def test_route_and_len_from_a_vm_ring_handler_deliver_nothing_twice(machine):
    """route() (and len(), and a vCPU's KVM_RUN) inside a handler of a consumer
    call on vm.ring must not move what that call is delivering."""
    vm = machine.vm
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio(VM_ZONE)
    vm.register_coalesced_mmio2(BUF_ZONE, buf)
    first = [at(VM_ZONE, i) for i in range(5)]
    assert machine.run(first) == []
    later = [at(BUF_ZONE if i % 2 else VM_ZONE, i) for i in range(5, 13)]
    got = []

    def handler(addr, data, pio):
        got.append(Write(addr, len(data), int.from_bytes(data, "little")))
        if len(got) == 1:
            assert machine.run(later) == []     # a KVM_RUN return: no pass here
            vm.route()
            len(vm.ring)
    vm.ring.consume(handler)
    vm.ring.consume(handler)
    assert got == first + [w for w in later if w.addr >= VM_ZONE.addr]
    assert entries(buf.ring) == [w for w in later if w.addr < VM_ZONE.addr]


def test_stop_watcher_from_several_threads_and_close_at_once(machine):
    vm = machine.vm
    machine.vcpu(0)
    for _ in range(3):
        vm.start_watcher(interval_us=10**6)
        barrier = threading.Barrier(4)

        def stop() -> None:
            barrier.wait()
            vm.stop_watcher()
        threads = [threading.Thread(target=stop, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "stop_watcher() hung"
        assert not vm.watching
    vm.start_watcher(interval_us=10**6)
    stopper = threading.Thread(target=vm.stop_watcher, daemon=True)
    stopper.start()
    vm.close()
    stopper.join(10)
    assert not stopper.is_alive() and not vm.watching


def test_stopping_the_watcher_does_not_wait_out_its_interval(machine):
    vm = machine.vm
    machine.vcpu(0)
    vm.start_watcher(interval_us=10**7)            # ten seconds
    time.sleep(0.05)
    started = time.monotonic()
    vm.stop_watcher()
    assert time.monotonic() - started < 2
    vm.start_watcher(interval_us=10**7)
    started = time.monotonic()
    vm.close()
    assert time.monotonic() - started < 2


def test_the_tracepoint_watcher_closes_the_events_of_ended_threads(machine):
    from kvmcoal.bench.doorbell import _tracepoint_unavailable
    why = _tracepoint_unavailable(machine.vm.kvm)
    if why:
        pytest.skip(f"the tracepoint wake-up cannot run here: {why}")
    vm = machine.vm
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(BUF_ZONE, buf)
    machine.vcpu(0)
    vm.start_watcher(wake="tracepoint", interval_us=1000)
    try:
        fds = len(os.listdir("/proc/self/fd"))
        for i in range(140):           # more threads than the watcher traces at once
            t = threading.Thread(target=machine.run, args=([at(BUF_ZONE, i)],))
            t.start()
            t.join(30)
            buf.wait(5)
            assert entries(buf.ring) == [at(BUF_ZONE, i)]
        time.sleep(0.1)
        assert len(os.listdir("/proc/self/fd")) <= fds + 4    # the last thread's pair, at most
    finally:
        vm.stop_watcher()


def test_a_bus_over_a_vm_without_a_vcpu(machine):
    vm = machine.vm
    bus = Bus(vm)
    rec = []
    m = bus.map(FunctionDevice(read=lambda o, s: 7, write=lambda o, s, v: rec.append(v)),
                BUF_ZONE.addr, 8, coalesced=True, own_buffer=True)
    assert bus.read(BUF_ZONE.addr, 4) == 7
    assert bus.flush() == 0
    bus.unmap(m)
    bus.close()


def test_vm_close_from_a_buffer_handler_is_refused_before_anything_closes(machine):
    vm = machine.vm
    buf, other = vm.create_coalesced_buffer(), vm.create_coalesced_buffer()
    buf.ring.push(BUF_ZONE.addr, b"\1")
    errors = []

    def handler(addr, data, pio):
        try:
            vm.close()
        except RuntimeError as exc:
            errors.append(str(exc))
    buf.ring.consume(handler)
    assert errors and "one of its buffers" in errors[0]
    assert not vm.closed and not buf.closed and not other.closed
    vm.close()
    assert buf.closed and other.closed
