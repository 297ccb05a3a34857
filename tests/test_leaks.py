"""Create/use/close cycles leave memory and file descriptors flat.

The CI run is short; the long run (a million cycles of each) is
``KVMCOAL_LEAK_CYCLES=1000000 python -m pytest tests/test_leaks.py``.
"""

from __future__ import annotations

import gc
import os

import pytest

from kvmcoal import CoalescedBuffer, EmulatedVm, Ring, Zone

CYCLES = int(os.environ.get("KVMCOAL_LEAK_CYCLES", "20000"))
PAGE = os.sysconf("SC_PAGE_SIZE")
# Under AddressSanitizer freed memory sits in its quarantine, so RSS grows
# without a leak; the fd counts still tell.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
RSS_LIMIT = 4 * 1024 * 1024


def usage() -> tuple[int, int]:
    gc.collect()
    with open("/proc/self/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    return rss_pages * PAGE, len(os.listdir("/proc/self/fd"))


def flat(cycle, n: int) -> tuple[int, int]:
    for _ in range(max(200, n // 20)):   # warm up allocators and caches
        cycle()
    rss0, fds0 = usage()
    for _ in range(n):
        cycle()
    rss1, fds1 = usage()
    return rss1 - rss0, fds1 - fds0


def ring_cycle():
    ring = Ring(bytearray(4096))
    for i in range(8):
        ring.push(i, b"\x01\x02")
    ring.drain()
    ring.consume(lambda a, d, p: None)
    ring.release()


def buffer_cycle():
    with CoalescedBuffer() as buf:
        buf.ring.push(1, b"x")
        buf.wait(0)
        buf.ring.drain()


def vm_cycle():
    with EmulatedVm() as vm:
        buf = vm.create_coalesced_buffer()
        vm.register_coalesced_mmio2(Zone(0x1000, 8), buf)
        vm.write(0x1000, b"x")
        buf.ring.drain()


@pytest.mark.parametrize("cycle,n", [(ring_cycle, CYCLES), (buffer_cycle, CYCLES // 10),
                                     (vm_cycle, CYCLES // 20)],
                         ids=["ring", "buffer", "emulated-vm"])
def test_cycles_leave_memory_and_fds_flat(cycle, n):
    grown, fds = flat(cycle, n)
    assert fds == 0
    assert UNDER_ASAN or grown < RSS_LIMIT, f"RSS grew by {grown} bytes over {n} cycles"


def test_drains_leave_memory_flat():
    ring = Ring(bytearray(4096))
    out = bytearray(24 * 170)

    def cycle():
        for i in range(169):
            ring.push(i, b"abcd")
        ring.drain_into(out)

    grown, fds = flat(cycle, CYCLES)
    assert fds == 0
    assert UNDER_ASAN or grown < RSS_LIMIT, f"RSS grew by {grown} bytes over {CYCLES} drains"
