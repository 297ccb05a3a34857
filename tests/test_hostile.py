"""A peer that scribbles on the ring while the consumer drains: never a crash.

The consumer must only ever return valid entries or raise RingCorruptedError,
and never read or write outside the ring (the ASan build in CI checks the
latter).
"""

from __future__ import annotations

import os
import random
import threading
import time

from kvmcoal import CoalescedBuffer, RingCorruptedError, _ring

DURATION = 1.5


def consume_under_fire(ring, stop):
    """Hammer every consumer call until *stop*; check whatever comes out."""
    out = bytearray(24 * 64)
    calls = corrupt = entries = 0
    while not stop.is_set():
        calls += 1
        try:
            kind = calls % 4
            if kind == 0:
                got = ring.drain(50)
            elif kind == 1:
                entries += ring.drain_into(out)
                got = []
            elif kind == 2:
                handled = []
                ring.consume(lambda a, d, p: handled.append((a, d, p)), 50)
                for _addr, data, pio in handled:   # what a handler sees must be valid too
                    assert 1 <= len(data) <= 8 and isinstance(pio, bool)
                entries += len(handled)
                got = []
            else:
                e = ring.pop()
                got = [] if e is None else [e]
            for e in got:
                assert 1 <= e.len <= 8 and len(e.data) == e.len
            entries += len(got)
        except RingCorruptedError:
            corrupt += 1
            if calls % 16 == 0:
                ring.reset()
    return calls, corrupt, entries


def test_thread_rewriting_the_ring_while_it_drains():
    buf = bytearray(8 + 24 * 40)
    ring = _ring.Ring(buf)
    stop = threading.Event()
    rng = random.Random(1)

    def scribbler():
        view = memoryview(buf)
        while not stop.is_set():
            for _ in range(200):
                offset = rng.randrange(0, len(buf) - 4) & ~3
                choice = rng.random()
                if choice < 0.4:   # plausible indices keep the consumer reading entries
                    value = rng.randrange(0, 45)
                elif choice < 0.7:
                    value = rng.randrange(0, 10)
                else:
                    value = rng.getrandbits(32)
                view[offset:offset + 4] = value.to_bytes(4, "little")
            for _ in range(20):   # and real entries, so the consumer has some to find
                ring.push(rng.getrandbits(64), os.urandom(rng.randrange(1, 9)))
            time.sleep(0)

    t = threading.Thread(target=scribbler)
    t.start()
    timer = threading.Timer(DURATION, stop.set)
    timer.start()
    calls, corrupt, entries = consume_under_fire(ring, stop)
    t.join()
    assert calls > 1000 and corrupt > 0 and entries > 0


def test_process_scribbling_on_a_shared_buffer():
    with CoalescedBuffer(8 + 24 * 40) as buf:
        memfd, _ = buf.fds()
        pid = os.fork()
        if pid == 0:   # the hostile peer: writes straight into the shared memory
            try:
                rng = random.Random(2)
                end = time.monotonic() + DURATION
                while time.monotonic() < end:
                    offset = rng.randrange(0, 8 + 24 * 40 - 4) & ~3
                    value = rng.randrange(0, 50) if rng.random() < 0.6 else rng.getrandbits(32)
                    os.pwrite(memfd, value.to_bytes(4, "little"), offset)
            finally:
                os._exit(0)
        stop = threading.Event()
        watcher = threading.Thread(target=lambda: (os.waitpid(pid, 0), stop.set()))
        watcher.start()
        calls, corrupt, entries = consume_under_fire(buf.ring, stop)
        watcher.join()
        assert calls > 1000 and corrupt > 0
