"""Real-KVM figures: the Python VMM with and without coalescing, and against a C VMM.

    python benchmarks/report_kvm.py                 # table
    python benchmarks/report_kvm.py --json          # the same figures as JSON
    python benchmarks/report_kvm.py --check         # exit 1 if a target is missed
    python benchmarks/report_kvm.py --stores 30000  # fewer stores per run

The workload is that of ``benchmarks/test_kvm_vmm.py`` (see
``benchmarks/kvm_workload.py``): the store_loop guest makes ``--stores``
stores (rounded to whole loop iterations of three: a 4-byte and a 2-byte
MMIO store and a 1-byte ``out``) in one run, in a fresh VM, five ways:

* python, coalesced: ``Vcpu.run_loop`` with the MMIO page and the port
  registered as coalesced zones, delivering to a handler that checks each
  write against the expected stream and counts it;
* python, uncoalesced: the same with no zone, so every store exits;
* python batch, coalesced: the same coalesced run, but the device takes
  the ring in batches (``run_loop(..., drain=device.drain)``: one
  ``drain_into`` and one bulk check per KVM_RUN return, no Python call
  per write); the writes that exit still go one by one to ``write``;
* C, coalesced / uncoalesced: ``benchmarks/cvmm.c`` (built with gcc -O2),
  the same guest, setup, run loop (drain the ring after every KVM_RUN,
  then dispatch the exit) and check-and-count handler, in C; one
  long-lived C process, as the Python VMM is one long-lived process.

Only the run is timed, from the first KVM_RUN to the HLT exit: Python with
``time.perf_counter`` around ``run_loop``, C with ``CLOCK_MONOTONIC`` in
the C program.  VM setup and teardown are not.  Every run is checked:
each store delivered exactly once, in guest order.  The garbage collector
stays on, as in any Python VMM.

After one untimed warm-up run of each, ``--blocks`` blocks each run the
five once, the order rotated from block to block, so that a drift of the
machine (nested virtualisation, a noisy neighbour) does not favour one.
Each ratio of stores/s is given two ways: "pooled" (median/median over all
runs) and "blocks", the median over blocks of the within-block ratio,
which the met/MISSED verdict uses, as in ``report.py``.

The issue's targets: coalesced at least 2.5x the uncoalesced stores/s
(Python VMM); the Python VMM at least 0.9x the C VMM's stores/s, both
coalescing.  The second is judged twice: with a Python call per write
(the like-for-like loop, whose per-write handler body is Python) and with
the batch device.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
from collections.abc import Callable

import kvmcoal

if __package__:
    from . import kvm_workload as kw
    from .reporting import (
        report_parser,
        RATIO_HEAD, emit, environment, headline, is_met, ratio_columns, rotated, spread, table)
else:  # run as a script: python benchmarks/report_kvm.py
    import kvm_workload as kw
    from reporting import (
        report_parser,
        RATIO_HEAD, emit, environment, headline, is_met, ratio_columns, rotated, spread, table)

LABELS = {
    "python_coalesced": "Python VMM (run_loop), coalesced",
    "python_uncoalesced": "Python VMM (run_loop), uncoalesced",
    "python_batch_coalesced": "Python VMM, batch device, coalesced",
    "c_coalesced": "C VMM (cvmm.c), coalesced",
    "c_uncoalesced": "C VMM (cvmm.c), uncoalesced",
}

RATIOS = [
    # numerator, denominator, op, target
    ("python_coalesced", "python_uncoalesced", ">=", 2.5),
    ("python_coalesced", "c_coalesced", ">=", 0.9),
    ("python_batch_coalesced", "c_coalesced", ">=", 0.9),
    ("c_coalesced", "c_uncoalesced", None, None),
    ("python_uncoalesced", "c_uncoalesced", None, None),
]

SHORT = {"python_coalesced": "python coalesced", "python_uncoalesced": "python uncoalesced",
         "python_batch_coalesced": "python batch coalesced",
         "c_coalesced": "C coalesced", "c_uncoalesced": "C uncoalesced"}


def measure(stores: int, blocks: int, progress: Callable[[str], None] | None = None) -> dict:
    """Time the five runs of *stores* stores in *blocks* interleaved blocks.

    *progress*, if given, is called with a short message before each stage.
    Where the C VMM cannot be built (no gcc), the Python runs are measured
    alone, and the C runs and the ratios against them say ``missing``, why.
    """
    say = progress or (lambda message: None)
    c_missing: str | None = None
    with contextlib.ExitStack() as stack:
        pending = [kw.PythonRun(stores, True), kw.PythonRun(stores, False),
                   kw.PythonRun(stores, True, batch=True)]
        try:
            server = stack.enter_context(kw.CvmmServer())  # closing it checks cvmm's exit status
        except kw.CvmmUnavailable as exc:
            c_missing = str(exc)
        else:
            pending += [kw.CRun(stores, True, server), kw.CRun(stores, False, server)]
        runs = [stack.enter_context(r) for r in pending]
        say("real KVM: warm-up runs")
        for r in runs:            # warm-up, untimed
            r.measure()
        samples: dict[str, list[dict]] = {r.key: [] for r in runs}
        for b in range(blocks):
            say(f"real KVM: block {b + 1} of {blocks}")
            for r in rotated(runs, b):
                samples[r.key].append(r.measure())  # raises unless every store arrived in order

    methods: dict[str, dict] = {}
    for key in LABELS:                 # in LABELS order, measured or missing
        if key not in samples:
            methods[key] = {"label": LABELS[key], "missing": c_missing}
            continue
        got = samples[key]
        rates = [s["stores_per_s"] for s in got]
        exits = sorted({s["exits"] for s in got})
        methods[key] = {
            "label": LABELS[key],
            "runs": len(got),
            "median_stores_per_s": statistics.median(rates),
            "best_stores_per_s": max(rates),
            "median_ns_per_store": statistics.median(s["ns_per_store"] for s in got),
            "exits": exits[0] if len(exits) == 1 else exits,
            "stores_per_s": rates,
        }

    ratios = []
    for num, den, op, target in RATIOS:
        name = f"stores/s: {SHORT[num]} / {SHORT[den]}"
        gone = methods[num].get("missing") or methods[den].get("missing")
        if gone:
            ratios.append({"name": name, "pooled": None, "blocks": None, "blocks_min": None,
                           "blocks_max": None, "op": op, "target": target, "missing": gone,
                           "met": None})
            continue
        r = {"name": name,
             "pooled": (methods[num]["median_stores_per_s"]
                        / methods[den]["median_stores_per_s"]),
             **spread(methods[num]["stores_per_s"], methods[den]["stores_per_s"]),
             "op": op, "target": target}
        r["met"] = is_met(op, target, r["blocks"])
        ratios.append(r)

    overhead = (None if c_missing else methods["python_coalesced"]["median_ns_per_store"]
                - methods["c_coalesced"]["median_ns_per_store"])
    return {
        "meta": {
            **environment(kernel=platform.release(), cpus=len(os.sched_getaffinity(0))),
            "ring_capacity": kvmcoal.RING_MAX - 1,
            "timing": ("the run only, first KVM_RUN to HLT: Python perf_counter around "
                       "run_loop, C CLOCK_MONOTONIC inside cvmm; a fresh VM per run"),
            "statistic": ("per method: median and best stores/s over blocks; per ratio: "
                          "pooled (median/median) and blocks (median over blocks of the "
                          "within-block ratio), which the verdict uses"),
        },
        "stores": runs[0].stores,          # rounded to whole iterations
        "iterations": runs[0].iterations,
        "blocks": blocks,
        "methods": methods,
        "python_minus_c_ns_per_store_coalesced": overhead,
        "ratios": ratios,
    }


def _exits(exits: int | list[int]) -> str:
    """One count, or the different counts the runs had."""
    return f"{exits:,}" if isinstance(exits, int) else "/".join(f"{e:,}" for e in exits)


def format_table(report: dict) -> str:
    meta, methods = report["meta"], report["methods"]
    lines = [
        f"{headline(meta)}, {meta['cpus']} CPUs, Linux {meta['kernel']}",
        "",
        f"store_loop guest on /dev/kvm: {report['stores']:,} stores per run "
        f"({report['iterations']:,} iterations: 4-byte and 2-byte",
        f"MMIO stores, 1-byte out), a fresh VM per run, ring of {meta['ring_capacity']} "
        f"entries; {report['blocks']} blocks of the five",
        "runs, interleaved; timed: first KVM_RUN to HLT; every run checked (each store",
        "delivered once, in order)",
        *table(f"{'run':<36} {'stores/s':>10} {'best':>10} {'ns/store':>9} {'exits':>8}", (
            f"{m['label']:<36} missing: {m['missing']}" if m.get("missing") else
            f"{m['label']:<36} {m['median_stores_per_s']:>10,.0f} "
            f"{m['best_stores_per_s']:>10,.0f} {m['median_ns_per_store']:>9,.0f} "
            f"{_exits(m['exits']):>8}"
            for m in methods.values())),
        "",
        *table(f"{'ratio':<48} {'pooled':>8} {RATIO_HEAD}", (
            f"{r['name']:<48} {'':>8} missing: {r['missing']}" if r.get("missing") else
            f"{r['name']:<48} {r['pooled']:>7.2f}x {ratio_columns(r, r['op'], r['target'])}"
            for r in report["ratios"])),
        "",
        ("Python VMM - C VMM, coalesced: the C VMM is missing."
         if report["python_minus_c_ns_per_store_coalesced"] is None else
         f"Python VMM - C VMM, coalesced: {report['python_minus_c_ns_per_store_coalesced']:+.0f} "
         f"ns/store."),
        "stores/s, ns/store: median over blocks; best: the fastest run; exits: KVM_RUN returns",
        "per run (the HLT included).  pooled: median/median; blocks: median over blocks of",
        "the within-block ratio (the verdict uses it); range: lowest to highest block ratio.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report_parser(__doc__)
    parser.add_argument("--stores", type=int, default=kw.DEFAULT_STORES,
                        help=f"guest stores per run, rounded to whole iterations of three "
                             f"(default {kw.DEFAULT_STORES:,})")
    parser.add_argument("--blocks", type=int, default=7,
                        help="interleaved blocks, each one run of each of the five (default 7)")
    args = parser.parse_args(argv)
    if min(args.stores, args.blocks) < 1:
        parser.error("every count must be positive")
    reason = kw.kvm_unavailable()
    if reason is not None:
        print(f"report_kvm: /dev/kvm cannot be used: {reason}", file=sys.stderr)
        return 2
    return emit(measure(args.stores, args.blocks), args, format_table)


if __name__ == "__main__":
    sys.exit(main())
