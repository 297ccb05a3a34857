"""Property test: the C ring and its pure-Python twin agree on every sequence.

Both rings live in their own buffer with identical contents; every rule runs
on both and must give the same result (or the same exception) and leave the
two buffers byte-for-byte equal.  Corruption rules scribble on both buffers as
a hostile peer would.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmcoal import RingCorruptedError, _ring, _ring_py

from .conftest import set_indices

PAGE_SIZES = (4096, 16384, 65536)


class HandlerError(Exception):
    pass


def outcome(call):
    """A comparable summary of a call: its result or its exception."""
    try:
        result = call()
    except RingCorruptedError as exc:
        return ("corrupt", exc.field, exc.value, exc.index)
    except HandlerError as exc:
        return ("handler-raised", exc.args)
    if isinstance(result, list):
        return [(e.phys_addr, e.len, e.pio, e.data, e.value) for e in result]
    if result is not None and hasattr(result, "phys_addr"):
        return (result.phys_addr, result.len, result.pio, result.data, result.value)
    return result


class RingPair(RuleBasedStateMachine):
    @initialize(page=st.sampled_from(PAGE_SIZES), start=st.integers(0, 65535),
                legacy=st.booleans())
    def setup(self, page, start, legacy):
        self.bufs = [bytearray(page), bytearray(page)]
        start %= _ring.ring_max(page)
        for buf in self.bufs:
            set_indices(buf, start, start)
        self.rings = [_ring.Ring(self.bufs[0], legacy_full_check=legacy),
                      _ring_py.Ring(self.bufs[1], legacy_full_check=legacy)]

    def both(self, action):
        results = [outcome(lambda r=ring: action(r)) for ring in self.rings]
        assert results[0] == results[1]
        return results[0]

    @rule(addr=st.integers(0, 2**64 - 1), data=st.binary(min_size=1, max_size=8),
          pio=st.booleans(), times=st.integers(1, 300))
    def push(self, addr, data, pio, times):
        for i in range(times):
            if not self.both(lambda r: r.push((addr + i) % 2**64, data, pio=pio)):
                break

    @rule(records=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(1, 8),
                                     st.integers(0, 1), st.binary(min_size=8, max_size=8)),
                           max_size=300),
          bad_at=st.none() | st.integers(0, 299), bad_len=st.sampled_from([0, 9, 2**32 - 1]))
    def push_many(self, records, bad_at, bad_len):
        if bad_at is not None and bad_at < len(records):
            addr, _len, pio, data = records[bad_at]
            records[bad_at] = (addr, bad_len, pio, data)
        raw = b"".join(struct.pack("<QII8s", *r) for r in records)

        def push_many(ring):
            try:
                return ring.push_many(raw)
            except ValueError as exc:     # a bad record: both refuse the whole batch
                return ("bad-input", str(exc))

        self.both(push_many)

    @rule()
    def pop(self):
        self.both(lambda r: r.pop())

    @rule(limit=st.none() | st.integers(0, 3000))
    def drain(self, limit):
        self.both(lambda r: r.drain(limit))

    @rule(records=st.integers(0, 3000))
    def drain_into(self, records):
        outs = []

        def call(ring):
            out = bytearray(24 * records + 5)
            outs.append(out)
            return ring.drain_into(out)

        self.both(call)
        assert outs[0] == outs[1]

    @rule(limit=st.none() | st.integers(0, 3000), raise_at=st.none() | st.integers(0, 50))
    def consume(self, limit, raise_at):
        seen = [[], []]

        def call(ring, which):
            def handler(addr, data, pio):
                seen[which].append((addr, data, pio))
                if len(seen[which]) - 1 == raise_at:
                    raise HandlerError(addr)
            return ring.consume(handler, limit)

        results = [outcome(lambda: call(self.rings[0], 0)), outcome(lambda: call(self.rings[1], 1))]
        assert results[0] == results[1]
        assert seen[0] == seen[1]

    @rule(field=st.sampled_from(["first", "last"]), value=st.integers(0, 2**32 - 1))
    def corrupt_index(self, field, value):
        for buf in self.bufs:
            struct.pack_into("<I", buf, 0 if field == "first" else 4, value)

    @rule(slot=st.integers(0, 2729), offset=st.sampled_from([0, 8, 12, 16, 20]),
          value=st.integers(0, 2**32 - 1) | st.integers(0, 9))
    def corrupt_entry(self, slot, offset, value):
        slot %= self.rings[0].max
        for buf in self.bufs:
            struct.pack_into("<I", buf, 8 + 24 * slot + offset, value)

    @rule()
    def reset(self):
        self.both(lambda r: r.reset())

    @invariant()
    def same_memory_and_view(self):
        if hasattr(self, "rings"):
            assert self.bufs[0] == self.bufs[1]
            self.both(len)
            self.both(lambda r: (r.first, r.last, r.max, r.capacity))

    def teardown(self):
        if hasattr(self, "rings"):
            for ring in self.rings:
                ring.release()


RingPair.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
test_c_ring_matches_python_twin = RingPair.TestCase
