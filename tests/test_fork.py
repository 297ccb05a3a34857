"""fork() while other threads hold kvmcoal's locks or are inside its calls.

The child has only the thread that forked.  Whatever the parent's other
threads held at that moment (a lock, a writer's place in the zone table's
grace period, a consumer call) must not hang the child or let it take the
parent's entries.  Each scenario runs in a forked child under an alarm, so
a hang fails the test instead of stalling the run.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import pytest

from kvmcoal import BufferForkedError, Bus, EmulatedVm, Ring, Zone, kvm
from kvmcoal.devices import Doorbell

from .conftest import load_guest

HANG_S = 10


def in_child(body) -> int:
    """Run *body* in a forked child; its exit status (0: body returned True)."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads: that is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(HANG_S)          # a hang ends the child with SIGALRM
            os._exit(0 if body() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the child hung (killed by signal {os.WTERMSIG(status)} after {HANG_S} s)")
    return os.WEXITSTATUS(status)


def hold(lock) -> threading.Event:
    """Have another thread take *lock* and keep it until the returned event is set."""
    taken, done = threading.Event(), threading.Event()

    def holder():
        with lock:
            taken.set()
            done.wait()
    threading.Thread(target=holder, daemon=True).start()
    assert taken.wait(5)
    return done


def test_a_child_forked_while_a_write_is_in_flight_can_change_zones():
    vm = EmulatedVm()
    buf = vm.create_coalesced_buffer(nbytes=256 << 20)
    zone = Zone(0x1000, 4)
    vm.register_coalesced_mmio2(zone, buf)
    # A long push_many holds the ring's producer lock; a write that picked the
    # zone table waits for it, counted in the table's grace period.
    record = (0x9000).to_bytes(8, "little") + (1).to_bytes(4, "little") + bytes(4) \
        + b"\x01" + bytes(7)
    holding = threading.Thread(target=buf.ring.push_many, args=(record * buf.ring.capacity,))
    holding.start()
    # Pushing (it holds the lock) once the first slot is written: the batch is
    # copied in one go and last moves only at the end.
    while buf._map[8:10] != b"\x00\x90" and holding.is_alive():
        time.sleep(0)
    writer = threading.Thread(target=vm.write, args=(0x1000, b"\x2a"))
    writer.start()
    time.sleep(0.002)
    assert holding.is_alive() and writer.is_alive(), "the push finished too soon to test"

    def child() -> bool:
        with pytest.raises(BufferForkedError):     # the VM's rings are the parent's
            vm.unregister_coalesced_mmio2(zone, buf)
        vm.close()        # installs empty tables: waited for the parent's writer for ever
        return vm.closed and buf.closed
    status = in_child(child)
    holding.join()
    writer.join()
    vm.close()
    assert status == 0


def test_a_child_gets_fresh_locks_for_zones_buffers_and_buses():
    vm = EmulatedVm()
    buf = vm.create_coalesced_buffer()
    bus = Bus(vm)
    releases = [hold(vm._zones_lock), hold(buf._close_lock), hold(bus._maps_lock)]

    def child() -> bool:
        # The VM's rings are the parent's shared memory: using them is refused,
        # with the error that says so, not by hanging on the held lock.
        with pytest.raises(BufferForkedError):
            vm.register_coalesced_mmio(Zone(0x2000, 8))
        with pytest.raises(BufferForkedError):
            vm.create_coalesced_buffer()
        bus.map(Doorbell(), 0x3000, 4)
        buf.close()
        vm.close()
        return True
    status = in_child(child)
    for release in releases:
        release.set()
    bus.close()
    vm.close()
    assert status == 0


def test_a_plain_ring_whose_consumer_another_thread_was_in_works_in_the_child():
    ring = Ring(bytearray(4096))
    for i in range(3):
        assert ring.push(i, b"x")
    entered, release = threading.Event(), threading.Event()

    def slow(addr, data, pio):
        entered.set()
        release.wait()
    consumer = threading.Thread(target=ring.consume, args=(slow, 1))
    consumer.start()
    assert entered.wait(5)

    def child() -> bool:
        # Entry 0 was consumed before its handler ran; the child owns a copy.
        return [e.phys_addr for e in ring.drain()] == [1, 2]
    status = in_child(child)
    release.set()
    consumer.join()
    assert status == 0
    assert [e.phys_addr for e in ring.drain()] == [1, 2]


@pytest.mark.kvm
def test_a_child_cannot_take_the_parent_guests_entries(kvm_vm):
    load_guest(kvm_vm, "store_loop")
    kvm_vm.create_vcpu()
    ring = kvm_vm.ring
    for i in range(3):           # as the kernel would: the ring page is shared memory
        assert ring.push(0xD0000 + i, b"x")

    def child() -> bool:
        try:
            kvm_vm.ring.drain()
        except BufferForkedError:
            kvm_vm.close()       # and the child can still close its copy
            return True
        return False
    assert in_child(child) == 0
    assert [e.phys_addr for e in kvm_vm.ring.drain()] == [0xD0000, 0xD0001, 0xD0002]


def test_a_child_closes_an_inherited_vm_with_several_buffers_and_zones():
    """Closing one buffer re-installs the zone table, which named the other
    buffers' rings: in the child that raised BufferForkedError half-way and
    left the VM's fds open."""
    vm = EmulatedVm()
    buffers = [vm.create_coalesced_buffer() for _ in range(3)]
    for i, buf in enumerate(buffers):
        vm.register_coalesced_mmio2(Zone(0x1000 * (i + 1), 4), buf)
    vm.register_coalesced_mmio(Zone(0x9000, 4))

    def child() -> bool:
        held = [fd for buf in [*buffers, vm._vm_ring] for fd in (buf._memfd, buf._efd)]
        buffers[0].close()            # its callback re-installs the others' zones
        vm.close()
        still_open = [fd for fd in held if os.path.exists(f"/proc/self/fd/{fd}")]
        return vm.closed and all(buf.closed for buf in buffers) and not still_open
    assert in_child(child) == 0
    vm.close()
