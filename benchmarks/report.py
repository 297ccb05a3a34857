"""Consumer figures in one process, with timeit: the tables in docs/BENCHMARKS.md.

    python benchmarks/report.py                       # tables
    python benchmarks/report.py --json                # the same figures as JSON
    python benchmarks/report.py --check               # exit 1 if a target is missed
    python benchmarks/report.py --repeat 500 --blocks 5   # a quick look

Same workload, methods and checks as ``benchmarks/test_consumer.py`` (see
``consumers.py``): each timed call drains one batch from a one-page ring,
refilled by timeit's setup, outside the timing.  First the full ring
(``RING_MAX - 1`` entries, 169 on 4 KiB pages), every method and the
ratios the targets are judged on; then partial batches (1, 8 and 64
entries), where the fixed cost of a call weighs more, as ns per entry.
Each method is timed ``--repeat`` times per batch size (one call per
timing) and the best time is reported, with the median alongside.  The
repeats are spread over ``--blocks`` interleaved passes over all methods,
so a slow drift of the machine (frequency scaling, a noisy neighbour) does
not favour one method.  timeit turns the garbage collector off while
timing.

Each ratio is given three ways: best/best, median/median, and "blocks", the
median over the blocks of the ratio of the two methods' best times within
a block (timings taken close together).  The met/MISSED verdict uses
"blocks": on a machine whose speed drifts, best/best can pair a lucky
moment of one method with an ordinary one of the other.

Every timed call goes through the same one C-level call
(``functools.partial``), so the call overhead, shown in the "empty call"
row, is in every figure and is not subtracted.

The issue's targets, on the full ring: ``drain_into`` >= 50x faster than the
QEMU-style pure-Python loop and at most 2x the time of the C consumer
(``cconsumer.c``: one acquire load, one or two memcpy, one release store);
``drain`` >= 5x faster than the QEMU-style loop; ``consume`` with an empty
handler <= 1.5x a plain Python loop calling the same handler.  The ctypes,
``struct.iter_unpack`` and rust-vmm-style baselines are given against
``drain_into`` for reference, without a target.  Where the C consumer
cannot be built (no gcc or no headers), it and its ratios are reported as
missing.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

import kvmcoal

if __package__:
    from .consumers import ConsumerMethod, consumer_methods
    from .reporting import (
        report_parser,
        RATIO_HEAD, emit, environment, headline, is_met, noop, ratio_columns, spread, table,
        time_blocks, timing_figures)
    from .workload import BATCHES, RefilledRing
else:  # run as a script: python benchmarks/report.py
    from consumers import ConsumerMethod, consumer_methods
    from reporting import (
        report_parser,
        RATIO_HEAD, emit, environment, headline, is_met, noop, ratio_columns, spread, table,
        time_blocks, timing_figures)
    from workload import BATCHES, RefilledRing

# The full-ring ratios: name, numerator, denominator, op, target (None: reference only).
RATIOS = [
    ("QEMU-loop / drain_into (numpy)", "qemu_loop", "drain_into_numpy", ">=", 50.0),
    ("QEMU-loop / drain_into (bytearray)", "qemu_loop", "drain_into_bytearray", ">=", 50.0),
    # Time over time: drain_into may take at most twice as long as the C
    # consumer, each into the same kind of output.
    ("drain_into / C consumer (numpy)", "drain_into_numpy", "c_consumer_numpy", "<=", 2.0),
    ("drain_into / C consumer (bytearray)", "drain_into_bytearray", "c_consumer", "<=", 2.0),
    ("QEMU-loop / drain", "qemu_loop", "drain", ">=", 5.0),
    ("consume / plain-loop", "consume", "plain_loop", "<=", 1.5),
    # The same loop written handler(*args), and the other pure-Python readers.
    ("consume / plain-loop(*args)", "consume", "plain_loop_star", None, None),
    ("ctypes loop / drain_into (bytearray)", "ctypes_loop", "drain_into_bytearray", None, None),
    ("iter_unpack / drain_into (bytearray)", "iter_unpack", "drain_into_bytearray", None, None),
    ("rust-vmm loop / drain_into (bytearray)", "rust_vmm_loop", "drain_into_bytearray",
     None, None),
]

EMPTY_CALL = "empty_call"


def time_batch(rr: RefilledRing, repeat: int, blocks: int,
               with_empty_call: bool = False) -> tuple[int, dict, dict, list[ConsumerMethod]]:
    """Time every method of *rr* in interleaved blocks (see ``reporting.time_blocks``).

    Each method is first checked, untimed, to deliver what ``Ring.consume``
    delivers; the refills are counted, so every timed call is known to
    have drained its whole batch.  Returns time_blocks' figures and the
    methods, missing ones included.
    """
    methods = consumer_methods(rr)
    present = [m for m in methods if m.missing is None]
    for m in present:
        m.verify()
    timed = [(m.key, m.label, m.call, m.setup, rr.batch) for m in present]
    if with_empty_call:
        timed.append((EMPTY_CALL, "empty call (timing overhead)", functools.partial(noop),
                      noop, None))
    refills_before = rr.refills
    per_block, times, block_best = time_blocks(timed, repeat, blocks)
    # Each refill after the first checked that the previous call emptied
    # the ring; the last call is checked here.
    rr.assert_empty()
    assert rr.refills - refills_before == sum(m.uses_ring for m in present) * per_block * blocks
    for m in present:         # the last timed call's result was not kept: run once more
        m.setup()
        m.check(m.call())
    return per_block, times, block_best, methods


def measure(repeat: int, blocks: int, batches: Sequence[int] = BATCHES,
            progress: Callable[[str], None] | None = None) -> dict:
    """Time every consumer on the full ring, then on each of *batches*; figures and ratios.

    *progress*, if given, is called with a short message before each stage.
    """
    say = progress or (lambda message: None)
    full = RefilledRing()
    say(f"consumer: full ring of {full.batch} entries")
    per_block, times, block_best, methods = time_batch(full, repeat, blocks,
                                                       with_empty_call=True)
    results = {}
    for m in methods:
        if m.missing is None:
            results[m.key] = timing_figures(m.label, times[m.key], "entries", full.batch,
                                            "ring", "entry")
        else:
            results[m.key] = {"label": m.label, "entries": full.batch, "missing": m.missing}
    results[EMPTY_CALL] = timing_figures("empty call (timing overhead)", times[EMPTY_CALL],
                                         "entries", None, "ring", "entry")

    ratios = [_ratio(name, results[num], results[den], block_best.get(num),
                     block_best.get(den), op, target)
              for name, num, den, op, target in RATIOS]

    # A method missing here (the C consumer without gcc) has no batch figures:
    # the full-ring table and the ratios say why.
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

    missing = next((m.missing for m in methods if m.missing), None)
    return {
        "meta": {
            **environment(),
            "page_size": kvmcoal.PAGE_SIZE,
            "ring_max": kvmcoal.RING_MAX,
            "entries_per_ring": full.batch,
            "batches": [*batches, full.batch],
            "repeat": per_block * blocks,
            "blocks": blocks,
            "c_consumer_missing": missing,
            "statistic": ("per method: best (and median) of repeat timings, one batch "
                          "each; per ratio: best/best, median/median, and the median over "
                          "blocks of the within-block best/best ratio, which the verdict uses"),
            "timer": "timeit.default_timer (time.perf_counter), gc disabled while timing",
        },
        "methods": results,
        "batches": batch_figures,
        "ratios": ratios,
    }


def _ratio(name: str, num: dict, den: dict, num_blocks: list[float] | None,
           den_blocks: list[float] | None, op: str | None, target: float | None) -> dict:
    """One ratio, the shape every report's ratios have; a missing method leaves it empty."""
    missing = num.get("missing") or den.get("missing")
    if missing:
        return {"name": name, "op": op, "target": target, "blocks": None,
                "blocks_min": None, "blocks_max": None, "met": None,
                "best": None, "median": None, "missing": missing}
    # "blocks": the median over blocks of the ratio of the two methods' best
    # times in that block, i.e. of timings taken close together; the verdict
    # uses it, as it is the least sensitive to the machine changing speed.
    r = {"name": name, "op": op, "target": target, **spread(num_blocks, den_blocks)}
    r["met"] = is_met(op, target, r["blocks"])
    r["best"] = num["best_us_per_ring"] / den["best_us_per_ring"]
    r["median"] = num["median_us_per_ring"] / den["median_us_per_ring"]
    return r


def format_table(report: dict) -> str:
    meta = report["meta"]
    lines = [
        headline(meta),
        f"full ring: {meta['entries_per_ring']} entries (PAGE_SIZE {meta['page_size']}, "
        f"RING_MAX {meta['ring_max']}); best of {meta['repeat']} timings "
        f"in {meta['blocks']} interleaved blocks; refill not timed",
        "",
    ]
    lines += table(f"{'method':<38} {'µs/ring':>9} {'ns/entry':>9} {'median µs':>10}",
                   (_method_row(r) for r in report["methods"].values()))

    sizes = meta["batches"]
    empty_ns = report["methods"][EMPTY_CALL]["best_us_per_ring"] * 1e3
    lines += ["",
              (f"ns/entry by entries per call (best of {meta['repeat']} timings each; "
               f"{sizes[-1]} = the full ring above);"),
              f"each includes the {empty_ns:.0f} ns of the empty call, most of a batch of 1"]
    lines += table(f"{'method':<38}" + "".join(f" {k:>8}" for k in sizes),
                   _batch_rows(report["batches"], sizes))
    lines.append("")
    lines += table(f"{'ratio':<38} {'best':>8} {'median':>8} {RATIO_HEAD}",
                   (_ratio_row(r) for r in report["ratios"]))
    lines += [
        "",
        "best: ratio of the best times; median: ratio of the median times;",
        f"blocks: median over the {meta['blocks']} blocks of the ratio of the best times",
        "within a block (the verdict uses it); range: lowest to highest block ratio.",
    ]
    if meta["c_consumer_missing"]:
        lines.append(f"C consumer missing: {meta['c_consumer_missing']}")
    return "\n".join(lines)


def _batch_rows(batches: list[dict], sizes: list[int]) -> list[str]:
    """One row per method: its best ns/entry at each batch size ("-" where not measured)."""
    by_method: dict[str, dict[int, dict]] = {}
    for b in batches:
        by_method.setdefault(b["method"], {})[b["entries"]] = b
    rows = []
    for figures in by_method.values():
        label = next(iter(figures.values()))["label"]
        cells = (_ns(figures[k]["best_ns_per_entry"] if k in figures else None) for k in sizes)
        rows.append(f"{label:<38}" + "".join(f" {cell:>8}" for cell in cells))
    return rows


def _ns(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _method_row(r: dict) -> str:
    if r.get("missing"):
        return f"{r['label']:<38} missing (see below)"
    return (f"{r['label']:<38} {r['best_us_per_ring']:>9.2f} "
            f"{_ns(r['best_ns_per_entry']):>9} {r['median_us_per_ring']:>10.2f}")


def _ratio_row(r: dict) -> str:
    if r.get("missing"):
        return f"{r['name']:<38} C baseline missing: not measured"
    return (f"{r['name']:<38} {r['best']:>7.2f}x {r['median']:>7.2f}x "
            f"{ratio_columns(r, r['op'], r['target'])}")


def main(argv: list[str] | None = None) -> int:
    parser = report_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=10000,
                        help="timings per method and batch size, one batch each (default 10000)")
    parser.add_argument("--blocks", type=int, default=20,
                        help="interleaved passes the repeats are spread over (default 20)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.blocks < 1:
        parser.error("--repeat and --blocks must be positive")

    return emit(measure(args.repeat, min(args.blocks, args.repeat)), args, format_table)


if __name__ == "__main__":
    sys.exit(main())
