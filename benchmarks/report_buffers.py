"""Buffer figures: the producer path, wake latency, cross-process throughput.

    python benchmarks/report_buffers.py            # table
    python benchmarks/report_buffers.py --json     # the same figures as JSON
    python benchmarks/report_buffers.py --check    # exit 1 if a target is missed

The workloads are those of ``benchmarks/test_producer.py`` and
``benchmarks/test_wakeup.py`` (see ``benchmarks/buffers_workload.py``):

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
3. Throughput: ``--records`` 24-byte records from a producer subprocess to
   this process, through a CoalescedBuffer ring (consumer: ``wait()`` and
   ``drain_into``) or a ``multiprocessing.Queue`` (one put and one get per
   record); each transfer is checked, every record in order.  Producer
   start-up is not timed.  ``--transfers`` transfers per method, one per
   block, methods interleaved.

Each ratio is given two ways: "pooled" (the statistic over all samples of
one method against the other's) and "blocks" (the median over blocks of the
within-block ratio, i.e. of samples taken close together), which the
met/MISSED verdict uses, as in ``report.py``.

The targets: ``EmulatedVm.write`` within 2x of ``Ring.push``; kvmcoal's wake
p50 at most 1.2x a bare eventfd's (threads, and processes); kvmcoal at least
10x the records/s of ``multiprocessing.Queue`` across processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

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


def measure_producer(repeat: int, blocks: int) -> dict:
    with bw.ProducerWorkload() as p:
        p.check_each_path()
        methods = [
            ("vm_write", "EmulatedVm.write (zone -> ring)", p.vm_write_batch, p.reset),
            ("ring_push", "Ring.push (same ring)", p.ring_push_batch, p.reset),
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
    ratio = {
        "name": "EmulatedVm.write / Ring.push",
        "best": results["vm_write"]["best_us_per_call"] / results["ring_push"]["best_us_per_call"],
        "pooled": (results["vm_write"]["median_us_per_call"]
                   / results["ring_push"]["median_us_per_call"]),
        **spread(block_best["vm_write"], block_best["ring_push"]),
        "op": "<=", "target": 2.0,
    }
    return {
        "batch": batch, "ring_entries": ring_entries, "repeat": per_block * blocks,
        "blocks": blocks, "methods": results, "ratios": [ratio],
    }


WARMUP_ROUND_TRIPS = 20


def measure_wakeups(round_trips: int, blocks: int) -> dict:
    out: dict = {"pace_us": bw.PACE_S * 1e6, "round_trips": 0, "blocks": blocks, "ratios": []}
    per_block = max(1, round_trips // blocks)
    for kind, cls in (("threads", bw.ThreadWakeups), ("processes", bw.ProcessWakeups)):
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


def measure_throughput(records: int, transfers: int) -> dict:
    methods = [
        ("kvmcoal", bw.KvmcoalTransfer(records)),
        ("kvmcoal_64k", bw.KvmcoalTransfer(records, 65536)),
        ("queue", bw.QueueTransfer(records)),
    ]
    rates: dict[str, list[float]] = {key: [] for key, _ in methods}
    batches: dict[str, list[int]] = {key: [] for key, _ in methods}
    try:
        for b in range(transfers):
            for key, t in rotated(methods, b):
                t.prepare()
                t0 = time.perf_counter()
                n = t.run()
                elapsed = time.perf_counter() - t0
                t.finish()          # every record, in order, and the producer exited 0
                rates[key].append(n / elapsed)
                batches[key].append(getattr(t, "batches", n))
        for key, t in methods:
            assert t.transfers == transfers, (key, t.transfers)
        labels = {key: t.label for key, t in methods}
        labels["kvmcoal_64k"] += " (reference)"
    finally:
        for _key, t in methods:
            t.close()

    results = {key: {
        "label": labels[key],
        "transfers": len(rates[key]),
        "median_records_per_s": statistics.median(rates[key]),
        "best_records_per_s": max(rates[key]),
        "median_receive_calls": statistics.median(batches[key]),
    } for key, _ in methods}

    def ratio(num, name, op=None, target=None):
        return {"name": name,
                "pooled": (results[num]["median_records_per_s"]
                           / results["queue"]["median_records_per_s"]),
                **spread(rates[num], rates["queue"]),
                "op": op, "target": target}

    return {
        "records": records, "record_bytes": bw.ENTRY.size, "transfers": transfers,
        "methods": results,
        "ratios": [ratio("kvmcoal", "records/s: kvmcoal / Queue", ">=", 10.0),
                   ratio("kvmcoal_64k", "records/s: kvmcoal 64 KiB / Queue")],
    }


def measure(args: argparse.Namespace) -> dict:
    producer = measure_producer(args.repeat, min(args.blocks, args.repeat))
    wakeups = measure_wakeups(args.round_trips, min(args.blocks, args.round_trips))
    throughput = measure_throughput(args.records, args.transfers)
    ratios = [{**r, "met": is_met(r["op"], r["target"], r["blocks"])}
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

    lines += [
        "",
        f"3. throughput: {thr['records']} {thr['record_bytes']}-byte records, producer "
        f"subprocess -> this process;",
        f"   {thr['transfers']} transfers per method, interleaved; every record checked, in order",
        *table(f"{'method':<54} {'records/s':>11} {'best':>11} {'receives':>9}", (
            f"{r['label']:<54} {r['median_records_per_s']:>11,.0f} "
            f"{r['best_records_per_s']:>11,.0f} {r['median_receive_calls']:>9,.0f}"
            for r in thr["methods"].values())),
    ]

    lines.append("")
    lines += table(f"{'ratio':<38} {'pooled':>8} {RATIO_HEAD}", (
        f"{r['name']:<38} {r['pooled']:>7.2f}x {ratio_columns(r, r['op'], r['target'])}"
        for r in report["ratios"]))
    lines += [
        "",
        "producer: µs/call and ns/write are the best timing, median ns the median;",
        "wake: p50/p99 over all round trips; lead = smallest time from the consumer entering",
        "its wait to the write (how surely it was asleep); throughput: median and best",
        "records/s, receives = drain_into calls (Queue: one get per record).",
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
                        help=f"records per cross-process transfer (default {bw.RECORDS})")
    parser.add_argument("--transfers", type=int, default=5,
                        help="transfers per throughput method, one per block (default 5)")
    args = parser.parse_args(argv)
    if min(args.repeat, args.round_trips, args.blocks, args.records, args.transfers) < 1:
        parser.error("every count must be positive")

    return emit(measure(args), args, format_table)


if __name__ == "__main__":
    sys.exit(main())
