"""The Ring and Entry API, on both implementations."""

from __future__ import annotations

import gc
import mmap
import pickle
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest

import kvmcoal
from kvmcoal import RingCorruptedError

from .conftest import set_indices


def test_constants_agree(impl):
    assert impl.ENTRY_SIZE == 24
    assert impl.RING_HEADER_SIZE == 8
    assert impl.MIN_RING_NBYTES == 56
    assert impl.PAGE_SIZE == mmap.PAGESIZE
    assert impl.RING_MAX == (mmap.PAGESIZE - 8) // 24
    assert [impl.ring_max(n) for n in (56, 79, 80, 4096, 16384, 65536)] == [2, 2, 3, 170, 682, 2730]


def test_ring_max_rejects(impl):
    with pytest.raises(ValueError, match="31"):
        impl.ring_max(31)
    with pytest.raises(TypeError, match="int"):
        impl.ring_max(4096.0)
    with pytest.raises(ValueError, match="slots"):
        impl.ring_max(8 + 24 * (1 << 32))


def test_package_exports_the_c_ring():
    assert kvmcoal.Ring is kvmcoal._ring.Ring
    assert kvmcoal.Entry is kvmcoal._ring.Entry
    assert kvmcoal.RING_MAX == kvmcoal.ring_max(kvmcoal.PAGE_SIZE)
    assert issubclass(RingCorruptedError, kvmcoal.KvmcoalError)


def test_entry_dtype_matches_the_abi():
    dtype = kvmcoal.ENTRY_DTYPE
    assert dtype.itemsize == kvmcoal.ENTRY_SIZE
    assert [dtype.fields[name][1] for name in ("phys_addr", "len", "pio", "data")] == [0, 8, 12, 16]


def test_new_ring_is_empty_and_attaching_keeps_indices(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    assert (ring.max, ring.capacity, ring.nbytes, len(ring)) == (170, 169, 4096, 0)
    assert ring.push(0x1000, b"\x01")
    again = impl.Ring(buf)
    assert (again.first, again.last, len(again)) == (0, 1, 1)


@pytest.mark.parametrize("make", [
    lambda n: bytearray(n),
    lambda n: mmap.mmap(-1, n),
    lambda n: memoryview(mmap.mmap(-1, n * 2))[n:],
    lambda n: np.zeros(n, dtype=np.uint8),
    lambda n: np.zeros((n // 8, 8), dtype=np.uint8),
], ids=["bytearray", "mmap", "mmap-slice", "numpy", "numpy-2d"])
def test_any_writable_contiguous_buffer(impl, make):
    buf = make(4096)
    ring = impl.Ring(buf)
    assert ring.push(7, b"\xaa\xbb")
    assert [(e.phys_addr, e.data) for e in ring.drain()] == [(7, b"\xaa\xbb")]
    ring.release()


def test_ring_uses_its_size_prefix_only(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf, nbytes=8 + 24 * 4)
    assert ring.max == 4 and ring.capacity == 3
    for i in range(3):
        assert ring.push(i, b"x")
    assert not ring.push(3, b"x")
    assert buf[8 + 24 * 4:] == bytes(4096 - 8 - 24 * 4)


def test_ring_holds_the_buffer_without_copying(impl):
    m = mmap.mmap(-1, 4096)
    ring = impl.Ring(m)
    assert ring.push(0x10, b"\x05")
    assert m[8:16] == (0x10).to_bytes(8, "little")
    with pytest.raises(BufferError):
        m.close()  # the ring still holds it
    ring.release()
    m.close()


@pytest.mark.parametrize("buffer,exc,match", [
    (b"\0" * 4096, TypeError, "read-only"),
    (12, TypeError, "int"),
    ("text", TypeError, "str"),
    (bytearray(55), ValueError, "56-byte minimum"),
    (np.zeros((64, 64), dtype=np.uint8)[:, ::2], ValueError, "C-contiguous"),
])
def test_bad_buffers(impl, buffer, exc, match):
    with pytest.raises(exc, match=match):
        impl.Ring(buffer)


def test_misaligned_buffer(impl):
    with pytest.raises(ValueError, match="4-byte aligned"):
        impl.Ring(memoryview(bytearray(4097))[1:])


@pytest.mark.parametrize("nbytes,exc", [(31, ValueError), (4097, ValueError), (-1, ValueError),
                                        ("8", TypeError)])
def test_bad_nbytes(impl, nbytes, exc):
    with pytest.raises(exc, match="nbytes"):
        impl.Ring(bytearray(4096), nbytes=nbytes)


@pytest.mark.parametrize("addr,data,exc,match", [
    (-1, b"x", ValueError, "u64"),
    (1 << 64, b"x", ValueError, "u64"),
    ("0", b"x", TypeError, "phys_addr"),
    (0, b"", ValueError, "1 to 8 bytes, got 0"),
    (0, b"123456789", ValueError, "1 to 8 bytes, got 9"),
    (0, 5, TypeError, "bytes-like"),
    (0, "ab", TypeError, "bytes-like"),
    # Non-integers are refused, never truncated (1.7 would become address 1).
    (1.7, b"x", TypeError, "phys_addr must be an int, not 'float'"),
    (float("nan"), b"x", TypeError, "phys_addr must be an int"),
    (1e30, b"x", TypeError, "phys_addr must be an int"),
    (np.float64(3.9), b"x", TypeError, "phys_addr must be an int"),
    (0, memoryview(b"123456789abcdefghi")[::2], ValueError, "1 to 8 bytes, got 9"),
])
def test_bad_push_arguments(impl, addr, data, exc, match):
    ring = impl.Ring(bytearray(4096))
    with pytest.raises(exc, match=match):
        ring.push(addr, data)
    with pytest.raises(exc, match=match):
        impl.Entry(addr, data)
    assert len(ring) == 0


def test_push_accepts_every_bytes_like(impl):
    ring = impl.Ring(bytearray(4096))
    for data in (b"\x01", bytearray(b"\x01\x02"), memoryview(b"\x01\x02\x03\x04"),
                 np.arange(8, dtype=np.uint8)):
        assert ring.push((1 << 64) - 1, data, pio=True)
    got = ring.drain()
    assert [e.len for e in got] == [1, 2, 4, 8]
    assert all(e.pio is True and e.phys_addr == (1 << 64) - 1 for e in got)
    assert got[3].data == bytes(range(8))


def test_integers_of_any_kind_are_accepted_where_an_int_is(impl):
    """Anything with __index__ (numpy integers, bool) is an int to every argument."""
    ring = impl.Ring(bytearray(4096), nbytes=np.int64(4096))
    assert impl.ring_max(np.int32(4096)) == ring.max == 170
    assert ring.push(np.uint64(5), b"a") and ring.push(np.int64(6), b"b") and ring.push(True, b"c")
    assert [e.phys_addr for e in ring.drain(limit=np.int64(2))] == [5, 6]
    assert ring.consume(lambda *a: None, np.int8(5)) == 1


def test_strided_data_is_copied_as_bytes_would(impl):
    ring = impl.Ring(bytearray(4096))
    assert ring.push(1, memoryview(b"abcdefgh")[::2])
    assert ring.push(2, np.arange(16, dtype=np.uint8)[::4])
    assert [e.data for e in ring.drain()] == [b"aceg", bytes([0, 4, 8, 12])]


def test_entry_cannot_be_changed_by_calling_init_again(impl):
    e = impl.Entry(1, b"a")
    members = {e}
    with pytest.raises(TypeError, match="immutable"):
        e.__init__(2, b"bb")
    assert e == impl.Entry(1, b"a") and e in members


def test_entry_is_final_and_a_ring_can_be_held_weakly(impl):
    with pytest.raises(TypeError):
        type("MyEntry", (impl.Entry,), {})
    ring = impl.Ring(bytearray(4096))
    ref = weakref.ref(ring)
    assert ref() is ring
    ring.release()
    del ring
    gc.collect()
    assert ref() is None


def test_a_live_ring_cannot_be_reinitialised_and_a_released_one_cannot_be_iterated(impl):
    ring = impl.Ring(bytearray(4096))
    with pytest.raises(RuntimeError, match="live ring"):
        ring.__init__(bytearray(64))
    ring.release()
    with pytest.raises(ValueError, match="released"):
        iter(ring)


def test_init_reentered_from_its_own_arguments_is_refused(impl):
    """size.__index__ (or legacy_full_check.__bool__) calling __init__ again must not
    leave the ring over one buffer with the other's size (that overflowed the heap)."""
    big, small = bytearray(1 << 16), bytearray(64)
    ring = impl.Ring.__new__(impl.Ring)

    class Size:
        def __index__(self):
            with pytest.raises(RuntimeError, match="live ring"):
                ring.__init__(small)
            return len(big)

    class Legacy:
        def __bool__(self):
            with pytest.raises(RuntimeError, match="live ring"):
                ring.__init__(small)
            return False

    if impl.__name__.endswith("_ring"):      # the twin takes its buffer first: nothing to race
        ring.__init__(big, nbytes=Size())
        assert ring.max == impl.ring_max(len(big))
        ring.release()
        ring.__init__(big, legacy_full_check=Legacy())
        assert ring.max == impl.ring_max(len(big))
        ring.release()
    big.append(1)                             # no export left behind


def test_push_on_a_ring_its_own_arguments_released_raises(impl):
    ring = impl.Ring(bytearray(4096))

    class Releasing:
        def __index__(self):
            ring.release()
            return 1

    with pytest.raises(ValueError, match="released"):
        ring.push(Releasing(), b"a")


def test_an_empty_buffer_overlaps_nothing(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    ring.push(1, b"a")
    with memoryview(buf) as view:
        assert ring.drain_into(view[100:100]) == 0
        assert ring.push_many(view[100:100]) == 0
    assert len(ring) == 1


def test_star_import_and_dir_follow_numpy():
    """ENTRY_DTYPE exists only with numpy; ``from kvmcoal import *`` works either way."""
    code = (
        "import importlib.util, sys\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'numpy' else find(n, *a)\n"
        "sys.modules['numpy'] = None\n"
        "ns = {}\n"
        "exec('from kvmcoal import *', ns)\n"
        "import kvmcoal\n"
        "assert 'Ring' in ns and 'ENTRY_DTYPE' not in ns and 'ENTRY_DTYPE' not in dir(kvmcoal)\n"
        "assert not hasattr(kvmcoal, 'ENTRY_DTYPE')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    ns: dict = {}
    exec("from kvmcoal import *", ns)
    assert "ENTRY_DTYPE" in ns and "ENTRY_DTYPE" in dir(kvmcoal)


def test_entry_values(impl):
    e = impl.Entry(0xFE000000, b"\x2a\x00\x00\x80", pio=False)
    assert (e.phys_addr, e.len, e.pio, e.data, e.value) == (0xFE000000, 4, False, b"\x2a\x00\x00\x80",
                                                         0x8000002A)
    assert e == impl.Entry(0xFE000000, bytearray(b"\x2a\x00\x00\x80"))
    assert e != impl.Entry(0xFE000000, b"\x2a\x00\x00\x80", pio=True)
    assert e != impl.Entry(0xFE000000, b"\x2a\x00\x00\x80\x00")
    assert hash(e) == hash(impl.Entry(0xFE000000, b"\x2a\x00\x00\x80"))
    assert repr(e) == "Entry(phys_addr=0xfe000000, data=b'*\\x00\\x00\\x80', pio=False)"
    assert pickle.loads(pickle.dumps(e)) == e
    assert impl.Entry(0, b"\xff" * 8).value == (1 << 64) - 1
    with pytest.raises(AttributeError):
        e.phys_addr = 1  # type: ignore[misc]


def test_push_pop_drain_consume_iterate_in_order(impl):
    ring = impl.Ring(bytearray(4096))
    for i in range(10):
        assert ring.push(0x100 + i, bytes([i]) * (1 + i % 8), pio=bool(i % 2))
    assert ring.pop() == impl.Entry(0x100, b"\x00")
    assert [e.phys_addr for e in ring.drain(2)] == [0x101, 0x102]
    seen = []
    assert ring.consume(lambda a, d, p: seen.append((a, d, p)), limit=3) == 3
    assert seen == [(0x103, b"\x03" * 4, True), (0x104, b"\x04" * 5, False),
                    (0x105, b"\x05" * 6, True)]
    assert [e.phys_addr for e in ring] == [0x106, 0x107, 0x108, 0x109]
    assert ring.pop() is None and ring.drain() == [] and ring.consume(print) == 0
    assert ring.first == ring.last == 10


def test_drain_into_raw_records(impl):
    ring = impl.Ring(bytearray(4096))
    for i in range(5):
        assert ring.push(i, b"\xee" * (i + 1), pio=i == 4)
    out = bytearray(24 * 3 + 10)  # room for 3 whole records
    assert ring.drain_into(out) == 3
    assert out[:24] == (0).to_bytes(8, "little") + (1).to_bytes(4, "little") + bytes(4) \
        + b"\xee" + bytes(7)
    arr = np.zeros(8, dtype=kvmcoal.ENTRY_DTYPE)
    assert ring.drain_into(arr) == 2
    assert list(arr["phys_addr"][:2]) == [3, 4] and list(arr["pio"][:2]) == [0, 1]
    assert arr["data"][1].tobytes() == b"\xee" * 5 + bytes(3)
    assert ring.drain_into(arr) == 0
    with pytest.raises(TypeError, match="read-only"):
        ring.drain_into(b"\0" * 48)


@pytest.mark.parametrize("nbytes", [4096, 256 * 1024])   # the copy with the GIL, and without
def test_drain_into_a_large_batch_wrapping_round(impl, nbytes):
    buf = bytearray(nbytes)
    ring = impl.Ring(buf)
    start = ring.max - 100
    set_indices(buf, start, start)
    writes = [(0x2000 + 8 * i, (i * 0x01020304).to_bytes(8, "little")[:1 + i % 8], i % 3 == 0)
              for i in range(ring.capacity)]
    for addr, data, pio in writes:
        assert ring.push(addr, data, pio=pio)
    out = np.zeros(ring.capacity + 1, dtype=kvmcoal.ENTRY_DTYPE)
    assert ring.drain_into(out) == ring.capacity
    got = [(int(r["phys_addr"]), r["data"].tobytes()[:r["len"]], bool(r["pio"]))
           for r in out[:ring.capacity]]
    assert got == writes
    assert all(r["data"].tobytes()[r["len"]:] == bytes(8 - r["len"]) for r in out[:ring.capacity])
    assert len(ring) == 0 and ring.first == ring.last == (start + ring.capacity) % ring.max


def test_push_many_pushes_records_as_push_would_until_the_ring_is_full(impl):
    ring = impl.Ring(bytearray(4096))
    records = np.zeros(200, dtype=kvmcoal.ENTRY_DTYPE)
    records["phys_addr"] = 0xFE000000 + 8 * np.arange(200)
    records["len"] = 1 + np.arange(200) % 8
    records["pio"] = np.arange(200) % 3 == 0
    records["data"] = 0xAB                      # bytes past len are ignored
    assert ring.push_many(records) == ring.capacity        # then the ring was full
    got = ring.drain()
    assert [(e.phys_addr, e.len, e.pio, e.data) for e in got] == [
        (0xFE000000 + 8 * i, 1 + i % 8, i % 3 == 0, b"\xab" * (1 + i % 8))
        for i in range(ring.capacity)]
    # Raw records out of drain_into go back in unchanged, from read-only bytes too.
    assert ring.push_many(records[:5].tobytes()) == 5
    out = bytearray(5 * 24)
    assert ring.drain_into(out) == 5
    assert ring.push_many(bytes(out)) == 5 and ring.drain() == [
        impl.Entry(int(r["phys_addr"]), r["data"].tobytes()[:r["len"]], bool(r["pio"]))
        for r in records[:5]]
    assert ring.push_many(b"") == 0


def test_push_many_checks_every_record_before_pushing_any(impl):
    ring = impl.Ring(bytearray(4096))
    records = np.zeros(10, dtype=kvmcoal.ENTRY_DTYPE)
    records["len"] = 4
    for field, value, shown in (("len", 0, "len=0"), ("len", 9, "len=9"), ("pio", 2, "pio=2")):
        bad = records.copy()
        bad[field][7] = value
        with pytest.raises(ValueError, match=f"record 7 has .*{shown}"):
            ring.push_many(bad)
        assert len(ring) == 0
    with pytest.raises(ValueError, match="whole 24-byte records, not 25 bytes"):
        ring.push_many(bytes(25))
    with pytest.raises(TypeError, match="bytes-like"):
        ring.push_many([1, 2, 3])
    with pytest.raises(ValueError, match="C-contiguous"):
        ring.push_many(memoryview(bytes(48 * 2)).cast("B", (4, 24))[::2])
    buf = bytearray(4096)
    full = impl.Ring(buf)
    set_indices(buf, 0, 200)                    # last out of range: the kernel refuses
    assert full.push_many(records) == 0
    set_indices(buf, 3, 3)
    with pytest.raises(ValueError, match="overlap the ring"):
        full.push_many(memoryview(buf)[8 + 24 * 2:8 + 24 * 5])
    assert len(full) == 0


def test_drain_into_refuses_an_out_buffer_overlapping_the_ring(impl):
    buf = bytearray(4096 + 240)
    ring = impl.Ring(buf, nbytes=4096)
    for i in range(5):
        assert ring.push(0x1000 + i, b"\x01")
    view = memoryview(buf)
    for out in (view[8:8 + 48], view[4000:4096 + 24], view):
        with pytest.raises(ValueError, match="overlaps the ring"):
            ring.drain_into(out)
    assert len(ring) == 5                       # nothing consumed
    assert ring.drain_into(view[4096:]) == 5    # past the ring's size: the caller's memory
    assert view[4096:4096 + 8] == (0x1000).to_bytes(8, "little")
    view.release()


def test_drain_into_zeroes_stale_data_past_len(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    assert ring.push(1, b"\x11" * 8)
    ring.drain()
    buf[8 + 24:8 + 48] = (2).to_bytes(8, "little") + (2).to_bytes(4, "little") + bytes(4) \
        + b"\x22" * 8  # a producer that leaves stale bytes, as the kernel does
    set_indices(buf, 1, 2)
    out = bytearray(24)
    assert ring.drain_into(out) == 1
    assert out[16:] == b"\x22\x22" + bytes(6)


def test_bad_limits(impl):
    ring = impl.Ring(bytearray(4096))
    with pytest.raises(ValueError, match="limit"):
        ring.drain(-1)
    with pytest.raises(TypeError, match="limit must be an int or None, not 'str'"):
        ring.consume(print, "3")
    with pytest.raises(TypeError, match="limit must be an int or None, not 'float'"):
        ring.drain(1.0)
    with pytest.raises(TypeError, match="callable"):
        ring.consume(3)


def test_raising_handler_consumes_its_entry_only(impl):
    ring = impl.Ring(bytearray(4096))
    for i in range(6):
        ring.push(i, b"x")
    calls = []

    def handler(addr, data, pio):
        calls.append(addr)
        if addr == 2:
            raise KeyError(addr)

    with pytest.raises(KeyError):
        ring.consume(handler)
    assert calls == [0, 1, 2]
    assert [e.phys_addr for e in ring.drain()] == [3, 4, 5]


def test_handler_on_every_second_entry_raising(impl):
    ring = impl.Ring(bytearray(4096))
    for i in range(20):
        ring.push(i, b"x")
    delivered = []

    def handler(addr, data, pio):
        delivered.append(addr)
        if addr % 2:
            raise RuntimeError("odd")

    while len(ring):
        try:
            ring.consume(handler)
        except RuntimeError:
            pass
    assert delivered == list(range(20))


def test_nested_consumer_calls_deliver_nothing(impl):
    ring = impl.Ring(bytearray(4096))
    for i in range(4):
        ring.push(i, b"x")
    delivered, nested = [], []

    def handler(addr, data, pio):
        delivered.append(addr)
        nested.append((ring.consume(handler), ring.drain(), ring.pop(), ring.drain_into(bytearray(48)),
                       list(ring)))
        ring.push(100 + addr, b"y")  # producing from a handler is fine
        with pytest.raises(RuntimeError, match="inside consume"):
            ring.reset()
        with pytest.raises(RuntimeError, match="inside consume"):
            ring.release()

    assert ring.consume(handler) == 4
    assert delivered == [0, 1, 2, 3]
    assert nested == [(0, [], None, 0, [])] * 4
    assert [e.phys_addr for e in ring.drain()] == [100, 101, 102, 103]


def test_other_thread_waits_for_running_consume(impl):
    ring = impl.Ring(bytearray(4096))
    for i in range(3):
        ring.push(i, b"x")
    inside, proceed = threading.Event(), threading.Event()
    result = []

    def handler(addr, data, pio):
        if addr == 0:
            inside.set()
            proceed.wait(10)

    t = threading.Thread(target=lambda: result.append(ring.consume(handler)))
    t.start()
    assert inside.wait(10)
    other = threading.Thread(target=lambda: result.append(ring.drain()))
    other.start()
    other.join(0.2)
    assert other.is_alive()  # blocked behind the consume, not returning []
    proceed.set()
    t.join(10)
    other.join(10)
    assert result == [3, []]


def test_release_and_context_manager(impl):
    buf = bytearray(4096)
    with impl.Ring(buf) as ring:
        ring.push(1, b"x")
    assert ring.released
    for call in (len, lambda r: r.push(1, b"x"), lambda r: r.pop(), lambda r: r.drain(),
                 lambda r: r.consume(print), lambda r: r.drain_into(bytearray(24)),
                 lambda r: r.reset(), lambda r: r.first, lambda r: r.max):
        with pytest.raises(ValueError, match="released"):
            call(ring)
    ring.release()  # idempotent
    buf.extend(b"more")  # the export is gone, so the buffer may be resized
    assert "released" in repr(ring)


def test_reset_empties(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    set_indices(buf, 99, 7)
    ring.reset()
    assert (ring.first, ring.last, len(ring)) == (0, 0, 0)


def test_consume_with_repeated_addresses_and_values(impl):
    ring = impl.Ring(bytearray(4096))
    writes = [(0x10, b"\x01\x00"), (0x10, b"\x01\x00"), (0x10, b"\x02\x00"), (0x18, b"\x02\x00"),
              (0x18, b"\x02"), (0x18, b"\x02\x00\x00\x00"), (0x10, b"\x02\x00\x00\x00")]
    for addr, data in writes:
        ring.push(addr, data)
    seen = []
    ring.consume(lambda a, d, p: seen.append((a, d)))
    assert seen == writes


def test_push_many_counts_exactly_what_went_in_while_another_thread_changes_records():
    """Each call either raises with nothing pushed or returns how many are in the ring."""
    ring = kvmcoal.Ring(bytearray(8 + 24 * 4001))          # 3000 records: pushed without the GIL
    records = np.zeros(3000, dtype=kvmcoal.ENTRY_DTYPE)
    records["len"] = 8
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            records["len"][2000] = 0
            records["len"][2000] = 8

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        outcomes = set()
        for _ in range(300):
            try:
                got = ring.push_many(records)
            except ValueError:
                got = 0
                outcomes.add("refused")
            else:
                outcomes.add(got)
            assert len(ring) == got
            ring.reset()
    finally:
        stop.set()
        flipper.join()
    assert outcomes <= {"refused", 2000, 3000}
