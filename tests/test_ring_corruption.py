"""Hostile values in the shared ring raise RingCorruptedError, never crash."""

from __future__ import annotations

import pytest

from kvmcoal import RingCorruptedError

from .conftest import set_indices, write_u32

CONSUMERS = {
    "pop": lambda ring: ring.pop(),
    "drain": lambda ring: ring.drain(),
    "drain_into": lambda ring: ring.drain_into(bytearray(24 * 200)),
    "consume": lambda ring: ring.consume(lambda a, d, p: None),
    "iterate": lambda ring: list(ring),
    "len": len,
}


def slot_offset(slot: int) -> int:
    return 8 + 24 * slot


@pytest.mark.parametrize("consumer", CONSUMERS.values(), ids=CONSUMERS.keys())
@pytest.mark.parametrize("first,last,field,bad", [
    (170, 0, "first", 170), (0xFFFFFFFF, 3, "first", 0xFFFFFFFF),
    (0, 170, "last", 170), (5, 0x80000000, "last", 0x80000000),
])
def test_bad_indices(impl, consumer, first, last, field, bad):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    set_indices(buf, first, last)
    with pytest.raises(RingCorruptedError, match=f"{field}={bad}") as info:
        consumer(ring)
    assert (info.value.field, info.value.value, info.value.index) == (field, bad, None)
    assert (ring.first, ring.last) == (first, last)


@pytest.mark.parametrize("consumer", [c for n, c in CONSUMERS.items() if n != "len"],
                         ids=[n for n in CONSUMERS if n != "len"])
@pytest.mark.parametrize("field,offset,bad", [
    ("len", 8, 0), ("len", 8, 9), ("len", 8, 0xFFFFFFFF), ("pio", 12, 2), ("pio", 12, 0xFFFFFFFF),
])
def test_bad_entry_fields(impl, consumer, field, offset, bad):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    set_indices(buf, 168, 168)
    for i in range(5):
        assert ring.push(i, b"\x07" * 4)
    bad_slot = (168 + 3) % 170  # the fourth entry, past the wrap
    write_u32(buf, slot_offset(bad_slot) + offset, bad)
    delivered = []
    with pytest.raises(RingCorruptedError) as info:
        for _ in range(10):  # pop and friends deliver the good prefix, then raise
            out = consumer(ring)
            if isinstance(out, list):
                delivered += [e.phys_addr for e in out]
            elif out is not None and not isinstance(out, int):
                delivered.append(out.phys_addr)
    assert (info.value.field, info.value.value, info.value.index) == (field, bad, bad_slot)
    assert f"slot {bad_slot} has {field}={bad}" in str(info.value)
    if consumer in (CONSUMERS["pop"], CONSUMERS["drain"]):
        assert delivered == [0, 1, 2]
    # The corrupt entry stays at first, so every later call raises at once.
    assert ring.first == bad_slot
    with pytest.raises(RingCorruptedError):
        consumer(ring)
    assert ring.first == bad_slot


def test_consume_delivers_the_good_prefix_then_raises(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    for i in range(5):
        ring.push(i, b"x")
    write_u32(buf, slot_offset(2) + 8, 200)
    seen = []
    with pytest.raises(RingCorruptedError, match="len=200"):
        ring.consume(lambda a, d, p: seen.append(a))
    assert seen == [0, 1] and ring.first == 2
    write_u32(buf, slot_offset(2) + 8, 1)  # a repaired entry is delivered next
    assert [e.phys_addr for e in ring.drain()] == [2, 3, 4]


def test_reset_recovers(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    set_indices(buf, 1000, 2000)
    with pytest.raises(RingCorruptedError):
        ring.drain()
    ring.reset()
    assert ring.push(1, b"x") and ring.pop().phys_addr == 1


@pytest.mark.parametrize("start", [0, 167])   # 167: the batch wraps round the ring's end
def test_drain_into_stops_at_a_corrupt_entry_and_hands_over_no_copy_of_it(impl, start):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    set_indices(buf, start, start)
    for i in range(4):
        assert ring.push(0x1000 + i, bytes([i + 1]) * 4)
    bad_slot = (start + 2) % ring.max
    write_u32(buf, slot_offset(bad_slot) + 8, 9)             # len = 9
    out = bytearray(b"\xaa" * 24 * 6)
    assert ring.drain_into(out) == 2
    assert [out[24 * i + 16] for i in range(2)] == [1, 2]
    # The corrupt entry and the good one after it were copied, then zeroed:
    # only what was counted reaches the caller; the rest of out is untouched.
    assert out[48:96] == bytes(48) and out[96:] == b"\xaa" * 48
    assert ring.first == bad_slot
    out[:] = b"\xaa" * len(out)
    with pytest.raises(RingCorruptedError, match="len=9") as info:
        ring.drain_into(out)
    assert info.value.index == bad_slot
    assert out[:48] == bytes(48) and out[48:] == b"\xaa" * 96
    assert ring.first == bad_slot
