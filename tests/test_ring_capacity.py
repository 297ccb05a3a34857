"""Full-ring behaviour of the producer, from every start index (kernel rules)."""

from __future__ import annotations

import pytest

from .conftest import set_indices

PAGE_SIZES = {"4k": 4096, "16k": 16384, "64k": 65536}


def fill_from(ring, buf, start: int) -> int:
    """Fill an empty ring whose indices both sit at start; return how many fit."""
    set_indices(buf, start, start)
    pushed = 0
    while ring.push(pushed, b"\x01"):
        pushed += 1
        assert pushed < ring.max, "the producer overfilled the ring"
    return pushed


@pytest.mark.parametrize("page", PAGE_SIZES.values(), ids=PAGE_SIZES.keys())
def test_capacity_is_max_minus_one_from_every_start(impl, page):
    buf = bytearray(page)
    ring = impl.Ring(buf)
    for start in range(ring.max):
        assert fill_from(ring, buf, start) == ring.capacity, f"start={start}"
        assert len(ring) == ring.capacity
        assert ring.last == (start + ring.capacity) % ring.max


@pytest.mark.parametrize("page,expected", [(4096, 85), (16384, 3), (65536, 255)],
                         ids=PAGE_SIZES.keys())
def test_legacy_full_check_reproduces_the_pre_612_bug(impl, page, expected):
    buf = bytearray(page)
    assert fill_from(impl.Ring(buf, legacy_full_check=True), buf, 0) == expected
    assert fill_from(impl.Ring(buf), buf, 0) == impl.ring_max(page) - 1


def test_legacy_full_check_matches_the_old_formula_from_every_start(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf, legacy_full_check=True)
    for start in range(ring.max):
        # has_room was (first - last - 1) % MAX != 0 in u32 arithmetic.
        expected = next(n for n in range(ring.max)
                        if ((start - (start + n) % ring.max - 1) & 0xFFFFFFFF) % ring.max == 0)
        assert fill_from(ring, buf, start) == expected


def test_full_ring_refuses_and_keeps_everything(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    assert fill_from(ring, buf, 100) == 169
    before = bytes(buf)
    assert not ring.push(0xdead, b"\xff")
    assert bytes(buf) == before  # a refused write touches nothing
    assert [e.phys_addr for e in ring.drain()] == list(range(169))
    assert ring.push(0xdead, b"\xff")


@pytest.mark.parametrize("last", [170, 171, 4096, 0xFFFFFFFF])
def test_last_out_of_range_makes_push_refuse(impl, last):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    set_indices(buf, 0, last)
    before = bytes(buf)
    assert ring.push(1, b"x") is False
    assert bytes(buf) == before


def test_corrupt_first_is_only_compared_by_the_producer(impl):
    buf = bytearray(4096)
    ring = impl.Ring(buf)
    set_indices(buf, 0xFFFFFFFF, 5)
    assert ring.push(1, b"x")  # the kernel never indexes with first
    assert ring.last == 6


def test_tiny_rings(impl):
    # One slot always stays empty: a one-slot ring (32 bytes) could hold no entry.
    with pytest.raises(ValueError, match="56-byte minimum"):
        impl.Ring(bytearray(32))
    with pytest.raises(ValueError, match="56-byte minimum"):
        impl.ring_max(32)
    two_slots = impl.Ring(bytearray(56))
    assert two_slots.push(0, b"x") and not two_slots.push(1, b"y")
    assert two_slots.pop().phys_addr == 0
    assert two_slots.push(1, b"y") and two_slots.pop().phys_addr == 1
