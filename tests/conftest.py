"""Shared fixtures: every core test runs against the C ring and its pure-Python twin."""

from __future__ import annotations

import types

import pytest

from kvmcoal import _ring, _ring_py

IMPLEMENTATIONS = {"c": _ring, "py": _ring_py}


@pytest.fixture(params=sorted(IMPLEMENTATIONS), ids=lambda name: name)
def impl(request: pytest.FixtureRequest) -> types.ModuleType:
    """The ring implementation under test: kvmcoal._ring or kvmcoal._ring_py."""
    return IMPLEMENTATIONS[request.param]


def write_u32(buf: bytearray, offset: int, value: int) -> None:
    buf[offset:offset + 4] = value.to_bytes(4, "little")


def set_indices(buf: bytearray, first: int, last: int) -> None:
    """Write the ring header directly, as the kernel or a peer would."""
    write_u32(buf, 0, first)
    write_u32(buf, 4, last)
