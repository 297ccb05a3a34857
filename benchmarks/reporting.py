"""What ``report.py`` and ``report_buffers.py`` share.

The interleaved timeit blocks, a ratio's spread over blocks and its
met/MISSED verdict, the run's environment, the tables (header rule, the
ratio columns) and the end of ``main()`` (table or ``--json``, exit status
for ``--check``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import timeit
from collections.abc import Callable, Iterable, Sequence

import kvmcoal


def noop(*_args: object) -> None:
    """Does nothing: an untimed setup, or a progress callback nobody listens to."""


def rotated(items: list, k: int) -> list:
    """*items* started at index *k* (modulo its length), wrapping around."""
    k %= len(items)
    return items[k:] + items[:k]


def time_blocks(methods: Sequence[tuple], repeat: int, blocks: int,
                rotate: bool = False) -> tuple[int, dict[str, list[float]], dict[str, list[float]]]:
    """Time each ``(key, label, fn, setup, ...)`` of *methods* in interleaved blocks.

    Each block times every method ``repeat // blocks`` times (at least
    once), one call per timing with *setup* before it, untimed; with
    *rotate*, block *b* starts at method *b*.  Returns how many timings
    each method gets per block, every timing of each method, and each
    method's best timing in each block.
    """
    per_block = max(1, repeat // blocks)
    times: dict[str, list[float]] = {key: [] for key, *_ in methods}
    block_best: dict[str, list[float]] = {key: [] for key, *_ in methods}
    for b in range(blocks):
        for key, _label, fn, setup, *_ in (rotated(list(methods), b) if rotate else methods):
            timings = timeit.Timer(fn, setup=setup).repeat(repeat=per_block, number=1)
            times[key].extend(timings)
            block_best[key].append(min(timings))
    return per_block, times, block_best


def timing_figures(label: str, timings: list[float], count_key: str, n: int | None,
                   call: str, item: str) -> dict:
    """A method's figures from its *timings* (s, one call each, *n* items per call).

    ``label``, *count_key* (*n*), ``timings`` (how many), then the best and
    the median time as ``best_us_per_<call>``, ``median_us_per_<call>``,
    ``best_ns_per_<item>`` and ``median_ns_per_<item>`` (None without *n*).
    """
    best, median = min(timings), statistics.median(timings)
    return {
        "label": label,
        count_key: n,
        "timings": len(timings),
        f"best_us_per_{call}": best * 1e6,
        f"median_us_per_{call}": median * 1e6,
        f"best_ns_per_{item}": best / n * 1e9 if n else None,
        f"median_ns_per_{item}": median / n * 1e9 if n else None,
    }


def spread(nums: list[float], dens: list[float]) -> dict:
    """The ratio ``nums[i] / dens[i]`` over blocks *i*: its median, lowest and highest.

    The median (``blocks``) is what the verdict uses: of samples taken close
    together, it is the least sensitive to the machine changing speed
    during the run.
    """
    per_block = [a / b for a, b in zip(nums, dens)]
    return {"blocks": statistics.median(per_block), "blocks_min": min(per_block),
            "blocks_max": max(per_block)}


def is_met(op: str | None, target: float | None, got: float) -> bool | None:
    """Whether *got* meets ``op target`` (``>=`` or ``<=``); None where there is no target."""
    if op is None:
        return None
    return got >= target if op == ">=" else got <= target


# The last columns of a ratio table: the head, and each row's (ratio_columns).
RATIO_HEAD = f"{'blocks':>8} {'(range)':>15}  {'target':<8} result"


def ratio_columns(r: dict, op: str | None, target: float | None) -> str:
    """Ratio *r*'s blocks figure, its range, its target ``op target`` and the verdict."""
    span = f"{r['blocks_min']:.2f}-{r['blocks_max']:.2f}x"
    shown = "-" if op is None else f"{op} {target:g}x"
    return (f"{r['blocks']:>7.2f}x {span:>15}  {shown:<8} "
            f"{verdict(r['met'], op, target, r['blocks'])}")


def verdict(met: bool | None, op: str | None, target: float | None, got: float) -> str:
    """The result column: met, MISSED by how much, or a reference ratio's note."""
    if met is None:
        return "(reference, no target)"
    if met:
        return "met"
    if op == ">=":
        return f"MISSED by {target - got:.2f}x ({(1 - got / target) * 100:.1f}% short)"
    return f"MISSED by {got - target:.2f}x ({(got / target - 1) * 100:.1f}% over)"


def environment(**more: object) -> dict:
    """The run's Python, machine and kvmcoal; *more* goes after the machine."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        **more,
        "kvmcoal": kvmcoal.__version__,
        "ring_module": kvmcoal.Ring.__module__,
    }


def headline(meta: dict) -> str:
    """The table's first line, from :func:`environment`'s keys."""
    return (f"kvmcoal {meta['kvmcoal']} ({meta['ring_module']}), Python {meta['python']}, "
            f"{meta['machine']}")


def table(head: str, rows: Iterable[str]) -> list[str]:
    """*head*, a rule as wide, then *rows*."""
    return [head, "-" * len(head), *rows]


def report_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser every report starts from: --json and --check."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if a target is missed or cannot be judged "
                             "(a peer or the C VMM missing)")
    return parser


def emit(report: dict, args: argparse.Namespace,
         format_table: Callable[[dict], str]) -> int:
    """Print *report* as a table (or JSON with ``--json``); the exit status.

    That is 1 with ``--check`` if a ratio missed its target or could not
    be judged (see :func:`unjudged`), else 0.
    """
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_table(report))
    if not args.check:
        return 0
    missed = [r["name"] for r in report["ratios"] if r["met"] is False]
    not_judged = unjudged(report["ratios"])
    if not_judged:
        print("--check: targets not judged: " + "; ".join(not_judged), file=sys.stderr)
    return 1 if missed or not_judged else 0


def unjudged(ratios: Iterable[dict]) -> list[str]:
    """The ratios with a target but no verdict (a peer or the C VMM missing), with why."""
    return [f"{r['name']} ({r.get('missing') or 'no figure'})" for r in ratios
            if r.get("op") is not None and r.get("met") is None]
