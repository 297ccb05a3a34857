"""The Bus: dispatch, coalescing-aware flushing, adapters and example devices."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
import threading
import time

import pytest

from kvmcoal import (BufferForkedError, Bus, EmulatedVm, MappingOverlapError, RingCorruptedError,
                     UnmappedAccessError, Zone)
from kvmcoal.devices import (Avatar2Peripheral, Doorbell, Framebuffer, FunctionDevice,
                             IndexDataPair, Uart16550, UnicornMmio)

from .conftest import load_guest


@pytest.fixture
def vm():
    with EmulatedVm() as machine:
        yield machine


class Recorder:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return len(self.writes)

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def map_uart(bus, uart, base=0x3F8):
    bus.map(uart, base, 1, pio=True, coalesced=True)
    bus.map(uart, base + 1, 7, pio=True, flush_on_access=True, device_offset=1)


def map_pci(bus, pair):
    bus.map(pair.index, 0xCF8, 4, pio=True, coalesced=True)
    bus.map(pair.data, 0xCFC, 4, pio=True, flush_on_access=True)


def test_index_data_pair_sees_the_last_index(vm):
    bus = Bus(vm)
    pair = IndexDataPair({i: i * 3 for i in range(1000)})
    map_pci(bus, pair)
    for i in range(400):                     # more than a ring: full-ring fallbacks
        bus.write(0xCF8, 4, i, pio=True)
    assert pair.current < 399                # most of it still sits in the ring
    assert bus.read(0xCFC, 4, pio=True) == 399 * 3
    bus.write(0xCF8, 4, 7, pio=True)
    bus.write(0xCFC, 4, 0xABC, pio=True)     # a data write flushes the index too
    assert pair.registers[7] == 0xABC


def test_uart_output_is_byte_exact(vm):
    bus = Bus(vm)
    uart = Uart16550()
    map_uart(bus, uart)
    text = bytes(range(256)) * 4 + b"kvmcoal\n"
    for i, ch in enumerate(text):
        bus.write(0x3F8, 1, ch, pio=True)
        if i % 300 == 0:
            assert bus.read(0x3FD, 1, pio=True) == Uart16550.LSR_EMPTY   # LSR read flushes
            assert bytes(uart.output) == text[:i + 1]
    bus.flush()
    assert bytes(uart.output) == text


def test_framebuffer_and_flush_counts(vm):
    bus = Bus(vm)
    fb = Framebuffer(0x1000)
    bus.map(fb, 0xE0000000, 0x1000, coalesced=True)
    for i in range(0, 0x1000, 4):
        bus.write(0xE0000000 + i, 4, i, pio=False)
    assert bus.read(0xE0000000 + 0x10, 4) == 0x10     # the read flushed everything
    assert fb.writes == 0x400 and fb.memory[0xFFC:] == (0xFFC).to_bytes(4, "little")
    assert bus.flush() == 0


def test_reentrant_device_does_not_restart_the_flush(vm):
    bus = Bus(vm)
    seen = []

    class Nosy:
        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            seen.append(value)
            bus.read(0x2000, 4)          # reads flush: must not recurse into the flush
            if value == 5:
                bus.write(0x1000, 4, 1000)   # a write during replay is queued, in order

    bus.map(Nosy(), 0x1000, 4, coalesced=True)
    bus.map(Recorder(), 0x2000, 4)
    for v in range(10):
        bus.write(0x1000, 4, v)
    bus.flush()
    assert seen == list(range(10)) + [1000]


def test_overlaps_unmapped_and_unmap(vm):
    bus = Bus(vm)
    rec = Recorder()
    bus.map(rec, 0x1000, 0x100, coalesced=True)
    with pytest.raises(MappingOverlapError, match=r"Recorder at MMIO \[0x10f0.*Recorder at MMIO \[0x1000"):
        bus.map(Recorder(), 0x10F0, 0x20)
    bus.map(Recorder(), 0x10F0, 0x20, pio=True)           # the port space is separate
    with pytest.raises(UnmappedAccessError, match="0x5000"):
        bus.read(0x5000, 4)
    with pytest.raises(UnmappedAccessError):
        bus.write(0x5000, 4, 1)
    assert bus.unmapped_accesses == 2
    open_bus = Bus(unmapped="ones")
    assert open_bus.read(0x5000, 2) == 0xFFFF
    open_bus.write(0x5000, 2, 1)
    assert open_bus.unmapped_accesses == 2
    for v in range(5):
        bus.write(0x1000 + v, 1, v)
    assert rec.writes == []                                  # all still in the ring
    bus.unmap(bus.find(0x1000))
    assert rec.writes == [(v, 1, v) for v in range(5)]       # delivered before unmapping
    assert vm.write(0x1000, b"x") is False                   # and the zone is gone
    with pytest.raises(ValueError, match="must be 'raise' or 'ones'"):
        Bus(unmapped="zero")
    with pytest.raises(TypeError, match="not a device"):
        bus.map(object(), 0x9000, 4)


def test_adapters_plug_existing_models_in_unchanged(vm):
    bus = Bus(vm)
    log = []
    bus.map(FunctionDevice(read=lambda off, size: 0x40 + off,
                           write=lambda off, size, val: log.append(("fn", off, val))),
            0x1000, 0x10, coalesced=True)

    def uc_read(uc, offset, size, user_data):
        return user_data + offset

    def uc_write(uc, offset, size, value, user_data):
        log.append((user_data, offset, value))

    bus.map(UnicornMmio(uc_read, 0x100, uc_write, "uc"), 0x2000, 0x10, coalesced=True)

    class Peripheral:   # avatar2's AvatarPeripheral interface
        def hw_read(self, offset, size):
            return 0x77

        def hw_write(self, offset, size, value):
            log.append(("avatar2", offset, value))
            return True

    bus.map(Avatar2Peripheral(Peripheral()), 0x3000, 0x10)
    bus.write(0x1004, 4, 1)
    bus.write(0x2008, 2, 2)
    bus.write(0x3000, 1, 3)    # not coalesced: delivered at once...
    assert log == [("avatar2", 0, 3)]
    assert bus.read(0x1002, 1) == 0x42 and bus.read(0x2001, 1) == 0x101
    assert bus.read(0x3000, 1) == 0x77
    assert log == [("avatar2", 0, 3), ("fn", 4, 1), ("uc", 8, 2)]   # ...the others at the read
    with pytest.raises(TypeError, match="hw_read"):
        Avatar2Peripheral(object())


def test_doorbell_on_its_own_buffer_with_a_poller(vm):
    bus = Bus(vm)
    bell = Doorbell()
    mapping = bus.map(bell, 0xFE000000, 4, coalesced=True, own_buffer=True)
    assert mapping.buffer is not None
    bus.start_pollers()
    for v in range(1, 501):
        bus.write(0xFE000000, 4, v)
    deadline = 100
    while len(bell.requests) < 500 and deadline:
        bell.event.wait(0.1)
        bell.event.clear()
        deadline -= 1
    assert bell.requests == list(range(1, 501))   # delivered by the poller, in order, once
    assert len(vm.ring) == 0                   # the VM-wide ring was not involved
    bus.close()


def test_doorbell_with_asyncio(vm):
    bus = Bus(vm)
    bell = Doorbell()
    mapping = bus.map(bell, 0xFE000000, 4, coalesced=True, own_buffer=True)

    async def main():
        task = asyncio.create_task(bus.poll_async(mapping))
        for v in range(10):
            bus.write(0xFE000000, 4, v)
            await asyncio.sleep(0)
        while len(bell.requests) < 10:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert bell.requests == list(range(10))


# -- the same devices behind a real guest --

def test_real_guest_drives_uart_and_framebuffer(kvm_vm):
    load_guest(kvm_vm, "store_loop")
    bus = Bus(kvm_vm)
    uart, fb = Uart16550(), Framebuffer(0x100)
    map_uart(bus, uart)
    bus.map(fb, 0xD0000, 0x100, coalesced=True)
    vcpu = kvm_vm.create_vcpu()
    iterations = 1000                      # 3000 writes: many ring-full fallbacks
    vcpu.setup_real_mode(0x1000, segments={"es": 0xD000}, rax=0, rcx=iterations, rdi=0x10,
                         rdx=0x3F8)
    bus.run(vcpu)
    assert bytes(uart.output) == bytes(v & 0xFF for v in range(iterations))
    assert fb.read(0x10, 4) == iterations - 1 and fb.read(0x18, 2) == iterations - 1
    assert fb.writes == 2 * iterations


def test_real_guest_index_data_pair(kvm_vm):
    load_guest(kvm_vm, "ordering")
    bus = Bus(kvm_vm)
    pair = IndexDataPair({i: i * 3 for i in range(2000)})
    bus.map(pair.index, 0xD0010, 4, coalesced=True)
    bus.map(pair.data, 0xD0018, 4, flush_on_access=True)
    vcpu = kvm_vm.create_vcpu()
    per_round, rounds = 300, 4
    vcpu.setup_real_mode(0x1000, segments={"es": 0xD000}, rax=0, rcx=per_round, rsi=rounds,
                         rdi=0x10, rbx=0x4000)
    bus.run(vcpu)
    with kvm_vm.memory(0x4000, 4 * rounds) as results:
        seen = list(results.cast("I"))
    assert seen == [3 * (per_round * (r + 1) - 1) for r in range(rounds)]
    assert Zone(0xD0010, 4) in [m.zone for m in bus.mappings]


def test_pollers_whose_devices_read_the_bus_do_not_deadlock(vm):
    bus = Bus(vm)

    class ReadingBell(Doorbell):
        def write(self, offset, size, value):
            bus.read(0x9000, 4)      # a read flushes: takes the other rings
            super().write(offset, size, value)

    bells = [ReadingBell(), ReadingBell()]
    bus.map(Recorder(), 0x9000, 4)
    for n, bell in enumerate(bells):
        bus.map(bell, 0xFE000000 + 0x1000 * n, 4, coalesced=True, own_buffer=True)
    bus.start_pollers()
    for v in range(300):
        for n in range(2):
            bus.write(0xFE000000 + 0x1000 * n, 4, v)
    for bell in bells:
        for _ in range(100):
            if len(bell.requests) == 300:
                break
            bell.event.wait(0.1)
            bell.event.clear()
        assert bell.requests == list(range(300))
    assert bus.poller_errors == []
    bus.close()


def test_unmap_while_a_writer_runs_loses_nothing(vm):
    bus = Bus(vm)
    rec = Recorder()
    bus.map(rec, 0x1000, 4, coalesced=True, own_buffer=True)
    total, refused = 5000, []
    started = threading.Event()

    def writer():
        for v in range(total):
            if v == 100:
                started.set()
            try:
                bus.write(0x1000, 4, v)
            except UnmappedAccessError:
                refused.append(v)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(5)
    bus.unmap(bus.find(0x1000))
    t.join(30)
    delivered = [value for _, _, value in rec.writes]
    # Every write reached the device, in order, or was refused as unmapped
    # after the mapping was gone; none vanished.
    assert delivered + refused == list(range(total))


def _own_buffer_bus(write):
    vm = EmulatedVm()
    bus = Bus(vm)
    mapping = bus.map(FunctionDevice(write=write), 0x1000, 4, coalesced=True, own_buffer=True)
    bus.start_pollers()
    return vm, bus, mapping


def _until(predicate, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


def test_a_device_raising_valueerror_does_not_stop_its_poller():
    got = []

    def write(offset, size, value):
        got.append(value)
        if value == 1:
            raise ValueError("bad value")

    vm, bus, mapping = _own_buffer_bus(write)
    bus.write(0x1000, 4, 1)
    assert _until(lambda: len(bus.poller_errors) == 1)
    bus.write(0x1000, 4, 2)
    assert _until(lambda: got == [1, 2]), got
    assert isinstance(bus.poller_errors[0][1], ValueError)
    bus.close()
    vm.close()


def test_a_corrupted_own_buffer_is_reported_once_and_no_longer_polled():
    got = []
    vm, bus, mapping = _own_buffer_bus(lambda *a: None)
    other = bus.map(FunctionDevice(write=lambda o, s, v: got.append(v)), 0x2000, 4,
                    coalesced=True, own_buffer=True)
    struct.pack_into("<I", mapping.buffer._map, 4, 0xFFFFFFFF)   # a peer scribbles `last`
    os.eventfd_write(mapping.buffer.fileno(), 1)                  # and wakes its consumer
    assert _until(lambda: len(bus.poller_errors) == 1)
    os.eventfd_write(mapping.buffer.fileno(), 1)
    vm.write(0x2000, (9).to_bytes(4, "little"))    # the poller still serves the others
    assert _until(lambda: got == [9]), got
    time.sleep(0.05)
    assert len(bus.poller_errors) == 1 and bus.poller_threads == 1
    assert isinstance(bus.poller_errors[0][1], RingCorruptedError)
    with pytest.raises(RingCorruptedError):
        bus.close()                      # the final flush meets it too, and says so...
    assert bus.mappings == [] and mapping.buffer.closed   # ...after unmapping everything
    vm.close()



def test_a_child_forked_while_a_poller_delivers_can_use_the_bus():
    vm = EmulatedVm()
    bus = Bus(vm)
    delivering = threading.Event()

    def slow(offset, size, value):
        delivering.set()
        time.sleep(0.5)

    bus.map(FunctionDevice(write=slow), 0x1000, 4, coalesced=True, own_buffer=True)
    bus.map(FunctionDevice(read=lambda o, s: 7), 0x2000, 4)
    bus.start_pollers()
    bus.write(0x1000, 4, 1)
    assert delivering.wait(5)                  # the poller holds the delivery lock now
    pid = os.fork()
    if pid == 0:   # the inherited own buffer says so; before, the read hung on the lock
        signal.alarm(5)
        try:
            bus.read(0x2000, 4)
        except BufferForkedError:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    bus.close()
    vm.close()


def test_a_framebuffer_mapped_larger_than_its_memory_never_grows():
    vm = EmulatedVm()
    bus = Bus(vm)
    fb = Framebuffer(16)
    bus.map(fb, 0x100, 0x100)
    bus.write(0x100 + 0x20, 4, 0xAABBCCDD)     # past the end: ignored
    bus.write(0x100 + 0xE, 4, 0x11223344)      # straddles the end: the part inside lands
    assert len(fb.memory) == 16
    assert fb.memory[14:16] == b"\x44\x33" and bus.read(0x100 + 0x20, 4) == 0
    vm.close()


def test_unmap_from_a_handler_does_not_wait_for_the_poller():
    """A device handler running in a flush unmaps an own-buffer mapping: unmap must
    not wait for that mapping's poller, which needs the lock the flush holds."""
    vm = EmulatedVm()
    bus = Bus(vm)
    other = bus.map(FunctionDevice(), 0x2000, 4, coalesced=True, own_buffer=True)
    bus.start_pollers()
    took = []

    def write(offset, size, value):
        bus.write(0x2000, 4, 5)          # wakes other's poller, which waits for the lock
        time.sleep(0.1)
        t0 = time.monotonic()
        bus.unmap(other)                 # delivers that write here, then closes
        took.append(time.monotonic() - t0)

    bus.map(FunctionDevice(write=write), 0x1000, 4, coalesced=True)
    bus.write(0x1000, 4, 1)
    bus.flush()
    assert took and took[0] < 2 and other not in bus.mappings
    assert other.buffer.closed and bus.poller_threads == 1
    bus.close()
    vm.close()


def test_a_coalesced_mapping_that_could_never_be_unregistered_is_refused():
    vm = EmulatedVm()
    bus = Bus(vm)
    for base, size in ((2**32, 2**31), (2**64 - 8, 16)):
        with pytest.raises(ValueError, match="never be unregistered"):
            bus.map(FunctionDevice(), base, size, coalesced=True)
    assert vm.zones == [] and bus.mappings == []
    bus.unmap(bus.map(FunctionDevice(), 2**32, 2**31 - 1, coalesced=True))
    assert vm.zones == []
    vm.close()


def test_close_unmaps_everything_even_when_several_flushes_fail():
    vm = EmulatedVm()
    bus = Bus(vm)

    def broken(offset, size, value):
        raise KeyError("device failed")

    for base in (0x1000, 0x2000):
        bus.map(FunctionDevice(write=broken), base, 4, coalesced=True)
        bus.write(base, 4, 1)
    own = bus.map(FunctionDevice(write=broken), 0x3000, 4, coalesced=True, own_buffer=True)
    bus.write(0x3000, 4, 1)
    with pytest.raises(KeyError):
        bus.close()
    assert bus.mappings == [] and vm.zones == [] and own.buffer.closed
    vm.close()


def test_unmap_from_its_own_buffers_delivery_is_refused_cleanly():
    vm = EmulatedVm()
    bus = Bus(vm)
    refused = []

    def write(offset, size, value):
        with pytest.raises(RuntimeError, match="its own buffer's delivery"):
            bus.unmap(mapping)
        refused.append(value)

    mapping = bus.map(FunctionDevice(write=write), 0x1000, 4, coalesced=True, own_buffer=True)
    bus.write(0x1000, 4, 1)
    bus.flush()
    assert refused == [1] and mapping in bus.mappings and vm.zones   # nothing half-done
    bus.unmap(mapping)
    assert bus.mappings == [] and vm.zones == []
    vm.close()


def test_a_coalesced_mapping_ending_exactly_at_2_64_is_refused():
    vm = EmulatedVm()
    bus = Bus(vm)
    with pytest.raises(ValueError, match="never be unregistered"):
        bus.map(FunctionDevice(), 2**64 - 0x1000, 0x1000, coalesced=True)
    vm.close()


def test_map_and_unmap_from_two_threads_lose_no_mapping():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        vm = EmulatedVm()
        bus = Bus(vm)
        doomed = [bus.map(FunctionDevice(), 0x100000 + 0x10 * i, 0x10) for i in range(200)]
        added = []
        adder = threading.Thread(target=lambda: added.extend(
            bus.map(FunctionDevice(), 0x200000 + 0x10 * i, 0x10) for i in range(200)))
        remover = threading.Thread(target=lambda: [bus.unmap(m) for m in doomed])
        adder.start()
        remover.start()
        adder.join()
        remover.join()
        assert sorted(m.base for m in bus.mappings) == sorted(m.base for m in added)
        vm.close()
    finally:
        sys.setswitchinterval(old)


def test_a_framebuffer_with_a_negative_device_offset_stays_in_place():
    fb = Framebuffer(16)
    fb.write(-2, 4, 0x11223344)
    assert len(fb.memory) == 16 and fb.memory[:2] == b"\x22\x11"
    assert fb.read(-2, 4) == 0x11220000



def test_a_bus_dropped_with_pollers_running_is_collected_and_frees_its_threads_and_fds():
    import gc
    import weakref

    vm = EmulatedVm()
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    bus = Bus(vm)
    bells = [Doorbell() for _ in range(5)]
    for i, bell in enumerate(bells):
        bus.map(bell, 0x1000 + 16 * i, 4, coalesced=True, own_buffer=True)
    bus.start_pollers()
    bus.write(0x1000, 4, 7)
    assert threading.active_count() == threads_before + 1      # one poller serves all five
    deadline = time.monotonic() + 5
    while bells[0].requests != [7] and time.monotonic() < deadline:
        time.sleep(0.01)                  # delivered: no poller holds the bus any more
    assert bells[0].requests == [7]
    gone = weakref.ref(bus)
    del bus
    gc.collect()
    assert gone() is None, "the pollers kept the Bus alive"
    deadline = time.monotonic() + 5
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads_before
    assert len(os.listdir("/proc/self/fd")) == fds_before
    vm.close()


def test_poll_async_ends_quietly_when_the_bus_closes():
    async def main():
        vm = EmulatedVm()
        bus = Bus(vm)
        bell = Doorbell()
        mapping = bus.map(bell, 0x1000, 4, coalesced=True, own_buffer=True)
        task = asyncio.ensure_future(bus.poll_async(mapping))
        bus.write(0x1000, 4, 5)
        for _ in range(100):
            if bell.requests:
                break
            await asyncio.sleep(0.01)
        bus.close()
        await asyncio.wait_for(task, 5)   # ends without an exception, as a poller thread does
        vm.close()
        return bell.requests
    assert asyncio.run(main()) == [5]


def test_a_bus_whose_vm_was_closed_first_closes_cleanly():
    vm = EmulatedVm()
    bus = Bus(vm)
    bus.map(Doorbell(), 0x1000, 4, coalesced=True, own_buffer=True)
    bus.map(Doorbell(), 0x2000, 4, coalesced=True)
    vm.close()
    bus.close()
    assert bus.mappings == [] and bus.closed
