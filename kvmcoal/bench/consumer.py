"""The consumer section: draining a ring, kvmcoal against pure-Python and C baselines.

The workload (RefilledRing): a one-page ring (bytearray(PAGE_SIZE))
refilled with a batch of writes of mixed widths (1, 2, 4 and 8 bytes) and a
mix of MMIO and PIO, through Ring.push (the kernel's producer model).  The
batch is either the full ring (RING_MAX - 1 entries, 169 on 4 KiB pages)
or a partial one (BATCHES: 1, 8, 64), because a VMM that drains after
every exit often finds only a few entries, and then the cost per call, not
per entry, decides.  Refilling happens outside the timed region: each timed
call drains exactly one batch.  The ring is never reset between rounds, so
successive rounds start at successive slots and a batch is sometimes split
by the end of the ring.

The methods (consumer_methods), the one place that says for each what one
timed call is, how its result shows that it drained the whole batch, and
how it is checked, once and untimed, to deliver exactly what Ring.consume
delivers (the same (phys_addr, data, pio) values, of the same types, in the
same order): kvmcoal's drain_into (numpy and bytearray), drain, consume
with an empty handler, a pop() loop and iteration; the pure-Python
baselines of baselines.py; the C consumer (c/cconsumer.c, built on first
use, see cbuild.py); and, as the yardstick for consume, the plain Python
loop calling the same empty handler as many times with constant arguments
(baselines.plain_handler_loop), with its handler(*args) form as a
reference.  Every output buffer holds a full ring, as a VMM's would,
whatever the batch.  Without numpy, the numpy outputs are missing; without
gcc, the C consumer is.

measure() times every method on the full ring, then on each batch size, in
interleaved blocks (reporting.time_blocks), and gives the ratios the
targets are judged on.  Every timed call goes through the same one C-level
call (functools.partial), so the call overhead, shown in the "empty call"
row, is in every figure and is not subtracted.

The targets, on the full ring: drain_into at least 50x faster than the
QEMU-style pure-Python loop and at most 2x the time of the C consumer;
drain at least 5x faster than the QEMU-style loop; consume with an empty
handler at most 1.5x the plain loop (handler(a, d, p) x N, constant
arguments).  The ctypes, struct.iter_unpack and rust-vmm-style baselines,
and the handler(*args) loop, are given for reference, without a target.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import kvmcoal

from . import baselines, cbuild
from .reporting import (NUMPY_MISSING, Method, Progress, Ratio, Section, noop, ratio,
                        time_blocks, timing_figures)

# The partial batches, besides the full ring.
BATCHES = (1, 8, 64)

WIDTHS = (1, 2, 4, 8)
MMIO_BASE = 0xFE00_0000
PIO_BASE = 0x3F8
PIO_EVERY = 5                     # every 5th entry is a port write


Triple = tuple[int, bytes, bool]


def empty_handler(a: int, d: bytes, p: bool) -> None:
    """The 3-argument handler that does nothing."""


def make_entries(n: int) -> list[Triple]:
    """*n* (phys_addr, data, pio) writes of widths 1, 2, 4, 8 in turn."""
    entries = []
    for i in range(n):
        width = WIDTHS[i % len(WIDTHS)]
        data = bytes((i + k) & 0xFF for k in range(width))
        pio = i % PIO_EVERY == 0
        addr = PIO_BASE + (i % 8) if pio else MMIO_BASE + 8 * i
        entries.append((addr, data, pio))
    return entries


class RefilledRing:
    """A one-page ring, refilled with *batch* entries per round, and what draining it must give.

    *batch* is the number of entries each refill pushes, the ring's
    capacity (RING_MAX - 1, a full ring) by default.
    """

    def __init__(self, batch: int | None = None, nbytes: int | None = None) -> None:
        self.buf = bytearray(kvmcoal.PAGE_SIZE if nbytes is None else nbytes)
        self.ring = kvmcoal.Ring(self.buf)
        self.max = self.ring.max
        self.capacity = self.ring.capacity
        self.batch = self.capacity if batch is None else batch
        if not 1 <= self.batch <= self.capacity:
            raise ValueError(f"batch={batch} is not 1 to {self.capacity} entries")
        self.is_full = self.batch == self.capacity
        self.entries = make_entries(self.batch)
        # What a drain of one batch must produce, in each output form.
        self.expected_entries = [kvmcoal.Entry(a, d, p) for a, d, p in self.entries]
        self.expected_records = b"".join(
            baselines.ENTRY.pack(a, len(d), int(p), d) for a, d, p in self.entries)
        self.expected_triples = list(self.entries)
        self.refills = 0

    @property
    def title(self) -> str:
        """The group title: full ring (169 entries), or batch of 8."""
        return f"full ring ({self.batch} entries)" if self.is_full else f"batch of {self.batch}"

    def refill(self) -> None:
        """Push one batch; the ring must be empty (fully drained) first.

        Used as pytest-benchmark's setup and as timeit's setup, so it also
        checks, outside the timed region, that the previous timed call
        consumed the whole batch.
        """
        ring = self.ring
        left = len(ring)
        if left:
            raise AssertionError(
                f"the previous timed call left {left} of {self.batch} entries "
                "in the ring: the benchmark did not drain it")
        push = ring.push
        for addr, data, pio in self.entries:
            if not push(addr, data, pio=pio):
                raise AssertionError("push refused a write into a ring being refilled")
        if len(ring) != self.batch:
            raise AssertionError(f"refill left {len(ring)} entries, not {self.batch}")
        self.refills += 1

    def assert_empty(self) -> None:
        left = len(self.ring)
        if left or self.ring.first != self.ring.last:
            raise AssertionError(f"{left} entries left in the ring after a drain of the "
                                 "whole batch")


# ---------------------------------------------------------------------------
# The methods


@functools.cache
def c_consumer() -> ModuleType:
    """c/cconsumer.c built and imported; raises cbuild.CBuildUnavailable where it cannot be."""
    return cbuild.import_extension("cconsumer.c")


def _numpy() -> ModuleType | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def pop_loop(ring: kvmcoal.Ring) -> int:
    """while ring.pop() is not None: one entry per call; returns how many."""
    count = 0
    while ring.pop() is not None:
        count += 1
    return count


def iterate(ring: kvmcoal.Ring) -> int:
    """for entry in ring: the iterator protocol over pop(); returns how many."""
    count = 0
    for _entry in ring:
        count += 1
    return count


def records_to_triples(records: bytes, n: int) -> list[Triple]:
    """The first *n* raw 24-byte records as the (phys_addr, data, pio) consume delivers."""
    return [(addr, data[:length], pio == 1)
            for addr, length, pio, data in baselines.ENTRY.iter_unpack(
                records[:n * baselines.ENTRY_SIZE])]


def recorded(drain: Callable[[Callable[[int, bytes, bool], None]], int]) -> list[Triple]:
    """What drain(handler) hands its handler, in order; its count must agree."""
    seen: list[Triple] = []
    count = drain(lambda a, d, p: seen.append((a, d, p)))
    if count != len(seen):
        raise AssertionError(f"returned {count} but delivered {len(seen)} entries")
    return seen


def typed(triples: list[Triple]) -> list[tuple[object, type]]:
    """*triples* with each value's type: True == 1, but a handler must get a bool."""
    return [(v, type(v)) for t in triples for v in t]


@dataclass(frozen=True)
class ConsumerMethod:
    """One way of draining a batch, and how to check it.

    call() is the timed call; check(result) checks what it returned (the
    count, and the content where the output is kept); deliver() consumes
    one batch, untimed, and returns the (phys_addr, data, pio) values in
    the order it delivered them, which verify() compares with expected.
    uses_ring is False for the plain loops, which take nothing from the
    ring (no refill before them).  missing says why a method cannot run
    here (the C consumer without gcc, a numpy output without numpy); its
    callables are then None.
    """

    key: str
    label: str
    call: Callable[[], Any] | None
    check: Callable[[Any], None] | None
    deliver: Callable[[], list[Triple]] | None
    expected: list[Triple]
    rr: RefilledRing
    uses_ring: bool = True
    missing: str | None = None

    @property
    def setup(self) -> Callable[[], None]:
        """What runs, untimed, before each timed call: a refill, or nothing."""
        return self.rr.refill if self.uses_ring else noop

    def verify(self) -> None:
        """Run once, untimed: the method delivers expected, values, types and order."""
        if self.deliver is None:
            raise RuntimeError(f"{self.key} is missing: {self.missing}")
        if self.uses_ring:
            self.rr.refill()
        got = self.deliver()
        if self.uses_ring:
            self.rr.assert_empty()
        if got != self.expected:
            raise AssertionError(f"{self.key} delivered something else")
        if typed(got) != typed(self.expected):
            raise AssertionError(f"{self.key} delivered other types")


def consume_reference(rr: RefilledRing) -> list[Triple]:
    """What Ring.consume delivers for one batch (untimed), checked against the workload."""
    rr.refill()
    got = recorded(rr.ring.consume)
    rr.assert_empty()
    if got != rr.expected_triples or typed(got) != typed(rr.expected_triples):
        raise AssertionError("Ring.consume did not deliver the workload's entries")
    return got


PLAIN_LOOP_LABEL = "plain Python loop, handler(a, d, p) x N, constant args"
PLAIN_LOOP_STAR_LABEL = "plain Python loop, handler(*args) x N, constant args"


def consumer_methods(rr: RefilledRing) -> list[ConsumerMethod]:
    """Every method over *rr*, in table order; those that cannot run here are marked missing."""
    ring, n, cap = rr.ring, rr.batch, rr.capacity
    reference = consume_reference(rr)
    np = _numpy()
    out_ba = bytearray(cap * kvmcoal.ENTRY_SIZE)
    out_c = bytearray(cap * kvmcoal.ENTRY_SIZE)
    args = rr.expected_triples[0]

    def counted(result: Any) -> None:
        if result != n:
            raise AssertionError(f"drained {result} of {n}")

    def records_kept(out: Any) -> Callable[[Any], None]:
        def check(result: Any) -> None:
            counted(result)
            if memoryview(out).cast("B")[:n * kvmcoal.ENTRY_SIZE] != rr.expected_records:
                raise AssertionError("the records drained are not the batch's")
        return check

    def into(drain_into: Callable[[Any], int], out: Any) -> Callable[[], list[Triple]]:
        def deliver() -> list[Triple]:
            memoryview(out).cast("B")[:] = bytes(cap * kvmcoal.ENTRY_SIZE)  # no stale records
            count = drain_into(out)
            return records_to_triples(memoryview(out).tobytes(), count)
        return deliver

    def entries(entry_list: list[kvmcoal.Entry]) -> list[Triple]:
        return [(e.phys_addr, e.data, e.pio) for e in entry_list]

    def entries_kept(result: Any) -> None:
        if result != rr.expected_entries:
            raise AssertionError("drain returned other entries than the batch's")

    def ring_method(key: str, label: str, fn: Callable[..., Any], *fn_args: Any,
                    check: Callable[[Any], None] = counted,
                    deliver: Callable[[], list[Triple]]) -> ConsumerMethod:
        return ConsumerMethod(key, label, functools.partial(fn, *fn_args), check, deliver,
                              reference, rr)

    def missing(key: str, label: str, why: str) -> ConsumerMethod:
        return ConsumerMethod(key, label, None, None, None, reference, rr, missing=why)

    def baseline(key: str, label: str, drain: Callable[..., int]) -> ConsumerMethod:
        return ring_method(key, label, drain, rr.buf, rr.max, empty_handler,
                           deliver=lambda: recorded(functools.partial(drain, rr.buf, rr.max)))

    def plain(key: str, label: str, loop: Callable[..., int]) -> ConsumerMethod:
        return ConsumerMethod(
            key, label, functools.partial(loop, empty_handler, n, args), counted,
            lambda: recorded(lambda handler: loop(handler, n, args)), [args] * n, rr,
            uses_ring=False)

    numpy_label = "drain_into -> numpy ENTRY_DTYPE"
    if np is None:
        methods = [missing("drain_into_numpy", numpy_label, NUMPY_MISSING)]
    else:
        out_np = np.zeros(cap, dtype=kvmcoal.ENTRY_DTYPE)
        methods = [ring_method("drain_into_numpy", numpy_label, ring.drain_into, out_np,
                               check=records_kept(out_np),
                               deliver=into(ring.drain_into, out_np))]
    methods += [
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
    c_label, c_numpy_label = ("C consumer (cconsumer.c) -> bytearray",
                              "C consumer (cconsumer.c) -> numpy")
    try:
        drain_c = c_consumer().drain
    except cbuild.CBuildUnavailable as exc:
        methods += [missing("c_consumer", c_label, str(exc)),
                    missing("c_consumer_numpy", c_numpy_label, str(exc))]
    else:
        methods.append(ring_method("c_consumer", c_label, drain_c, rr.buf, out_c,
                                   check=records_kept(out_c),
                                   deliver=into(functools.partial(drain_c, rr.buf), out_c)))
        if np is None:
            methods.append(missing("c_consumer_numpy", c_numpy_label, NUMPY_MISSING))
        else:
            out_cn = np.zeros(cap, dtype=kvmcoal.ENTRY_DTYPE)
            methods.append(ring_method(
                "c_consumer_numpy", c_numpy_label, drain_c, rr.buf, out_cn,
                check=records_kept(out_cn),
                deliver=into(functools.partial(drain_c, rr.buf), out_cn)))
    methods += [
        plain("plain_loop", PLAIN_LOOP_LABEL, baselines.plain_handler_loop),
        plain("plain_loop_star", f"{PLAIN_LOOP_STAR_LABEL} (reference)",
              baselines.plain_handler_loop_star),
    ]
    if tuple(m.key for m in methods) != METHOD_KEYS:
        raise AssertionError("consumer_methods() and METHOD_KEYS disagree")
    return methods


# The keys of consumer_methods(), in its order, known without building a ring
# (pytest parametrizes over them at collection time).
METHOD_KEYS = ("drain_into_numpy", "drain_into_bytearray", "drain", "consume", "pop_loop",
               "iteration", "qemu_loop", "ctypes_loop", "iter_unpack", "rust_vmm_loop",
               "c_consumer", "c_consumer_numpy", "plain_loop", "plain_loop_star")


# ---------------------------------------------------------------------------
# The measurement

# The full-ring ratios: name, numerator, denominator, op, target (None: reference only).
RATIOS: list[tuple[str, str, str, str | None, float | None]] = [
    ("QEMU-loop / drain_into (numpy)", "qemu_loop", "drain_into_numpy", ">=", 50.0),
    ("QEMU-loop / drain_into (bytearray)", "qemu_loop", "drain_into_bytearray", ">=", 50.0),
    # Time over time: drain_into may take at most twice as long as the C
    # consumer, each into the same kind of output.
    ("drain_into / C consumer (numpy)", "drain_into_numpy", "c_consumer_numpy", "<=", 2.0),
    ("drain_into / C consumer (bytearray)", "drain_into_bytearray", "c_consumer", "<=", 2.0),
    ("QEMU-loop / drain", "qemu_loop", "drain", ">=", 5.0),
    # The target: against the plain loop of constant arguments, handler(a, d, p).
    ("consume / plain loop", "consume", "plain_loop", "<=", 1.5),
    # The same loop written handler(*args), and the other pure-Python readers.
    ("consume / plain loop, handler(*args)", "consume", "plain_loop_star", None, None),
    ("ctypes loop / drain_into (bytearray)", "ctypes_loop", "drain_into_bytearray", None, None),
    ("iter_unpack / drain_into (bytearray)", "iter_unpack", "drain_into_bytearray", None, None),
    ("rust-vmm loop / drain_into (bytearray)", "rust_vmm_loop", "drain_into_bytearray",
     None, None),
]

EMPTY_CALL = "empty_call"
EMPTY_CALL_LABEL = "empty call (timing overhead)"


def time_batch(rr: RefilledRing, repeat: int, blocks: int, with_empty_call: bool = False,
               ) -> tuple[int, dict[str, list[float]], dict[str, list[float]],
                          list[ConsumerMethod]]:
    """Time every method of *rr* in interleaved blocks (see reporting.time_blocks).

    Each method is first checked, untimed, to deliver what Ring.consume
    delivers; the refills are counted, so every timed call is known to
    have drained its whole batch.  Returns time_blocks' figures and the
    methods, missing ones included.
    """
    methods = consumer_methods(rr)
    present = [m for m in methods if m.missing is None]
    for m in present:
        m.verify()
    timed: list[tuple[Any, ...]] = [(m.key, m.label, m.call, m.setup) for m in present]
    if with_empty_call:
        timed.append((EMPTY_CALL, EMPTY_CALL_LABEL, functools.partial(noop), noop))
    refills_before = rr.refills
    per_block, times, block_best = time_blocks(timed, repeat, blocks)
    # Each refill after the first checked that the previous call emptied
    # the ring; the last call is checked here.
    rr.assert_empty()
    refills = sum(m.uses_ring for m in present) * per_block * blocks
    if rr.refills - refills_before != refills:
        raise AssertionError(f"{rr.refills - refills_before} refills for {refills} timed calls")
    for m in present:         # the last timed call's result was not kept: run once more
        assert m.call is not None and m.check is not None
        m.setup()
        m.check(m.call())
    return per_block, times, block_best, methods


def measure(repeat: int, blocks: int, batches: Sequence[int] = BATCHES,
            progress: Progress | None = None) -> Section:
    """Time every consumer on the full ring, then on each of *batches*; figures and ratios."""
    say = progress or noop
    full = RefilledRing()
    say(f"consumer: full ring of {full.batch} entries")
    per_block, times, block_best, methods = time_batch(full, repeat, blocks,
                                                       with_empty_call=True)
    results: dict[str, Method] = {}
    for m in methods:
        if m.missing is None:
            results[m.key] = timing_figures(m.label, times[m.key], "entries", full.batch,
                                            "ring", "entry")
        else:
            results[m.key] = {"label": m.label, "entries": full.batch, "missing": m.missing}
    results[EMPTY_CALL] = timing_figures(EMPTY_CALL_LABEL, times[EMPTY_CALL], "entries", None,
                                         "ring", "entry")
    pooled = {"best": "best_us_per_ring", "median": "median_us_per_ring"}
    ratios: list[Ratio] = [ratio(name, results, num, den, block_best, op, target, pooled)
                           for name, num, den, op, target in RATIOS]

    # A method missing here has no batch figures: the full-ring rows and the
    # ratios say why.
    batch_figures = []
    for k in (*batches, full.batch):
        if k == full.batch:
            figures = {key: r for key, r in results.items()
                       if key != EMPTY_CALL and not r.get("missing")}
        else:
            say(f"consumer: batches of {k}")
            _per_block, times, _block_best, batch_methods = time_batch(RefilledRing(k), repeat,
                                                                      blocks)
            figures = {m.key: timing_figures(m.label, times[m.key], "entries", k, "ring", "entry")
                       for m in batch_methods if m.missing is None}
        batch_figures += [{"method": key, "label": r["label"], "entries": k,
                           "best_ns_per_entry": r["best_ns_per_entry"],
                           "median_ns_per_entry": r["median_ns_per_entry"]}
                          for key, r in figures.items()]

    empty_ns = results[EMPTY_CALL]["best_us_per_ring"] * 1e3
    return {
        "caption": [
            f"full ring: {full.batch} entries (PAGE_SIZE {kvmcoal.PAGE_SIZE}, RING_MAX "
            f"{kvmcoal.RING_MAX}); best of {per_block * blocks} timings in {blocks} "
            "interleaved blocks; refill not timed;",
            f"every figure includes the {empty_ns:.0f} ns of the empty call; the plain loop "
            "calls handler(a, d, p) N times with constant arguments",
        ],
        "meta": {
            "page_size": kvmcoal.PAGE_SIZE,
            "ring_max": kvmcoal.RING_MAX,
            "entries_per_ring": full.batch,
            "batches": [*batches, full.batch],
            "repeat": per_block * blocks,
            "blocks": blocks,
            "statistic": ("per method: best (and median) of repeat timings, one batch "
                          "each; per ratio: best/best, median/median, and the median over "
                          "blocks of the within-block best/best ratio, which the verdict uses"),
            "timer": "timeit.default_timer (time.perf_counter), gc disabled while timing",
        },
        "methods": results,
        "batches": batch_figures,
        "ratios": ratios,
    }
