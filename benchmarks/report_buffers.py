"""Buffer figures: the producer path, wake latency, cross-process and cross-thread throughput.

    python benchmarks/report_buffers.py            # table
    python benchmarks/report_buffers.py --json     # the same figures as JSON
    python benchmarks/report_buffers.py --check    # exit 1 if a target is missed

The workloads are those of ``benchmarks/test_producer.py``,
``benchmarks/test_wakeup.py`` and ``benchmarks/test_transfer.py`` (see
``benchmarks/buffers_workload.py``):

1. Producer: ``EmulatedVm.write`` against ``Ring.push``, each timed call a
   plain loop of 4096 4-byte writes into a zone whose ring is a 1 MiB
   CoalescedBuffer (the same ring for both); the ring is reset by timeit's
   setup, outside the timing, after checking that the call wrote a whole
   batch.  Best and median of ``--repeat`` timings per method, spread over
   ``--blocks`` interleaved passes, as in ``report.py``.
2. Wake latency: paced round trips (the producer sleeps 200 µs before its
   one write, so the consumer is asleep) between two threads and between
   this process and a producer subprocess attached to the buffer by its
   fds; latency = consumer's wait() return - producer's clock read just
   before the write.  One producer serves every mechanism and the
   mechanisms alternate round trip by round trip, so they share the same
   threads, processes and CPU placement.  p50 and p99 over
   ``--round-trips`` round trips per mechanism, in ``--blocks`` blocks.
3. Throughput: ``--records`` 24-byte records from a producer to this
   thread, which sleeps whenever nothing is there; the producer is a
   spawned process or a thread of this process, running the same code.
   Through a CoalescedBuffer ring (``Ring.push`` per record; consumer:
   ``wait()`` and ``drain_into``; one-page and 64 KiB rings) and the peers:
   ``multiprocessing.Queue`` (put and get per record), ``os.pipe`` (169
   records per write; non-blocking ``readinto``, ``select`` when empty),
   faster-fifo (``put_many`` of 169, ``get_many``) and pyzmq PUSH/PULL (a
   message per record, ``ipc://`` between processes, ``inproc://`` between
   threads).  Each transfer is checked, every record in order, and the
   producer must exit 0; producer start-up is not timed.  ``--transfers``
   transfers per method, one per block, methods interleaved.  A peer that
   does not import is reported as missing, with the reason, and so are the
   ratios against it.

Each ratio is given two ways: "pooled" (the statistic over all samples of
one method against the other's) and "blocks" (the median over blocks of the
within-block ratio, i.e. of samples taken close together), which the
met/MISSED verdict uses, as in ``report.py``.

The targets: ``EmulatedVm.write`` within 2x of ``Ring.push``; kvmcoal's wake
p50 at most 1.2x a bare eventfd's (threads, and processes); across
processes, kvmcoal at least 10x the records/s of ``multiprocessing.Queue``
and at least 2x faster-fifo's.  The ratios against ``os.pipe`` and pyzmq,
and all the cross-thread ones, are for reference.

``measure_producer``, ``measure_wakeups``, ``measure_throughput`` and
``measure`` take an optional ``progress`` callback, called with a short
message before each stage (for a progress line).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

if __package__:
    from . import buffers_workload as bw
    from .reporting import (
        report_parser,
        RATIO_HEAD, emit, environment, headline, is_met, noop, ratio_columns, rotated, spread,
        table, time_blocks, timing_figures)
else:  # run as a script: python benchmarks/report_buffers.py
    import buffers_workload as bw
    from reporting import (
        report_parser,
        RATIO_HEAD, emit, environment, headline, is_met, noop, ratio_columns, rotated, spread,
        table, time_blocks, timing_figures)


def measure_producer(repeat: int, blocks: int,
                     progress: Callable[[str], None] | None = None) -> dict:
    (progress or noop)(f"producer: {repeat} timings of {bw.PRODUCER_BATCH} writes per method")
    with bw.ProducerWorkload() as p:
        p.check_each_path()
        methods = [
            ("vm_write", "EmulatedVm.write (zone -> ring)", p.vm_write_batch, p.reset),
            ("ring_push", "Ring.push (same ring)", p.ring_push_batch, p.reset),
            ("ring_push_many", "Ring.push_many (same writes, one call)",
             p.ring_push_many_batch, p.reset),
            ("empty_loop", "the loop alone (reference)", p.empty_loop, noop),
        ]
        resets_before = p.resets
        per_block, times, block_best = time_blocks(methods, repeat, blocks, rotate=True)
        # Each reset after the first checked the call before it; check the last one.
        p.check_contents()
        ring_methods = sum(setup == p.reset for _key, _label, _fn, setup in methods)
        assert p.resets - resets_before == ring_methods * per_block * blocks
        batch = p.batch
        ring_entries = p.ring.capacity

    results = {key: timing_figures(label, times[key], "writes_per_call", batch, "call", "write")
               for key, label, *_ in methods}
    def ratio(name: str, num: str, den: str, op: str | None = None,
              target: float | None = None) -> dict:
        return {
            "name": name,
            "best": results[num]["best_us_per_call"] / results[den]["best_us_per_call"],
            "pooled": results[num]["median_us_per_call"] / results[den]["median_us_per_call"],
            **spread(block_best[num], block_best[den]),
            "op": op, "target": target,
        }

    return {
        "batch": batch, "ring_entries": ring_entries, "repeat": per_block * blocks,
        "blocks": blocks, "methods": results,
        "ratios": [ratio("EmulatedVm.write / Ring.push", "vm_write", "ring_push", "<=", 2.0),
                   ratio("Ring.push_many / Ring.push", "ring_push_many", "ring_push")],
    }


WARMUP_ROUND_TRIPS = 20


def measure_wakeups(round_trips: int, blocks: int,
                    progress: Callable[[str], None] | None = None) -> dict:
    out: dict = {"pace_us": bw.PACE_S * 1e6, "round_trips": 0, "blocks": blocks, "ratios": []}
    per_block = max(1, round_trips // blocks)
    for kind, cls in (("threads", bw.ThreadWakeups), ("processes", bw.ProcessWakeups)):
        (progress or noop)(f"wake latency, {kind}: {round_trips} round trips per mechanism")
        with cls() as h:
            modes = list(h.modes)
            h.run(modes * WARMUP_ROUND_TRIPS)
            h.reset_samples()
            block_p50: dict[str, list[float]] = {m: [] for m in modes}
            block_p99: dict[str, list[float]] = {m: [] for m in modes}
            for b in range(blocks):
                start = {m: len(h.latencies[m]) for m in modes}
                h.run([mode for i in range(per_block) for mode in rotated(modes, b + i)])
                for m in modes:
                    s = sorted(h.latencies[m][start[m]:])
                    block_p50[m].append(bw.percentile(s, 50))
                    block_p99[m].append(bw.percentile(s, 99))
            out[kind] = {m: {"label": h.modes[m], **h.summary(m)} for m in modes}
        out["round_trips"] = per_block * blocks

        def ratio(num, name, stat, per_block_stat, op=None, target=None):
            got = out[kind]
            return {"name": name,
                    "pooled": got[num][f"{stat}_us"] / got["eventfd"][f"{stat}_us"],
                    **spread(per_block_stat[num], per_block_stat["eventfd"]),
                    "op": op, "target": target}

        out["ratios"].append(ratio("kvmcoal", f"wake p50, {kind}: kvmcoal / eventfd", "p50",
                                   block_p50, "<=", 1.2))
        out["ratios"].append(ratio("kvmcoal", f"wake p99, {kind}: kvmcoal / eventfd", "p99",
                                   block_p99))
        if "vm_write" in modes:
            out["ratios"].append(ratio("vm_write", f"wake p50, {kind}: vm.write / eventfd",
                                       "p50", block_p50))
    return out


# What measure_throughput compares: (mode, key) of each transfer, in the order
# of the tables, and the ratios it reports: (mode, numerator, denominator,
# op, target); kvmcoal's one-page ring against each peer, the 64 KiB ring
# against the Queue for reference.
THROUGHPUT_MODES = {"processes": False, "threads": True}
THROUGHPUT_RATIOS = [
    ("processes", "kvmcoal", "queue", ">=", 10.0),
    ("processes", "kvmcoal_64k", "queue", None, None),
    ("processes", "kvmcoal", "faster_fifo", ">=", 2.0),
    ("processes", "kvmcoal", "pipe", None, None),
    ("processes", "kvmcoal", "zmq", None, None),
    ("processes", "kvmcoal_batch", "pipe", None, None),
    ("threads", "kvmcoal", "queue", None, None),
    ("threads", "kvmcoal_64k", "queue", None, None),
    ("threads", "kvmcoal", "faster_fifo", None, None),
    ("threads", "kvmcoal", "pipe", None, None),
    ("threads", "kvmcoal", "zmq", None, None),
    ("threads", "kvmcoal_batch", "pipe", None, None),
]
# How the ratios name the mechanisms.
SHORT_NAMES = {"kvmcoal": "kvmcoal", "kvmcoal_64k": "kvmcoal 64 KiB",
               "kvmcoal_batch": "kvmcoal push_many 64 KiB", "queue": "Queue",
               "pipe": "os.pipe", "faster_fifo": "faster-fifo", "zmq": "pyzmq"}


def measure_throughput(records: int, transfers: int,
                       progress: Callable[[str], None] | None = None) -> dict:
    """Records/s of every mechanism of ``bw.TRANSFERS``, producer in a process and in a thread.

    Each of *transfers* blocks makes one transfer of each mechanism, in a
    rotated order, so that all are measured under the same conditions; a
    peer that does not import is reported with ``missing`` (its reason),
    and so are the ratios against it.
    """
    say = progress or noop
    methods: list[tuple[str, str, bw.Transfer]] = []
    missing: dict[str, str] = {}
    try:
        for mode, thread in THROUGHPUT_MODES.items():
            for key, make in bw.TRANSFERS.items():
                try:
                    methods.append((mode, key, make(records, thread=thread)))
                except bw.PeerMissing as exc:
                    missing[key] = str(exc)
        rates: dict[tuple[str, str], list[float]] = {(m, k): [] for m, k, _ in methods}
        calls: dict[tuple[str, str], list[int]] = {(m, k): [] for m, k, _ in methods}
        for b in range(transfers):
            say(f"throughput: block {b + 1} of {transfers}, {len(methods)} transfers "
                f"of {records} records")
            for mode, key, t in rotated(methods, b):
                t.prepare()
                t0 = time.perf_counter()
                n = t.run()
                elapsed = time.perf_counter() - t0
                t.finish()          # every record, in order, and the producer exited 0
                rates[mode, key].append(n / elapsed)
                calls[mode, key].append(t.batches)
        for mode, key, t in methods:
            assert t.transfers == transfers, (mode, key, t.transfers)
        labels = {(mode, key): t.label for mode, key, t in methods}
    finally:
        for _mode, _key, t in methods:
            t.close()

    out: dict = {"records": records, "record_bytes": bw.RECORD_BYTES, "transfers": transfers,
                 "batch": bw.TRANSFER_BATCH}
    for mode in THROUGHPUT_MODES:
        out[mode] = {}
        for key in bw.TRANSFERS:
            if key in missing:
                out[mode][key] = {"label": SHORT_NAMES[key], "missing": missing[key]}
                continue
            median = statistics.median(rates[mode, key])
            out[mode][key] = {
                "label": labels[mode, key],
                "transfers": len(rates[mode, key]),
                "median_records_per_s": median,
                "best_records_per_s": max(rates[mode, key]),
                "median_ns_per_record": 1e9 / median,
                "median_receive_calls": statistics.median(calls[mode, key]),
            }

    def ratio(mode, num, den, op, target):
        name = f"records/s, {mode}: {SHORT_NAMES[num]} / {SHORT_NAMES[den]}"
        gone = missing.get(num) or missing.get(den)
        if gone:
            return {"name": name, "pooled": None, "blocks": None, "blocks_min": None,
                    "blocks_max": None, "op": op, "target": target, "missing": gone}
        got = out[mode]
        return {"name": name,
                "pooled": got[num]["median_records_per_s"] / got[den]["median_records_per_s"],
                **spread(rates[mode, num], rates[mode, den]),
                "op": op, "target": target}

    out["ratios"] = [ratio(*r) for r in THROUGHPUT_RATIOS]
    return out


def measure(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> dict:
    producer = measure_producer(args.repeat, min(args.blocks, args.repeat), progress)
    wakeups = measure_wakeups(args.round_trips, min(args.blocks, args.round_trips), progress)
    throughput = measure_throughput(args.records, args.transfers, progress)
    # A ratio against a missing peer has no verdict.
    ratios = [{**r, "met": None if "missing" in r else is_met(r["op"], r["target"], r["blocks"])}
              for r in producer["ratios"] + wakeups["ratios"] + throughput["ratios"]]
    for section in (producer, wakeups, throughput):
        del section["ratios"]
    return {
        "meta": {
            **environment(kernel=platform.release(), cpus=len(os.sched_getaffinity(0))),
            "statistic": ("per ratio: pooled (the statistic over all samples) and blocks "
                          "(median over blocks of the within-block ratio), which the "
                          "verdict uses"),
        },
        "producer": producer,
        "wakeups": wakeups,
        "throughput": throughput,
        "ratios": ratios,
    }


def format_table(report: dict) -> str:
    meta, prod, wake, thr = (report["meta"], report["producer"], report["wakeups"],
                             report["throughput"])
    lines = [
        f"{headline(meta)}, {meta['cpus']} CPUs, Linux {meta['kernel']}",
        "",
        f"1. producer: {prod['batch']} 4-byte writes per timed call into one "
        f"{prod['ring_entries']}-entry ring; reset not timed;",
        f"   best of {prod['repeat']} timings in {prod['blocks']} interleaved blocks",
        *table(f"{'method':<40} {'µs/call':>9} {'ns/write':>9} {'median ns':>10}", (
            f"{r['label']:<40} {r['best_us_per_call']:>9.1f} "
            f"{r['best_ns_per_write']:>9.1f} {r['median_ns_per_write']:>10.1f}"
            for r in prod["methods"].values())),
    ]

    width = max(len(f"{kind}: {r['label']}") for kind in ("threads", "processes")
                for r in wake[kind].values())
    lines += [
        "",
        f"2. wake latency: one write, consumer asleep (producer sleeps {wake['pace_us']:.0f} µs "
        f"first); {wake['round_trips']} round trips",
        f"   per mechanism in {wake['blocks']} blocks, mechanisms alternating",
        *table(f"{'mechanism':<{width}} {'p50 µs':>7} {'p99 µs':>7} {'min µs':>7} "
               f"{'lead µs':>8}", (
            f"{kind + ': ' + r['label']:<{width}} {r['p50_us']:>7.1f} "
            f"{r['p99_us']:>7.1f} {r['min_us']:>7.1f} {r['min_lead_us']:>8.0f}"
            for kind in ("threads", "processes") for r in wake[kind].values())),
    ]

    rows = [(f"{mode}: {r['label']}", r) for mode in THROUGHPUT_MODES for r in thr[mode].values()]
    width = max(len(name) for name, _ in rows)
    lines += [
        "",
        f"3. throughput: {thr['records']} {thr['record_bytes']}-byte records from a producer "
        f"(spawned process or thread)",
        f"   to this thread, asleep whenever nothing is there; {thr['transfers']} transfers "
        f"per method,",
        "   interleaved; every record checked, in order",
        *table(f"{'method':<{width}} {'records/s':>11} {'best':>11} {'ns/rec':>7} "
               f"{'receives':>9}", (
            f"{name:<{width}} missing: {r['missing']}" if "missing" in r else
            f"{name:<{width}} {r['median_records_per_s']:>11,.0f} "
            f"{r['best_records_per_s']:>11,.0f} {r['median_ns_per_record']:>7.0f} "
            f"{r['median_receive_calls']:>9,.0f}"
            for name, r in rows)),
    ]

    width = max(len(r["name"]) for r in report["ratios"])
    lines.append("")
    lines += table(f"{'ratio':<{width}} {'pooled':>8} {RATIO_HEAD}", (
        f"{r['name']:<{width}} {'':>8} missing: {r['missing']}" if "missing" in r else
        f"{r['name']:<{width}} {r['pooled']:>7.2f}x {ratio_columns(r, r['op'], r['target'])}"
        for r in report["ratios"]))
    lines += [
        "",
        "producer: µs/call and ns/write are the best timing, median ns the median;",
        "wake: p50/p99 over all round trips; lead = smallest time from the consumer entering",
        "its wait to the write (how surely it was asleep); throughput: median and best",
        "records/s, ns/rec from the median, receives = the consumer's receive calls per",
        "transfer (drain_into, readinto, get_many; one get or recv per record for the Queue",
        f"and pyzmq); os.pipe and faster-fifo send {thr['batch']} records per write or put_many.",
        "pooled: producer median/median, wake p50/p50 (p99/p99) over all round trips,",
        "throughput median/median; blocks: median over blocks of the within-block ratio",
        "(the verdict uses it); range: lowest to highest block ratio.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=2000,
                        help="producer timings per method, one batch each (default 2000)")
    parser.add_argument("--round-trips", type=int, default=2000,
                        help="wake round trips per mechanism (default 2000)")
    parser.add_argument("--blocks", type=int, default=10,
                        help="interleaved blocks for the producer and wake figures (default 10)")
    parser.add_argument("--records", type=int, default=bw.RECORDS,
                        help=f"records per throughput transfer (default {bw.RECORDS})")
    parser.add_argument("--transfers", type=int, default=5,
                        help="transfers per throughput method, one per block (default 5)")
    args = parser.parse_args(argv)
    if min(args.repeat, args.round_trips, args.blocks, args.records, args.transfers) < 1:
        parser.error("every count must be positive")

    return emit(measure(args), args, format_table)


if __name__ == "__main__":
    sys.exit(main())
