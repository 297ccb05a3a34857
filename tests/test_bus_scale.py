"""The Bus at scale: delivery in C, batch devices, one poller set, statistics.

Hundreds of own-buffer devices on one EmulatedVm (real memfds, eventfds and
threads), batch devices interleaved with per-entry ones, mapping and
unmapping while writes arrive, asyncio shutdown, and the counters each
layer keeps.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import subprocess
import sys
import threading
import time

import pytest

import kvmcoal
from kvmcoal import BATCH_LIMIT, Bus, EmulatedVm, Zone
from kvmcoal.buffers import FDS_PER_BUFFER
from kvmcoal.devices import Doorbell, Framebuffer, FunctionDevice, Uart16550

from .machines import Write


@pytest.fixture(autouse=True, scope="module")
def _enough_fds():
    """500 buffers hold 2000 fds: raise the soft limit to the hard one for this module."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if want < 4 * 500 + 64:
        pytest.skip(f"the hard fd limit is {hard}: too few for 500 buffers")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Log:
    """Devices that log every write they get into one shared list, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []

    def device(self, name: str, *, batch: bool = False):
        log = self.log

        class Device:
            calls = 0

            def read(self, offset: int, size: int) -> int:
                return 0

            def write(self, offset: int, size: int, value: int) -> None:
                log.append((name, offset, size, value))

        if batch:
            def write_many(self, records):
                type(self).calls += 1
                self.kinds.append(type(records).__name__)
                for rec in records:
                    size = int(rec["len"])
                    value = int.from_bytes(bytes(rec["data"][:size]), "little")
                    log.append((name, int(rec["phys_addr"]), size, value))
            Device.write_many = write_many
            Device.kinds = []
        return Device()


def _write(vm, addr: int, value: int, size: int = 4, pio: bool = False) -> bool:
    return vm.write(addr, value.to_bytes(size, "little"), pio=pio)


# -- batch devices --

def test_a_batch_device_interleaved_with_per_entry_ones_sees_ring_order():
    vm = EmulatedVm()
    bus = Bus(vm)
    logs = Log()
    fb = logs.device("batch", batch=True)
    reg = logs.device("plain")
    bus.map(fb, 0x1000, 0x100, coalesced=True, device_offset=0x40)
    bus.map(reg, 0x2000, 4, coalesced=True)
    order = (["batch"] * 8 + ["plain"] + ["batch"] * 3 + ["plain"] * 2 + ["batch"] * 9
             + ["plain"] + ["batch"])
    expected = []
    for i, who in enumerate(order):
        addr = 0x1000 + 4 * i if who == "batch" else 0x2000
        assert _write(vm, addr, i)
        expected.append((who, addr - 0x1000 + 0x40 if who == "batch" else 0, 4, i))
    assert bus.flush() == len(order)
    assert logs.log == expected
    # Runs of 8 and 9 are batches; those of 3 and 1 come through write().
    assert type(fb).calls == 2
    assert fb.kinds == ["ndarray"] * 2
    stats = bus.find(0x1000).stats()
    assert stats["delivered"] == 21 and stats["largest_batch"] == 21 and stats["flushes"] == 1
    assert stats["batches"] == 2
    assert kvmcoal.BATCH_MIN == 8
    bus.close()
    vm.close()


def test_a_batch_device_mapped_twice_gets_one_run_across_its_mappings():
    vm = EmulatedVm()
    bus = Bus(vm)
    logs = Log()
    dev = logs.device("both", batch=True)
    bus.map(dev, 0xD0000, 0x1000, coalesced=True)
    bus.map(dev, 0x400, 1, pio=True, coalesced=True, device_offset=0x400)
    for i in range(10):
        assert _write(vm, 0xD0010, i)
        assert _write(vm, 0x400, i & 0xFF, size=1, pio=True)
    assert bus.flush() == 20
    assert type(dev).calls == 1
    assert logs.log == [x for i in range(10)
                        for x in (("both", 0x10, 4, i), ("both", 0x400, 1, i))]
    bus.close()
    vm.close()


def test_a_batch_device_without_numpy_gets_a_memoryview(monkeypatch):
    from kvmcoal import bus as bus_module
    monkeypatch.setattr(bus_module, "_records_view", lambda: memoryview)
    vm = EmulatedVm()
    bus = Bus(vm)
    got = []

    class Raw:
        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            raise AssertionError("a coalesced write came through write()")

        def write_many(self, records):
            got.append((type(records), records.readonly, bytes(records)))

    bus.map(Raw(), 0x1000, 16, coalesced=True)
    for _ in range(8):
        assert _write(vm, 0x1004, 0xAABBCCDD)
    bus.flush()
    (kind, readonly, raw), = got
    assert kind is memoryview and readonly           # phys_addr holds the device offset:
    assert raw == kvmcoal.ENTRY_STRUCT.pack(0x4, 4, 0, bytes.fromhex("ddccbbaa") + bytes(4)) * 8
    bus.close()
    vm.close()


def test_a_raising_batch_device_consumes_its_run_and_the_rest_follow_in_order():
    vm = EmulatedVm()
    bus = Bus(vm)
    logs = Log()
    fb = logs.device("batch", batch=True)
    calls = []

    def boom(records):
        calls.append(len(records))
        if len(calls) == 1:
            raise RuntimeError("device failed")
        type(fb).write_many.__get__(fb)(records)

    bus.map(fb, 0x1000, 0x100, coalesced=True)
    fb.write_many = boom
    bus.unmap(bus.find(0x1000))
    bus.map(fb, 0x1000, 0x100, coalesced=True)        # write_many looked up again
    bus.map(logs.device("plain"), 0x2000, 4, coalesced=True)
    for i in range(10):
        assert _write(vm, 0x1000, i)
    assert _write(vm, 0x2000, 99)
    for i in range(10, 20):
        assert _write(vm, 0x1000, i)
    with pytest.raises(RuntimeError, match="device failed"):
        bus.flush()
    assert calls == [10] and logs.log == []
    assert bus.flush() == 11                          # never the failed run again
    assert calls == [10, 10]
    assert logs.log == [("plain", 0, 4, 99)] + [("batch", 0, 4, i) for i in range(10, 20)]
    bus.close()
    vm.close()


def test_a_run_longer_than_the_batch_limit_arrives_in_several_calls_in_order():
    vm = EmulatedVm(page_size=32 * 4096)           # a VM ring of 5461 slots
    bus = Bus(vm)
    logs = Log()
    fb = logs.device("batch", batch=True)
    bus.map(fb, 0x1000, 0x10, coalesced=True)
    n = BATCH_LIMIT + 500
    for i in range(n):
        assert _write(vm, 0x1000, i)
    assert bus.flush() == n
    assert [value for _, _, _, value in logs.log] == list(range(n))
    assert type(fb).calls == 2
    assert bus.find(0x1000).stats()["largest_batch"] == n
    bus.close()
    vm.close()


def _uart_writes(rng):
    """A driver's session: set up, a burst, a divisor change, loopback, more bytes."""
    out = [(3, 0x80), (0, 0x0C), (1, 0x00), (3, 0x03)]        # DLAB, 9600 baud, 8N1
    out += [(0, rng.randrange(256)) for _ in range(200)]
    out += [(4, 0x10)] + [(0, rng.randrange(256)) for _ in range(5)] + [(4, 0x00)]
    out += [(0, rng.randrange(256)) for _ in range(50)]
    return out


@pytest.mark.parametrize("whole", [False, True], ids=["thr-coalesced", "all-coalesced"])
def test_the_uart_takes_bursts_as_batches_and_ends_as_byte_by_byte(whole):
    rng = random.Random(5)
    writes = _uart_writes(rng)
    reference = Uart16550()
    for offset, value in writes:
        reference.write(offset, 1, value)
    vm = EmulatedVm()
    bus = Bus(vm)
    uart = Uart16550()
    if whole:
        bus.map(uart, 0x3F8, 8, pio=True, coalesced=True)
    else:
        bus.map(uart, 0x3F8, 1, pio=True, coalesced=True)
        bus.map(uart, 0x3F9, 7, pio=True, flush_on_access=True, device_offset=1)
    for offset, value in writes:
        bus.write(0x3F8 + offset, 1, value, pio=True)
        if rng.random() < 0.05:
            bus.flush()
    bus.read(0x3FD, 1, pio=True)
    assert vars(uart) == vars(reference)
    assert bus.find(0x3F8, pio=True).stats()["largest_batch"] > 1
    bus.close()
    vm.close()


@pytest.mark.parametrize("numpy", [True, False], ids=["numpy", "no-numpy"])
def test_the_framebuffer_batch_matches_store_by_store(numpy, monkeypatch):
    if not numpy:
        from kvmcoal.devices import models
        monkeypatch.setattr(models, "_numpy", lambda: None)
    rng = random.Random(11)
    reference = Framebuffer(256)
    vm = EmulatedVm()
    bus = Bus(vm)
    fb = Framebuffer(256)
    bus.map(fb, 0x10000, 0x200, coalesced=True)
    bus.map(Framebuffer(4), 0x20000, 4, coalesced=True)                  # splits the runs
    for _ in range(600):
        size = rng.choice([1, 2, 4, 8])
        offset = rng.randrange(0, 0x200 - size)
        value = rng.getrandbits(8 * size)
        reference.write(offset, size, value)
        bus.write(0x10000 + offset, size, value)
        if rng.random() < 0.1:
            bus.write(0x20000, 4, 1)
    bus.flush()
    assert fb.memory == reference.memory and fb.writes == reference.writes
    bus.close()
    vm.close()


# -- many devices --

def test_500_own_buffer_devices_one_poller_thread_and_the_documented_fds():
    vm = EmulatedVm()
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    bus = Bus(vm)
    bells = [Doorbell() for _ in range(500)]
    for i, bell in enumerate(bells):
        bus.map(bell, 0x100000 + 16 * i, 4, coalesced=True, own_buffer=True)
    bus.start_pollers(threads=2)
    assert threading.active_count() == threads_before + 2 == threads_before + bus.poller_threads
    opened = len(os.listdir("/proc/self/fd")) - fds_before
    assert opened == bus.stats()["fds"] == FDS_PER_BUFFER * 500 + 2
    rng = random.Random(3)
    sent: dict[int, list[int]] = {i: [] for i in range(500)}
    for value in range(3000):
        i = rng.randrange(500)
        assert _write(vm, 0x100000 + 16 * i, value)
        sent[i].append(value)
    deadline = time.monotonic() + 10
    while any(bell.requests != sent[i] for i, bell in enumerate(bells)):
        assert time.monotonic() < deadline, "the pollers did not deliver everything"
        time.sleep(0.01)
    assert bus.poller_errors == []
    bus.close()
    assert threading.active_count() == threads_before
    assert len(os.listdir("/proc/self/fd")) == fds_before
    vm.close()


def test_a_flush_with_every_ring_empty_makes_no_system_call():
    vm = EmulatedVm()
    bus = Bus(vm)
    for i in range(200):
        bus.map(Doorbell(), 0x100000 + 16 * i, 4, coalesced=True, own_buffer=True)
    bus.map(Doorbell(), 0x2000, 4)
    for i in range(0, 200, 7):                       # every buffer signalled once, drained
        assert _write(vm, 0x100000 + 16 * i, 1)
    bus.flush()

    def syscalls():
        with open("/proc/thread-self/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return int(fields["syscr"]), int(fields["syscw"])

    # Reading the counters reads a file: what two readings in a row differ by.
    first, second = syscalls(), syscalls()
    overhead = (second[0] - first[0], second[1] - first[1])
    before = syscalls()
    for _ in range(1000):
        bus.flush()
        bus.read(0x2000, 4)
    after = syscalls()
    assert (after[0] - before[0], after[1] - before[1]) == overhead
    assert _write(vm, 0x100000, 2)                  # the check sees a read when there is one
    bus.flush()
    again = syscalls()
    assert again[0] - after[0] > overhead[0]
    bus.close()
    vm.close()


def test_mapping_and_unmapping_while_writes_arrive_loses_and_repeats_nothing():
    """A writer thread stores a rising counter to random slots while the main
    thread maps and unmaps devices there and pollers deliver: every write the
    VM coalesced reaches exactly one device, once, in order per slot."""
    vm = EmulatedVm()
    bus = Bus(vm)
    bus.start_pollers(threads=2)
    slots = 40
    delivered: list[tuple[int, int]] = []

    class Slot:
        def __init__(self, i):
            self.i = i

        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            delivered.append((self.i, value))

    mapped = {}
    for i in range(slots):
        mapped[i] = bus.map(Slot(i), 0x100000 + 16 * i, 4, coalesced=True,
                            own_buffer=i % 2 == 0)
    coalesced: list[tuple[int, int]] = []
    stop = threading.Event()

    def writer():
        rng = random.Random(1)
        value = 0
        while not stop.is_set():
            i = rng.randrange(slots)
            if _write(vm, 0x100000 + 16 * i, value):
                coalesced.append((i, value))
            value += 1

    thread = threading.Thread(target=writer)
    thread.start()
    rng = random.Random(2)
    try:
        for _ in range(300):
            i = rng.randrange(slots)
            if i in mapped:
                bus.unmap(mapped.pop(i))
            else:
                mapped[i] = bus.map(Slot(i), 0x100000 + 16 * i, 4, coalesced=True,
                                    own_buffer=rng.random() < 0.5)
            if rng.random() < 0.2:
                bus.read(0x100000, 4) if 0 in mapped else bus.flush()
    finally:
        stop.set()
        thread.join()
    bus.close()
    assert bus.poller_errors == []
    assert sorted(delivered) == sorted(coalesced)            # each exactly once
    for i in range(slots):
        mine = [v for s, v in delivered if s == i]
        assert mine == sorted(mine)                          # in order per slot
    assert len(coalesced) > 1000
    vm.close()


def test_past_the_fd_limit_mapping_says_how_many_fds_the_buffers_hold():
    code = """
import errno, resource
from kvmcoal import Bus, EmulatedVm
from kvmcoal.devices import Doorbell
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
vm = EmulatedVm(); bus = Bus(vm)
n = 0
try:
    while True:
        bus.map(Doorbell(), 0x100000 + 16 * n, 4, coalesced=True, own_buffer=True)
        n += 1
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
    print(n, len(bus.mappings), exc)
bus.map(Doorbell(), 0x1000, 4)          # the bus still works
bus.close(); vm.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    n, mapped, message = out.stdout.split(" ", 2)
    assert 40 < int(n) == int(mapped) < 64
    assert "a CoalescedBuffer holds 4" in message and "ulimit -n" in message


def test_poll_async_serves_every_buffer_from_one_task_and_ends_quietly_on_close():
    async def main():
        vm = EmulatedVm()
        bus = Bus(vm)
        bells = [Doorbell() for _ in range(50)]
        for i, bell in enumerate(bells[:25]):
            bus.map(bell, 0x100000 + 16 * i, 4, coalesced=True, own_buffer=True)
        task = asyncio.ensure_future(bus.poll_async())
        await asyncio.sleep(0)
        for i, bell in enumerate(bells[25:], 25):     # mapped while the task runs
            bus.map(bell, 0x100000 + 16 * i, 4, coalesced=True, own_buffer=True)
        for i in range(50):
            assert _write(vm, 0x100000 + 16 * i, i)
        for _ in range(500):
            if all(bell.requests == [i] for i, bell in enumerate(bells)):
                break
            await asyncio.sleep(0.01)
        assert [bell.requests for bell in bells] == [[i] for i in range(50)]
        bus.unmap(bus.find(0x100000))                 # unmapping one does not end it
        await asyncio.sleep(0.02)
        assert not task.done()
        bus.close()
        await asyncio.wait_for(task, 5)               # ends without an exception
        assert task.exception() is None
        vm.close()
    asyncio.run(main())


def test_poll_async_on_a_closed_bus_returns_at_once():
    async def main():
        vm = EmulatedVm()
        bus = Bus(vm)
        bus.close()
        await asyncio.wait_for(bus.poll_async(), 1)
        vm.close()
    asyncio.run(main())


def test_start_pollers_checks_its_thread_count():
    vm = EmulatedVm()
    bus = Bus(vm)
    with pytest.raises(ValueError, match="at least one"):
        bus.start_pollers(threads=0)
    with pytest.raises(TypeError, match="threads must be an int"):
        bus.start_pollers(threads=1.5)
    bus.start_pollers()
    bus.start_pollers()
    assert bus.poller_threads == 1
    bus.close()
    assert bus.poller_threads == 0
    vm.close()


# -- statistics --

def test_bus_and_mapping_statistics_count_what_happened():
    vm = EmulatedVm()
    bus = Bus(vm, unmapped="ones")
    plain = bus.map(Doorbell(), 0x1000, 4, coalesced=True)
    own = bus.map(Doorbell(), 0x2000, 4, coalesced=True, own_buffer=True)
    direct = bus.map(Doorbell(), 0x3000, 4)
    for i in range(5):
        bus.write(0x1000, 4, i)
    for i in range(3):
        bus.write(0x2000, 4, i)
    bus.write(0x3000, 4, 1)
    bus.write(0x9000, 4, 1)                   # unmapped
    assert bus.flush() == 8
    bus.write(0x1000, 4, 9)
    bus.read(0x3000, 4)                       # flushes one more
    stats = bus.stats()
    assert stats["delivered"] == 9 and stats["flushes_with_entries"] == 2
    assert stats["direct_writes"] == 1 and stats["unmapped_accesses"] == 1
    by_base = {m["base"]: m for m in stats["mappings"]}
    assert by_base[0x1000]["delivered"] == 6 and by_base[0x1000]["flushes"] == 2
    assert by_base[0x1000]["largest_batch"] == 5
    assert by_base[0x2000]["delivered"] == 3 and by_base[0x2000]["largest_batch"] == 3
    assert by_base[0x2000]["buffer"]["depth_high_water"] == 3
    assert by_base[0x2000]["buffer"]["entries_consumed"] == 3
    assert by_base[0x3000]["direct"] == 1 and by_base[0x3000]["buffer"] is None
    assert plain.stats()["coalesced"] and own.stats()["device"] == "Doorbell"
    assert direct.stats()["delivered"] == 0
    bus.close()
    vm.close()


def test_exit_deliveries_count_as_direct():
    vm = EmulatedVm()
    bus = Bus(vm)
    mapping = bus.map(Doorbell(), 0x1000, 4)
    bus.deliver(0x1000, b"\x05\0\0\0", False)
    assert mapping.stats()["direct"] == 1 and mapping.device.requests == [5]
    with pytest.raises(ValueError, match="1 to 8"):
        bus.deliver(0x1000, b"", False)
    bus.close()
    vm.close()


def test_vm_statistics_on_both_kernels(machine):
    zone = Zone(0x50000, 0x10)
    machine.vm.register_coalesced_mmio(zone)
    capacity = machine.vm.ring.capacity if machine.name == "emulated" else None
    n = 200
    writes = [Write(0x50000, 4, i) for i in range(n)] + [Write(0x60000, 4, 1)]
    exits = machine.run(writes)
    stats = machine.vm.stats()
    coalesced = n - (len(exits) - 1)
    assert stats["coalesced_writes"] == coalesced
    assert stats["ring_full_refusals"] == len(exits) - 1 > 0
    if capacity is not None:
        assert coalesced == capacity and stats["exits"] == {"MMIO": len(exits), "IO": 0}
    else:
        assert stats["exits"]["MMIO"] == len(exits) and stats["exits"]["HLT"] == 1
        vstats = machine.vcpus[0].stats()
        assert vstats["exits"] == len(exits) + 1
        assert vstats["ring_full_refusals"] == len(exits) - 1
    assert stats["ring"]["depth_high_water"] >= coalesced - 1
    machine.vm.ring.drain()
    after = machine.vm.stats()
    assert after["flushes"] == stats["flushes"] + 1
    assert after["ring"]["entries_consumed"] == coalesced
    assert after["coalesced_writes"] == coalesced


@pytest.mark.parametrize("batch", [False, True], ids=["per-entry", "batch"])
def test_bus_run_on_real_kvm_delivers_every_store_once_in_order(batch):
    """The kvm bench's Bus.run rows, small: the store_loop guest's MMIO page and
    port mapped coalesced to one checking device (a batch device, or not)."""
    from kvmcoal import kvm
    from kvmcoal.bench.vmm import BusRun
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm is not usable here: {reason}")
    with BusRun(3000, True, batch=batch) as run:
        result = run.measure()          # raises unless each store arrived once, in order
    assert result["stores"] == 3000 and result["exits"] > 1
    stats = result["stats"]
    (mmio, port) = stats["bus"]["mappings"]
    assert mmio["delivered"] + port["delivered"] == stats["vm"]["coalesced_writes"]
    assert mmio["direct"] + port["direct"] == result["exits"] - 1     # all but the HLT
    assert stats["vm"]["coalesced_writes"] + result["exits"] - 1 == 3000
    assert (mmio["batches"] > 0) == batch


# -- what an audit found --

def test_a_device_unmapping_another_mapping_mid_flush_loses_none_of_its_entries():
    with EmulatedVm() as vm, Bus(vm, unmapped="ones") as bus:
        bell = Doorbell()

        class Unmapper:
            def read(self, offset, size):
                return 0

            def write(self, offset, size, value):
                bus.unmap(other)

        bus.map(Unmapper(), 0x1000, 4, coalesced=True)
        other = bus.map(bell, 0x2000, 4, coalesced=True)
        for addr, value in [(0x2000, 10), (0x1000, 1), (0x2000, 11), (0x2000, 12)]:
            bus.write(addr, 4, value)
        assert bus.flush() == 4
        assert bell.requests == [10, 11, 12] and bus.unmapped_accesses == 0
        assert other not in bus.mappings and bus.find(0x2000) is None
        assert not _write(vm, 0x2000, 13)            # no longer coalesced
        bus.write(0x2000, 4, 13)                     # and nothing is there
        assert bus.unmapped_accesses == 1 and bell.requests == [10, 11, 12]


def test_a_device_unmapping_itself_mid_flush_gets_its_queued_entries():
    with EmulatedVm() as vm, Bus(vm) as bus:
        got = []

        class Once:
            def read(self, offset, size):
                return 0

            def write(self, offset, size, value):
                got.append(value)
                if value == 0:
                    bus.unmap(me)
                    bus.map(Doorbell(), 0x1000, 4)   # a new device at the same place

        me = bus.map(Once(), 0x1000, 4, coalesced=True)
        for i in range(3):
            bus.write(0x1000, 4, i)
        bus.flush()
        # The new mapping covers the range: entries queued before it was
        # made reach it, as writes to that address now would.
        assert got == [0] and bus.find(0x1000).device.requests == [1, 2]


def test_close_from_a_device_is_refused_and_leaves_the_bus_whole():
    with EmulatedVm() as vm:
        bus = Bus(vm)
        got = []

        class Closer:
            def read(self, offset, size):
                return 0

            def write(self, offset, size, value):
                got.append(value)
                if value == 1:
                    bus.close()

        mapping = bus.map(Closer(), 0x1000, 4, coalesced=True, own_buffer=True)
        for i in range(4):
            bus.write(0x1000, 4, i)
        with pytest.raises(RuntimeError, match="close it after that delivery returns"):
            bus.flush()
        assert not bus.closed and bus.mappings == [mapping]
        assert bus.flush() == 2 and got == [0, 1, 2, 3]
        bus.close()
        assert bus.closed and mapping.buffer.closed


def test_a_scribbled_signalled_word_does_not_hide_entries_from_a_flush():
    with EmulatedVm() as vm, Bus(vm) as bus:
        got = []

        class Reg:
            def read(self, offset, size):
                return got[-1] if got else 0

            def write(self, offset, size, value):
                got.append(value)

        mapping = bus.map(Reg(), 0x1000, 4, coalesced=True, own_buffer=True)
        bus.write(0x1000, 4, 1)
        bus.flush()
        # A peer sets the shared signalled word for ever: no wakeup is claimed.
        word = mapping.buffer.nbytes + 16
        mapping.buffer._map[word:word + 4] = (1).to_bytes(4, "little")
        bus.write(0x1000, 4, 7)
        assert bus.read(0x1000, 4) == 7
        while len(mapping.buffer.ring) < mapping.buffer.ring.capacity:
            assert _write(vm, 0x1000, 5)
        bus.write(0x1000, 4, 9999)                   # refused: flushed first, in order
        assert got[-1] == 9999 and got.count(5) == mapping.buffer.ring.capacity


def test_deliver_takes_bytes_not_ints():
    with EmulatedVm() as vm, Bus(vm) as bus:
        bell = bus.map(Doorbell(), 0x1000, 4).device
        with pytest.raises(TypeError, match="as bytes"):
            bus.deliver(0x1000, 4, False)
        bus.deliver(0x1000, bytearray(b"\x02\0\0\0"), False)
        assert bell.requests == [2] and bus.direct_writes == 1


def test_poll_async_of_one_mapping_keeps_going_past_a_device_error():
    async def main():
        vm = EmulatedVm()
        bus = Bus(vm)
        got = []

        def write(offset, size, value):
            got.append(value)
            if value == 1:
                raise KeyError("device failed")

        mapping = bus.map(FunctionDevice(write=write), 0x1000, 4, coalesced=True,
                          own_buffer=True)
        task = asyncio.ensure_future(bus.poll_async(mapping))
        bus.write(0x1000, 4, 1)
        for _ in range(200):
            if bus.poller_errors:
                break
            await asyncio.sleep(0.01)
        bus.write(0x1000, 4, 2)
        for _ in range(200):
            if got == [1, 2]:
                break
            await asyncio.sleep(0.01)
        assert got == [1, 2] and isinstance(bus.poller_errors[0][1], KeyError)
        assert not task.done()
        bus.close()
        await asyncio.wait_for(task, 5)
        vm.close()
    asyncio.run(main())


def test_a_dispatcher_collected_in_a_cycle_leaves_no_ring_pointing_at_its_pending_set():
    """The GC empties the lists (and Targets) of a cycle before it frees the
    Dispatcher: its rings must still leave the set it frees, or their next
    push writes freed memory (this crashed)."""
    code = """
import gc
from kvmcoal import EmulatedVm, Zone
from kvmcoal._dispatch import Dispatcher, Target
vm = EmulatedVm(); buf = vm.create_coalesced_buffer()
vm.register_coalesced_mmio2(Zone(0x1000, 4), buf)
class Dev:
    def read(self, o, s): return 0
    def write(self, o, s, v): pass
class Source:
    def __call__(self): return None
d = Dispatcher(print, bytes); s = Source(); s.d = d; d.set_vm_ring(None, s)   # a cycle
t = Target(None, Dev(), 0x1000, 4, False, 0x1000, buf.ring); d.add_buffer(t)
del d, s, t
gc.collect()
spray = [bytes(230) for _ in range(20000)]
for _ in range(100):
    vm.write(0x1000, bytes(4)); buf.ring.drain()
assert all(b == bytes(230) for b in spray)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
