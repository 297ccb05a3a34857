"""Zone: validation and the kernel's in-range rule."""

from __future__ import annotations

import pickle

import pytest

from kvmcoal import Zone


def test_fields_and_identity():
    z = Zone(0xFE000000, 0x1000, pio=False)
    assert (z.addr, z.size, z.pio, z.end) == (0xFE000000, 0x1000, False, 0xFE001000)
    assert z == Zone(0xFE000000, 0x1000) and z != Zone(0xFE000000, 0x1000, pio=True)
    assert len({z, Zone(0xFE000000, 0x1000)}) == 1
    assert repr(Zone(0x70, 2, pio=True)) == "Zone(0x70, 0x2, pio=True)"
    assert pickle.loads(pickle.dumps(z)) == z
    with pytest.raises(AttributeError):
        z.addr = 0  # type: ignore[misc]


@pytest.mark.parametrize("addr,size,exc,match", [
    (-1, 1, ValueError, "u64"), (1 << 64, 1, ValueError, "u64"), (0, -1, ValueError, "u32"),
    (0, 1 << 32, ValueError, "u32"), ("0", 1, TypeError, "addr"), (0, 1.0, TypeError, "size"),
    (True, 1, TypeError, "addr"),
])
def test_validation(addr, size, exc, match):
    with pytest.raises(exc, match=match):
        Zone(addr, size)


@pytest.mark.parametrize("addr,length,inside", [
    (0x1000, 8, True), (0x1ff8, 8, True), (0x1ff9, 8, False), (0xfff, 1, False),
    (0x1000, 0x1000, True), (0x1000, 0x1001, False), (0x2000, 0, True), (0x1000, -1, False),
])
def test_contains(addr, length, inside):
    assert Zone(0x1000, 0x1000).contains(addr, length) is inside


def test_contains_at_the_top_of_the_address_space():
    top = Zone((1 << 64) - 0x10, 0x10)   # its end wraps to 0, as in the kernel
    assert top.end == 0
    assert not top.contains((1 << 64) - 8, 4)
    assert not Zone(0, 0x100).contains((1 << 64) - 4, 8)   # the access overflows
    assert Zone((1 << 64) - 0x20, 0x10).contains((1 << 64) - 0x18, 8)
