"""Full-ring consumer figures in one process, with timeit: the README's table.

    python benchmarks/report.py            # table
    python benchmarks/report.py --json     # the same figures as JSON
    python benchmarks/report.py --check    # exit 1 if a target is missed

Same workload and rule as ``benchmarks/test_consumer.py``: each timed call
drains one full one-page ring (``RING_MAX - 1`` entries, 169 on 4 KiB
pages); the ring is refilled by timeit's setup, outside the timing.  Each
method is timed ``--repeat`` times (one call per timing) and the best time
is reported, with the median alongside.  The repeats are spread over
``--blocks`` interleaved passes over all methods, so a slow drift of the
machine (frequency scaling, a noisy neighbour) does not favour one method.
timeit turns the garbage collector off while timing.

Each ratio is given three ways: best/best, median/median, and "blocks", the
median over the blocks of the ratio of the two methods' best times within
a block (timings taken close together).  The met/MISSED verdict uses
"blocks": on a machine whose speed drifts, best/best can pair a lucky
moment of one method with an ordinary one of the other.

Every timed call goes through the same one C-level call
(``functools.partial``), so the call overhead, shown in the "empty call"
row, is in every figure and is not subtracted.

The issue's targets: ``drain_into`` >= 50x faster than the QEMU-style
pure-Python loop; ``drain`` >= 5x faster than it; ``consume`` with an empty
handler <= 1.5x a plain Python loop calling the same handler.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

import kvmcoal

if __package__:
    from . import baselines
    from .reporting import (
        report_parser,
        RATIO_HEAD, emit, environment, headline, is_met, noop, ratio_columns, spread, table,
        time_blocks, timing_figures)
    from .workload import FullRing, empty_handler
else:  # run as a script: python benchmarks/report.py
    import baselines
    from reporting import (
        report_parser,
        RATIO_HEAD, emit, environment, headline, is_met, noop, ratio_columns, spread, table,
        time_blocks, timing_figures)
    from workload import FullRing, empty_handler


def build_methods(fr: FullRing):
    """(key, label, callable, setup, entries) for every measured method.

    Each callable is first run once, untimed, and its result checked, so a
    method that silently does nothing cannot produce a figure.
    """
    cap = fr.capacity
    ring = fr.ring
    out_np = np.zeros(cap, dtype=kvmcoal.ENTRY_DTYPE)
    out_ba = bytearray(cap * kvmcoal.ENTRY_SIZE)
    args = fr.expected_triples[0]

    def check(key, result):
        fr.assert_empty()
        if key == "drain_into_numpy":
            assert result == cap and out_np.tobytes() == fr.expected_records
        elif key == "drain_into_bytearray":
            assert result == cap and bytes(out_ba) == fr.expected_records
        elif key == "drain":
            assert result == fr.expected_entries
        else:
            assert result == cap, (key, result)

    methods = [
        ("drain_into_numpy", "drain_into -> numpy ENTRY_DTYPE",
         functools.partial(ring.drain_into, out_np), fr.refill, cap),
        ("drain_into_bytearray", "drain_into -> bytearray",
         functools.partial(ring.drain_into, out_ba), fr.refill, cap),
        ("drain", "drain -> list[Entry]",
         functools.partial(ring.drain), fr.refill, cap),
        ("consume", "consume(empty handler)",
         functools.partial(ring.consume, empty_handler), fr.refill, cap),
        ("qemu_loop", "QEMU-style Python loop",
         functools.partial(baselines.qemu_style_drain, fr.buf, fr.max, empty_handler),
         fr.refill, cap),
        ("plain_loop", "plain Python loop (handler x N)",
         functools.partial(baselines.plain_handler_loop, empty_handler, cap, args),
         noop, cap),
        ("plain_loop_star", "plain Python loop, handler(*args)",
         functools.partial(baselines.plain_handler_loop_star, empty_handler, cap, args),
         noop, cap),
        ("empty_call", "empty call (timing overhead)",
         functools.partial(noop), noop, None),
    ]
    for key, _label, fn, setup, _n in methods:
        if key == "empty_call":
            continue
        setup()
        check(key, fn())
    # The QEMU loop must deliver exactly what consume delivers.
    fr.refill()
    seen = []
    baselines.qemu_style_drain(fr.buf, fr.max, lambda a, d, p: seen.append((a, d, p)))
    assert seen == fr.expected_triples
    fr.assert_empty()
    return methods


def measure(repeat: int, blocks: int) -> dict:
    fr = FullRing()
    methods = build_methods(fr)
    refills_before = fr.refills
    per_block, times, block_best = time_blocks(methods, repeat, blocks)
    # Each refill after the first checked that the previous call emptied
    # the ring; the last call is checked here.
    fr.assert_empty()
    ring_methods = sum(setup == fr.refill for _key, _label, _fn, setup, _n in methods)
    assert fr.refills - refills_before == ring_methods * per_block * blocks

    results = {key: timing_figures(label, times[key], "entries", n, "ring", "entry")
               for key, label, _fn, _setup, n in methods}

    def ratio(num, den):
        # "blocks": the median over blocks of the ratio of the two methods'
        # best times in that block, i.e. of timings taken close together;
        # the verdict uses it, as it is the least sensitive to the machine
        # changing speed during the run.
        return {
            "best": results[num]["best_us_per_ring"] / results[den]["best_us_per_ring"],
            "median": results[num]["median_us_per_ring"] / results[den]["median_us_per_ring"],
            **spread(block_best[num], block_best[den]),
        }

    ratios = [
        ("QEMU-loop / drain_into (numpy)", ratio("qemu_loop", "drain_into_numpy"), ">=", 50.0),
        ("QEMU-loop / drain_into (bytearray)", ratio("qemu_loop", "drain_into_bytearray"), ">=", 50.0),
        ("QEMU-loop / drain", ratio("qemu_loop", "drain"), ">=", 5.0),
        ("consume / plain-loop", ratio("consume", "plain_loop"), "<=", 1.5),
        # Not a target: the same loop written handler(*args), for reference.
        ("consume / plain-loop(*args)", ratio("consume", "plain_loop_star"), None, None),
    ]
    ratio_list = [{"name": name, **r, "target": None if op is None else f"{op} {target:g}x",
                   "met": is_met(op, target, r["blocks"])} for name, r, op, target in ratios]

    return {
        "meta": {
            **environment(),
            "page_size": kvmcoal.PAGE_SIZE,
            "ring_max": kvmcoal.RING_MAX,
            "entries_per_ring": fr.capacity,
            "repeat": per_block * blocks,
            "blocks": blocks,
            "statistic": ("per method: best (and median) of repeat timings, one full ring "
                          "each; per ratio: best/best, median/median, and the median over "
                          "blocks of the within-block best/best ratio, which the verdict uses"),
            "timer": "timeit.default_timer (time.perf_counter), gc disabled while timing",
        },
        "methods": results,
        "ratios": ratio_list,
    }


def format_table(report: dict) -> str:
    meta = report["meta"]
    lines = [
        headline(meta),
        f"full ring: {meta['entries_per_ring']} entries (PAGE_SIZE {meta['page_size']}, "
        f"RING_MAX {meta['ring_max']}); best of {meta['repeat']} timings "
        f"in {meta['blocks']} interleaved blocks; refill not timed",
        "",
    ]
    lines += table(f"{'method':<34} {'µs/ring':>9} {'ns/entry':>9} {'median µs':>10}",
                   (_method_row(r) for r in report["methods"].values()))
    lines.append("")
    lines += table(f"{'ratio':<34} {'best':>8} {'median':>8} {RATIO_HEAD}",
                   (_ratio_row(r) for r in report["ratios"]))
    lines += [
        "",
        "best: ratio of the best times; median: ratio of the median times;",
        f"blocks: median over the {meta['blocks']} blocks of the ratio of the best times",
        "within a block (the verdict uses it); range: lowest to highest block ratio.",
    ]
    return "\n".join(lines)


def _method_row(r: dict) -> str:
    per_entry = "-" if r["best_ns_per_entry"] is None else f"{r['best_ns_per_entry']:.1f}"
    return (f"{r['label']:<34} {r['best_us_per_ring']:>9.2f} "
            f"{per_entry:>9} {r['median_us_per_ring']:>10.2f}")


def _ratio_row(r: dict) -> str:
    op, target = None, None
    if r["target"] is not None:     # e.g. ">= 50x"
        op, number = r["target"].split()
        target = float(number.rstrip("x"))
    return (f"{r['name']:<34} {r['best']:>7.2f}x {r['median']:>7.2f}x "
            f"{ratio_columns(r, op, target)}")


def main(argv: list[str] | None = None) -> int:
    parser = report_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=10000,
                        help="timings per method, one full ring each (default 10000)")
    parser.add_argument("--blocks", type=int, default=20,
                        help="interleaved passes the repeats are spread over (default 20)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.blocks < 1:
        parser.error("--repeat and --blocks must be positive")

    return emit(measure(args.repeat, min(args.blocks, args.repeat)), args, format_table)


if __name__ == "__main__":
    sys.exit(main())
