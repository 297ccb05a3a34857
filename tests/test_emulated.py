"""EmulatedVm: the kernel's producer rules and the v2 buffer scenarios, in software."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from kvmcoal import ZONE_LIMIT, ZoneLimitError, EmulatedVm, Entry, Zone

MMIO = Zone(0xFE000000, 0x1000)
PIO = Zone(0x400, 8, pio=True)


@pytest.fixture
def vm():
    with EmulatedVm() as machine:
        yield machine


def move_to(ring, start):
    """Put both indices of an empty ring at `start` through the ring's own API."""
    ring.reset()
    for _ in range(start):
        assert ring.push(0, b"\0") and ring.pop() is not None
    assert ring.first == ring.last == start


def interleaved(n):
    """The selftest's stream: 8-byte MMIO and 4-byte PIO writes, alternating."""
    for i in range(n):
        if i % 2:
            yield (PIO.addr + 4 * (i // 2 % 2), (i & 0xFFFFFFFF).to_bytes(4, "little"), True)
        else:
            yield (MMIO.addr + 8 * (i // 2 % 512), (i * 0x0101010101).to_bytes(8, "little"),
                   False)


@pytest.mark.parametrize("page_size", [4096, 16384])
def test_selftest_fill_from_every_start(page_size):
    with EmulatedVm(page_size=page_size) as vm:
        vm.register_coalesced_mmio(MMIO)
        vm.register_coalesced_mmio(PIO)
        ring = vm.ring
        stream = list(interleaved(ring.max))
        expected = [Entry(a, d, pio=p) for a, d, p in stream[:ring.capacity]]
        for start in range(ring.max):
            move_to(ring, start)
            for addr, data, pio in stream[:ring.capacity]:
                assert vm.write(addr, data, pio=pio)
            addr, data, pio = stream[ring.capacity]
            assert not vm.write(addr, data, pio=pio)   # full: the exit path
            assert ring.drain() == expected


def test_unregister_makes_the_next_write_exit(vm):
    vm.register_coalesced_mmio(MMIO)
    vm.register_coalesced_mmio(PIO)
    assert vm.write(MMIO.addr, b"\1" * 8) and vm.write(PIO.addr, b"\2" * 4, pio=True)
    vm.unregister_coalesced_mmio(Zone(MMIO.addr + 0x10, 1))   # a range inside removes it
    assert not vm.write(MMIO.addr, b"\1" * 8)
    assert vm.write(PIO.addr, b"\2" * 4, pio=True)
    vm.unregister_coalesced_mmio(PIO)
    assert not vm.write(PIO.addr, b"\2" * 4, pio=True)
    assert len(vm.ring) == 3   # pending entries are not touched by unregistering


def test_kernel_zone_rules(vm):
    assert not vm.write(MMIO.addr, b"x")   # no zone: exit
    vm.register_coalesced_mmio(MMIO)
    vm.register_coalesced_mmio(MMIO)       # duplicates and overlaps are accepted
    vm.register_coalesced_mmio(Zone(MMIO.addr + 0x800, 0x1000))
    assert not vm.write(MMIO.addr + 0xffc, b"12345678", pio=True)   # wrong bus
    assert vm.write(MMIO.addr + 0xffc, b"12345678")                 # inside the overlap
    assert not vm.write(MMIO.addr - 1, b"12")                       # straddles the start
    vm.unregister_coalesced_mmio(Zone(0, 1))                        # contains nothing: no-op
    assert len(vm.zones) == 3
    vm.unregister_coalesced_mmio(Zone(MMIO.addr + 0x900, 4))        # inside all three
    assert vm.zones == []
    vm.register_coalesced_mmio(MMIO)
    vm.unregister_coalesced_mmio(Zone(MMIO.addr, 1 << 31))          # negative int in the kernel
    assert len(vm.zones) == 1


def test_device_limit(vm):
    for i in range(ZONE_LIMIT):
        vm.register_coalesced_mmio(Zone(i * 16, 16))
    with pytest.raises(ZoneLimitError, match="1000") as info:
        vm.register_coalesced_mmio(Zone(0, 1))
    assert info.value.errno == 28  # ENOSPC
    vm.register_coalesced_mmio(PIO)  # the other bus has room
    assert vm.write(999 * 16 + 8, b"12345678")


def test_bad_arguments(vm):
    with pytest.raises(TypeError, match="Zone"):
        vm.register_coalesced_mmio((0, 1))
    with pytest.raises(ValueError, match="1 to 8"):
        vm.write(0, b"")
    with pytest.raises(ValueError, match="u64"):
        vm.write(-1, b"x")
    with EmulatedVm() as other:
        foreign = other.create_coalesced_buffer()
        with pytest.raises(ValueError, match="another EmulatedVm"):
            vm.register_coalesced_mmio2(MMIO, foreign)
    buf = vm.create_coalesced_buffer()
    buf.close()
    with pytest.raises(ValueError, match="closed"):
        vm.register_coalesced_mmio2(MMIO, buf)
    vm.close()
    with pytest.raises(ValueError, match="closed EmulatedVm"):
        vm.register_coalesced_mmio(MMIO)


def test_v2_buffer_scenarios(vm):
    a, b = vm.create_coalesced_buffer(), vm.create_coalesced_buffer()
    za, zb = Zone(0x10000, 0x1000), Zone(0x20000, 0x1000)
    assert not vm.write(za.addr, b"x")                    # before any zone: exit
    vm.register_coalesced_mmio2(za, a)
    vm.register_coalesced_mmio2(zb, b)
    for i in range(a.ring.capacity):                      # two buffers, interleaved
        assert vm.write(za.addr + i % 8, bytes([i]))
        assert vm.write(zb.addr, i.to_bytes(4, "little"))
    assert not vm.write(za.addr, b"x") and not vm.write(zb.addr, b"y")   # each full
    assert [e.value for e in a.ring.drain()] == [i & 0xFF for i in range(a.ring.capacity)]
    assert [e.value for e in b.ring.drain()] == list(range(b.ring.capacity))
    assert len(vm.ring) == 0                               # the VM-wide ring saw nothing

    vm.unregister_coalesced_mmio2(za, b)                   # names the wrong buffer: no-op
    assert vm.write(za.addr, b"1")
    vm.unregister_coalesced_mmio2(za, a)                   # move the zone from a to b
    vm.register_coalesced_mmio2(za, b)
    assert vm.write(za.addr, b"2")
    assert [e.data for e in a.ring.drain()] == [b"1"]
    assert [e.data for e in b.ring.drain()] == [b"2"]

    b.close()                                               # closing restores exits
    assert not vm.write(za.addr, b"3") and not vm.write(zb.addr, b"4")
    assert all(t is not b for _, t in vm.zones)


def test_full_ring_falls_through_to_the_next_zone(vm):
    small = vm.create_coalesced_buffer(nbytes=8 + 24 * 2)    # holds one entry
    vm.register_coalesced_mmio2(Zone(0x1000, 0x10), small)
    vm.register_coalesced_mmio(Zone(0x1000, 0x100))       # larger: tried second
    assert vm.write(0x1000, b"a") and vm.write(0x1000, b"b")
    assert [e.data for e in small.ring.drain()] == [b"a"]
    assert [e.data for e in vm.ring.drain()] == [b"b"]


def test_many_producer_threads_lose_nothing(vm):
    buf = vm.create_coalesced_buffer(nbytes=8 + 24 * 64)
    vm.register_coalesced_mmio2(Zone(0, 1 << 20), buf)
    threads, per_thread = 4, 20000
    accepted = [[] for _ in range(threads)]
    drained = []
    done = threading.Event()

    def producer(t):
        for i in range(per_thread):
            value = (t << 32 | i).to_bytes(8, "little")
            if vm.write(t * 8, value):
                accepted[t].append(i)

    def consumer():
        while not done.is_set() or len(buf.ring):
            drained.extend(buf.ring.drain())

    c = threading.Thread(target=consumer)
    c.start()
    workers = [threading.Thread(target=producer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    c.join()
    # Every write was coalesced exactly once or refused; per producer, in order.
    for t in range(threads):
        got = [e.value & 0xFFFFFFFF for e in drained if e.phys_addr == t * 8]
        assert got == accepted[t]
    assert sum(map(len, accepted)) == len(drained) > 0


def test_zone_changes_from_threads_lose_none():
    """Two threads unregistering different zones at once: every zone they removed is
    gone (the read-modify-write of the zone list used to resurrect some)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(5):
            vm = EmulatedVm()
            mine = {k: [Zone(0x10000 * (k + 1) + 16 * i, 16) for i in range(100)] for k in (0, 1)}
            for zones in mine.values():
                for z in zones:
                    vm.register_coalesced_mmio(z)
            threads = [threading.Thread(target=lambda k=k: [vm.unregister_coalesced_mmio(z)
                                                           for z in mine[k]]) for k in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert vm.zones == [] and not any(vm.write(z.addr, b"\1")
                                              for zs in mine.values() for z in zs)
            vm.close()
    finally:
        sys.setswitchinterval(old)


def test_zone_table_built_from_a_list_that_grows_meanwhile_does_not_overflow():
    from kvmcoal import Ring
    vm = EmulatedVm()
    ring = Ring(bytearray(4096))
    entries: list = []

    class Grow:
        def __index__(self):
            entries.extend([(0x1000 + i, 8, ring) for i in range(1000)])
            return 0

    entries.append((Grow(), 8, ring))
    vm._set_zones(False, entries)        # built from the one entry there was
    assert vm.write(0, b"\1") and not vm.write(0x1000, b"\1")
    vm.close()


def test_zone_is_immutable_even_through_init():
    z = Zone(0x1000, 8)
    with pytest.raises(TypeError, match="immutable"):
        z.__init__(0x2000, 8)
    assert (z.addr, z.size) == (0x1000, 8)


def test_unregister_returns_only_after_writes_using_the_old_zones_finish():
    """A write that picked the zone table before an unregister may still be pushing
    (here: waiting for the ring's producer lock, which a long push_many holds).
    Unregister waits for it, as the kernel waits with SRCU, so a drain after the
    unregister sees that write, and nothing the write reported as coalesced is lost
    when the buffer is closed next."""
    vm = EmulatedVm()
    buf = vm.create_coalesced_buffer(nbytes=256 << 20)     # a push_many that takes a while
    zone = Zone(0x1000, 4)
    vm.register_coalesced_mmio2(zone, buf)
    record = (0x9000).to_bytes(8, "little") + (1).to_bytes(4, "little") + bytes(4) \
        + b"\x01" + bytes(7)
    holding = threading.Thread(target=buf.ring.push_many, args=(record * buf.ring.capacity,))
    holding.start()                                      # holds the producer lock, no GIL
    # Pushing once the first slot is written (the batch is copied in one go).
    while buf._map[8:10] != b"\x00\x90" and holding.is_alive():
        time.sleep(0)
    wrote = []
    writer = threading.Thread(target=lambda: wrote.append(vm.write(0x1000, b"\x2a")))
    writer.start()                                       # picks the table, waits for the lock
    time.sleep(0.002)
    assert holding.is_alive() and writer.is_alive(), "the push finished too soon to test"
    vm.unregister_coalesced_mmio2(zone, buf)
    assert not writer.is_alive() and wrote, "unregister returned with a write in flight"
    holding.join()
    writer.join()
    vm.close()


def test_nothing_registered_while_close_runs_survives_it():
    """close() used to run without the zones lock and mark the VM closed only at
    the end: a buffer and zone registered meanwhile survived it, still coalescing
    into a buffer nobody would close."""
    registered = 0
    for _ in range(30):
        vm = EmulatedVm()
        made: list = []
        stop = threading.Event()

        def register():
            i = 0
            while not stop.is_set():
                try:
                    buf = vm.create_coalesced_buffer()
                    made.append(buf)
                    vm.register_coalesced_mmio2(Zone(0x10000 + 16 * (i % 900), 4), buf)
                    vm.register_coalesced_mmio(Zone(0x80000 + 16 * (i % 90), 4))
                except ValueError:
                    return                  # closed: refused, as it must be from now on
                i += 1

        thread = threading.Thread(target=register)
        thread.start()
        time.sleep(0.003)
        vm.close()
        stop.set()
        thread.join()
        assert vm.zones == []
        assert all(buf.closed for buf in made), "a buffer made during close() was left open"
        assert not any(vm.write(0x10000 + 16 * i, b"\1") for i in range(900))
        assert not any(vm.write(0x80000 + 16 * i, b"\1") for i in range(90))
        for buf in made:
            buf.close()
        registered += len(made)
    assert registered > 0, "no registration ran while close() did: the race was not tested"


def test_binding_a_zone_to_no_buffer_is_a_type_error(vm):
    with pytest.raises(TypeError, match="register_coalesced_mmio binds a zone to the VM-wide"):
        vm.register_coalesced_mmio2(Zone(0x1000, 4), None)
    assert vm.zones == [] and not vm.write(0x1000, b"\1")


def run_both(*calls, timeout=10):
    """Run each call on its own thread at once; fail if any is still running at *timeout*."""
    errors: list[BaseException] = []

    def guarded(call):
        try:
            call()
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=guarded, args=(call,), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "deadlocked"
    return errors


def test_vm_close_and_buffer_close_on_two_threads_do_not_deadlock():
    """vm.close() used to hold the zones lock while it closed each buffer (the
    buffer's lock), and a buffer's close() holds its lock while its callback
    takes the zones lock: two locks in opposite orders."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(300):
            vm = EmulatedVm()
            buf = vm.create_coalesced_buffer()
            vm.register_coalesced_mmio2(Zone(0x1000, 4), buf)
            assert run_both(buf.close, vm.close) == []
            assert vm.closed and buf.closed
    finally:
        sys.setswitchinterval(old)


def test_a_handler_that_changes_zones_while_the_vm_closes():
    """vm.close() used to hold the zones lock while it waited for a consumer
    whose handler was waiting for that lock."""
    vm = EmulatedVm()
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(Zone(0x1000, 0x100), buf)
    assert vm.write(0x1000, b"\x01")
    inside = threading.Event()
    seen: list[BaseException] = []

    def handler(addr, data, pio):
        inside.set()
        time.sleep(0.2)                         # vm.close() runs meanwhile
        try:
            vm.register_coalesced_mmio(Zone(0x2000, 0x100))
        except ValueError as exc:
            seen.append(exc)

    def consume():
        inside.clear()
        buf.ring.consume(handler)
    consumer = threading.Thread(target=consume, daemon=True)   # a deadlock must not hang the run
    consumer.start()
    assert inside.wait(5)
    assert run_both(vm.close) == []
    consumer.join(5)
    assert not consumer.is_alive()
    assert len(seen) == 1 and "closed EmulatedVm" in str(seen[0])
    assert vm.zones == [] and buf.closed


def test_vm_close_from_a_handler_is_refused_before_it_changes_anything():
    vm = EmulatedVm()
    buf = vm.create_coalesced_buffer()
    vm.register_coalesced_mmio2(Zone(0x1000, 4), buf)
    vm.register_coalesced_mmio(Zone(0x3000, 4))
    assert vm.write(0x1000, b"\x01")
    refused: list[BaseException] = []

    def handler(addr, data, pio):
        try:
            vm.close()
        except RuntimeError as exc:
            refused.append(exc)
    buf.ring.consume(handler)
    assert len(refused) == 1 and "close it after that call returns" in str(refused[0])
    assert not vm.closed and not buf.closed and len(vm.zones) == 2
    vm.close()                                  # and afterwards it closes, whole
    assert vm.closed and buf.closed and not vm.write(0x3000, b"\x01")
