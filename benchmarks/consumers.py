"""Every consumer the benchmarks time, over one :class:`~workload.RefilledRing`.

``test_consumer.py`` and ``report.py`` time the same calls and must check
them the same way, so this is the one place that says, for each method,
what one timed call is, how its result shows that it drained the whole
batch, and how it is checked, once and untimed, to deliver exactly what
``Ring.consume`` delivers: the same ``(phys_addr, data, pio)`` values, of
the same types, in the same order.

The methods: kvmcoal's ``drain_into`` (numpy and bytearray), ``drain``,
``consume`` with an empty handler, a ``pop()`` loop and iteration; the
pure-Python baselines of ``baselines.py``; the C consumer
(``cconsumer.c``, built on first use, see ``cbuild.py``); and, as the
yardstick for ``consume``, plain Python loops calling the same empty
handler as many times.  Every output buffer holds a full ring, as a VMM's
would, whatever the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import kvmcoal

if __package__:
    from . import baselines, cbuild
    from .reporting import noop
    from .workload import RefilledRing, empty_handler
else:  # imported by a script run as python benchmarks/report.py
    import baselines
    import cbuild
    from reporting import noop
    from workload import RefilledRing, empty_handler

C_CONSUMER_SOURCE = Path(__file__).resolve().parent / "cconsumer.c"
C_CONSUMER_FLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]

Triple = tuple[int, bytes, bool]


@functools.cache
def c_consumer() -> ModuleType:
    """``cconsumer.c`` built and imported; raises ``cbuild.CBuildUnavailable`` where it cannot be."""
    return cbuild.import_extension(C_CONSUMER_SOURCE, C_CONSUMER_FLAGS)


def pop_loop(ring: kvmcoal.Ring) -> int:
    """``while ring.pop() is not None``: one entry per call; returns how many."""
    count = 0
    while ring.pop() is not None:
        count += 1
    return count


def iterate(ring: kvmcoal.Ring) -> int:
    """``for entry in ring``: the iterator protocol over ``pop()``; returns how many."""
    count = 0
    for _entry in ring:
        count += 1
    return count


def records_to_triples(records: bytes, n: int) -> list[Triple]:
    """The first *n* raw 24-byte records as the ``(phys_addr, data, pio)`` consume delivers."""
    return [(addr, data[:length], pio == 1)
            for addr, length, pio, data in baselines.ENTRY.iter_unpack(
                records[:n * baselines.ENTRY_SIZE])]


def recorded(drain: Callable[[Callable], Any]) -> list[Triple]:
    """What ``drain(handler)`` hands its handler, in order; its count must agree."""
    seen: list[Triple] = []
    count = drain(lambda a, d, p: seen.append((a, d, p)))
    assert count == len(seen), (count, len(seen))
    return seen


def typed(triples: list) -> list:
    """*triples* with each value's type: ``True == 1``, but a handler must get a bool."""
    return [(v, type(v)) for t in triples for v in t]


@dataclass(frozen=True)
class ConsumerMethod:
    """One way of draining a batch, and how to check it.

    ``call()`` is the timed call; ``check(result)`` checks what it returned
    (the count, and the content where the output is kept); ``deliver()``
    consumes one batch, untimed, and returns the ``(phys_addr, data, pio)``
    values in the order it delivered them, which :meth:`verify` compares
    with ``expected``.  ``uses_ring`` is False for the plain loops, which
    take nothing from the ring (no refill before them).  ``missing`` says
    why a method cannot run here (the C consumer without gcc); its
    callables are then None.
    """

    key: str
    label: str
    call: Callable[[], Any] | None
    check: Callable[[Any], None] | None
    deliver: Callable[[], list] | None
    expected: list
    rr: RefilledRing
    uses_ring: bool = True
    missing: str | None = None

    @property
    def setup(self) -> Callable[[], None]:
        """What runs, untimed, before each timed call: a refill, or nothing."""
        return self.rr.refill if self.uses_ring else noop

    def verify(self) -> None:
        """Run once, untimed: the method delivers ``expected``, values, types and order."""
        assert self.deliver is not None, f"{self.key} is missing: {self.missing}"
        if self.uses_ring:
            self.rr.refill()
        got = self.deliver()
        if self.uses_ring:
            self.rr.assert_empty()
        assert got == self.expected, f"{self.key} delivered something else"
        assert typed(got) == typed(self.expected), f"{self.key} delivered other types"


def consume_reference(rr: RefilledRing) -> list[Triple]:
    """What ``Ring.consume`` delivers for one batch (untimed), checked against the workload."""
    rr.refill()
    got = recorded(rr.ring.consume)
    rr.assert_empty()
    assert got == rr.expected_triples and typed(got) == typed(rr.expected_triples)
    return got


def consumer_methods(rr: RefilledRing) -> list[ConsumerMethod]:
    """Every method over *rr*, in table order; the C consumer is marked missing without gcc."""
    ring, n, cap = rr.ring, rr.batch, rr.capacity
    reference = consume_reference(rr)
    out_np = np.zeros(cap, dtype=kvmcoal.ENTRY_DTYPE)
    out_ba = bytearray(cap * kvmcoal.ENTRY_SIZE)
    out_c = bytearray(cap * kvmcoal.ENTRY_SIZE)
    args = rr.expected_triples[0]

    def counted(result: Any) -> None:
        assert result == n, f"drained {result} of {n}"

    def records_kept(out: Any) -> Callable[[Any], None]:
        def check(result: Any) -> None:
            counted(result)
            assert memoryview(out).cast("B")[:n * kvmcoal.ENTRY_SIZE] == rr.expected_records
        return check

    def into(drain_into: Callable[[Any], int], out: Any) -> Callable[[], list]:
        def deliver() -> list:
            memoryview(out).cast("B")[:] = bytes(cap * kvmcoal.ENTRY_SIZE)  # no stale records
            count = drain_into(out)
            return records_to_triples(memoryview(out).tobytes(), count)
        return deliver

    def entries(entry_list: list) -> list[Triple]:
        return [(e.phys_addr, e.data, e.pio) for e in entry_list]

    def entries_kept(result: Any) -> None:
        assert result == rr.expected_entries

    def ring_method(key: str, label: str, fn: Callable, *fn_args: Any,
                    check: Callable[[Any], None] = counted,
                    deliver: Callable[[], list]) -> ConsumerMethod:
        return ConsumerMethod(key, label, functools.partial(fn, *fn_args), check, deliver,
                              reference, rr)

    def baseline(key: str, label: str, drain: Callable) -> ConsumerMethod:
        return ring_method(key, label, drain, rr.buf, rr.max, empty_handler,
                           deliver=lambda: recorded(functools.partial(drain, rr.buf, rr.max)))

    def plain(key: str, label: str, loop: Callable) -> ConsumerMethod:
        return ConsumerMethod(
            key, label, functools.partial(loop, empty_handler, n, args), counted,
            lambda: recorded(lambda handler: loop(handler, n, args)), [args] * n, rr,
            uses_ring=False)

    methods = [
        ring_method("drain_into_numpy", "drain_into -> numpy ENTRY_DTYPE", ring.drain_into, out_np,
                    check=records_kept(out_np), deliver=into(ring.drain_into, out_np)),
        ring_method("drain_into_bytearray", "drain_into -> bytearray", ring.drain_into, out_ba,
                    check=records_kept(out_ba), deliver=into(ring.drain_into, out_ba)),
        ring_method("drain", "drain -> list[Entry]", ring.drain, check=entries_kept,
                    deliver=lambda: entries(ring.drain())),
        ring_method("consume", "consume(empty handler)", ring.consume, empty_handler,
                    deliver=lambda: recorded(ring.consume)),
        ring_method("pop_loop", "while ring.pop() is not None", pop_loop, ring,
                    deliver=lambda: entries(list(iter(ring.pop, None)))),
        ring_method("iteration", "for entry in ring", iterate, ring,
                    deliver=lambda: entries(list(ring))),
        baseline("qemu_loop", "QEMU-style Python loop", baselines.qemu_style_drain),
        baseline("ctypes_loop", "ctypes Structure loop", baselines.ctypes_drain),
        baseline("iter_unpack", "struct.iter_unpack batch", baselines.iter_unpack_drain),
        baseline("rust_vmm_loop", "rust-vmm-style read_entry loop",
                 baselines.rust_vmm_style_drain),
    ]
    # The C consumer into each of drain_into's two outputs: exporting a numpy
    # array's buffer costs more than a bytearray's, in both.
    c_outputs = [("c_consumer", "C consumer (cconsumer.c) -> bytearray", out_c),
                 ("c_consumer_numpy", "C consumer (cconsumer.c) -> numpy",
                  np.zeros(cap, dtype=kvmcoal.ENTRY_DTYPE))]
    try:
        drain_c = c_consumer().drain
    except cbuild.CBuildUnavailable as exc:
        methods += [ConsumerMethod(key, label, None, None, None, reference, rr, missing=str(exc))
                    for key, label, _out in c_outputs]
    else:
        methods += [ring_method(key, label, drain_c, rr.buf, out, check=records_kept(out),
                                deliver=into(functools.partial(drain_c, rr.buf), out))
                    for key, label, out in c_outputs]
    methods += [
        plain("plain_loop", "plain Python loop (handler x N)", baselines.plain_handler_loop),
        plain("plain_loop_star", "plain Python loop, handler(*args)",
              baselines.plain_handler_loop_star),
    ]
    assert tuple(m.key for m in methods) == METHOD_KEYS
    return methods


# The keys of consumer_methods(), in its order, known without building a ring
# (pytest parametrizes over them at collection time).
METHOD_KEYS = ("drain_into_numpy", "drain_into_bytearray", "drain", "consume", "pop_loop",
               "iteration", "qemu_loop", "ctypes_loop", "iter_unpack", "rust_vmm_loop",
               "c_consumer", "c_consumer_numpy", "plain_loop", "plain_loop_star")
