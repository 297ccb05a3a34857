"""What every section of kvmcoal bench shares, once.

Timing: the interleaved timeit blocks (time_blocks) and a method's figures
from its timings (timing_figures).  Ratios: one ratio of two methods
(ratio), its spread over blocks (spread) and its verdict (is_met, verdict).
The run's environment (environment).  The one table formatter
(format_table), the JSON (write_json) and what --check judges (judge).

And the samples that fail their own timing check.  A benchmark checks two
kinds of thing about a sample:

* its data: every entry or record arrived, once, in order, byte for byte;
  a device saw every store.  A failure there is a bug (in kvmcoal or in the
  benchmark) and raises AssertionError, loudly, whatever the machine does;
* its timing: that the sample is the thing it claims to measure (the
  consumer was asleep when the write came; the producer started within the
  time allowed).  A busy machine can break those, and that is no bug: the
  benchmark raises InvalidSample, the sample is measured again, a bounded
  number of times (RetryBudget), and past that bound the figure is reported
  as unmeasured, with the reason (Unmeasured): in the table, in the JSON
  ("unmeasured" on the method and on every ratio that needs it, with met
  null) and by --check as not judged.  Never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import kvmcoal
from kvmcoal.errors import InvalidSample, Unmeasured

T = TypeVar("T")
Progress = Callable[[str], None]
Method = dict[str, Any]
Ratio = dict[str, Any]
Section = dict[str, Any]
Report = dict[str, Any]

# No single wait in these benchmarks should come close.
TIMEOUT_S = 30.0

NUMPY_MISSING = "numpy is not installed: pip install 'kvmcoal[bench]'"


def noop(*_args: object) -> None:
    """Does nothing: an untimed setup, or a progress callback nobody listens to."""


def rotated(items: Sequence[T], k: int) -> list[T]:
    """*items* started at index *k* (modulo its length), wrapping around."""
    k %= len(items)
    return [*items[k:], *items[:k]]


# ---------------------------------------------------------------------------
# Timing


def time_blocks(methods: Sequence[tuple[Any, ...]], repeat: int, blocks: int,
                rotate: bool = False) -> tuple[int, dict[str, list[float]], dict[str, list[float]]]:
    """Time each ``(key, label, fn, setup, ...)`` of *methods* in interleaved blocks.

    Each block times every method repeat // blocks times (at least once),
    one call per timing with *setup* before it, untimed; with *rotate*,
    block b starts at method b.  Returns how many timings each method gets
    per block, every timing of each method, and each method's best timing
    in each block.  timeit turns the garbage collector off while timing.
    """
    per_block = max(1, repeat // blocks)
    times: dict[str, list[float]] = {key: [] for key, *_ in methods}
    block_best: dict[str, list[float]] = {key: [] for key, *_ in methods}
    for b in range(blocks):
        for key, _label, fn, setup, *_ in (rotated(methods, b) if rotate else methods):
            timings = timeit.Timer(fn, setup=setup).repeat(repeat=per_block, number=1)
            times[key].extend(timings)
            block_best[key].append(min(timings))
    return per_block, times, block_best


def timing_figures(label: str, timings: list[float], count_key: str, n: int | None,
                   call: str, item: str) -> Method:
    """A method's figures from its *timings* (s, one call each, *n* items per call).

    label, *count_key* (*n*), timings (how many), then the best and the
    median time as best_us_per_<call>, median_us_per_<call>,
    best_ns_per_<item> and median_ns_per_<item> (None without *n*).
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


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0-100) of sorted values, interpolating linearly."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# ---------------------------------------------------------------------------
# Samples that fail their own timing check

# A sample that fails its timing check is measured again up to this many
# times in all; a method may have RETRY_SHARE of its samples (at least
# LEAST_RETRIES) measured again before it is reported as unmeasured.
TRIES_PER_SAMPLE = 5
RETRY_SHARE = 0.25
LEAST_RETRIES = 20


class RetryBudget:
    """How often one method's samples may be measured again before it is unmeasured.

    ``add(n)`` counts *n* samples asked for; ``again(tries, reason)`` counts
    one sample that failed its timing check at its *tries*-th try, and
    raises Unmeasured if that sample has had TRIES_PER_SAMPLE tries or the
    method more than its share of retries.
    """

    def __init__(self, samples: int = 0, *, per_sample: int = TRIES_PER_SAMPLE,
                 share: float = RETRY_SHARE, least: int = LEAST_RETRIES) -> None:
        self.samples = samples
        self.per_sample = per_sample
        self.share = share
        self.least = least
        self.retried = 0

    def add(self, samples: int) -> None:
        self.samples += samples

    @property
    def limit(self) -> int:
        return max(self.least, math.floor(self.samples * self.share))

    def again(self, tries: int, reason: str) -> None:
        self.retried += 1
        if tries >= self.per_sample:
            raise Unmeasured(f"one sample failed its timing check {tries} times in a row "
                             f"(last: {reason}); the machine is too busy")
        if self.retried > self.limit:
            raise Unmeasured(f"{self.retried} samples failed their timing check, more than "
                             f"{self.limit} of {self.samples} (last: {reason}); the machine "
                             "is too busy")


def valid_sample(take: Callable[[], T], budget: RetryBudget) -> T:
    """``take()``, taken again while it raises InvalidSample, within *budget*.

    Raises Unmeasured when the budget runs out; anything else ``take``
    raises (a data check's AssertionError) goes through untouched.
    """
    tries = 0
    while True:
        tries += 1
        try:
            return take()
        except InvalidSample as exc:
            budget.again(tries, str(exc))


# ---------------------------------------------------------------------------
# Ratios


def spread(nums: Sequence[float], dens: Sequence[float]) -> dict[str, float]:
    """The ratio nums[i] / dens[i] over blocks i: its median, lowest and highest.

    The median ("blocks") is what the verdict uses: of samples taken close
    together, it is the least sensitive to the machine changing speed
    during the run.
    """
    per_block = [a / b for a, b in zip(nums, dens)]
    return {"blocks": statistics.median(per_block), "blocks_min": min(per_block),
            "blocks_max": max(per_block)}


def is_met(op: str | None, target: float | None, got: float) -> bool | None:
    """Whether *got* meets ``op target`` (>= or <=); None where there is no target."""
    if op is None or target is None:
        return None
    return got >= target if op == ">=" else got <= target


def ratio(name: str, methods: Mapping[str, Method], num: str, den: str,
          per_block: Mapping[str, Sequence[float]], op: str | None = None,
          target: float | None = None, pooled: Mapping[str, str] | None = None) -> Ratio:
    """The ratio of method *num* to method *den*: the shape every section's ratios have.

    ``blocks`` (the median over blocks of ``per_block[num][i] /
    per_block[den][i]``, which the verdict uses), ``blocks_min``,
    ``blocks_max``, ``met``, and for each ``out: figure`` of *pooled* the
    ratio of the two methods' *figure*.  Where either method is missing or
    unmeasured, so is the ratio: its figures are None, ``met`` is None and
    ``missing`` or ``unmeasured`` says why.
    """
    r: Ratio = {"name": name, "op": op, "target": target}
    sides = (methods[num], methods[den])
    missing = next((m["missing"] for m in sides if m.get("missing")), None)
    unmeasured = next((f"{m['label']}: {m['unmeasured']}" for m in sides
                       if m.get("unmeasured")), None)
    if missing or unmeasured:
        r.update(dict.fromkeys(pooled or (), None))
        r.update(blocks=None, blocks_min=None, blocks_max=None, met=None)
        if missing:
            r["missing"] = missing
        else:
            r["unmeasured"] = unmeasured
        return r
    for out, figure in (pooled or {}).items():
        r[out] = sides[0][figure] / sides[1][figure]
    r.update(spread(per_block[num], per_block[den]))
    r["met"] = is_met(op, target, r["blocks"])
    return r


def verdict(r: Ratio) -> str:
    """A ratio's result column: met, MISSED by how much, a reference, or why there is none."""
    if r.get("missing"):
        return f"missing: {r['missing']}"
    if r.get("unmeasured"):
        return f"unmeasured: {r['unmeasured']}"
    if r.get("op") is None:
        return "(reference)"
    if r["met"]:
        return "met"
    got, target = r["blocks"], r["target"]
    short = (target - got) / target if r["op"] == ">=" else (got - target) / target
    return f"MISSED by {abs(got - target):.2f}x ({short:.1%} {'short' if r['op'] == '>=' else 'over'})"


def judge(report: Report) -> tuple[list[str], list[str]]:
    """What ``--check`` reports: the targets missed, and those not judged, with why.

    Not judged: a section skipped or unmeasured, and every ratio with a
    target but no verdict (a method missing or unmeasured).
    """
    missed: list[str] = []
    not_judged: list[str] = []
    for name, section in report["sections"].items():
        for why in ("skipped", "unmeasured"):
            if why in section:
                not_judged.append(f"{name} section ({why}: {section[why]})")
        for r in section.get("ratios", ()):
            if r.get("met") is False:
                missed.append(r["name"])
            elif r.get("op") is not None and r.get("met") is None:
                reason = next((f"{k}: {r[k]}" for k in ("missing", "unmeasured") if r.get(k)),
                              "no figure")
                not_judged.append(f"{r['name']} ({reason})")
    return missed, not_judged


# ---------------------------------------------------------------------------
# The environment


def _kvm_backend() -> dict[str, Any] | None:
    """Which KVM backend serves /dev/kvm (kvmcoal.kvm.backend()), where kvmcoal can say."""
    from kvmcoal import kvm
    backend = getattr(kvm, "backend", None)
    if backend is None:
        return None
    try:
        return dict(backend())
    except Exception as exc:  # metadata only: a failure here must not stop the measuring
        return {"backend": "unknown", "error": f"{type(exc).__name__}: {exc}"}


def environment() -> dict[str, Any]:
    """The run's Python, machine, kernel, CPUs, kvmcoal and KVM backend."""
    meta: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "cpus": len(os.sched_getaffinity(0)),
        "kvmcoal": kvmcoal.__version__,
        "ring_module": kvmcoal.Ring.__module__,
    }
    backend = _kvm_backend()
    if backend is not None:
        meta["kvm_backend"] = backend
    return meta


def headline(meta: Mapping[str, Any]) -> str:
    """The table's first line."""
    line = (f"kvmcoal bench: kvmcoal {meta['kvmcoal']} ({meta['ring_module']}), "
            f"{meta.get('implementation', 'Python')} {meta['python']}, {meta['machine']}")
    if "cpus" in meta:
        line += f", {meta['cpus']} CPUs, Linux {meta['kernel']}"
    if meta.get("kvm_backend"):
        line += f", KVM backend {meta['kvm_backend'].get('backend', 'unknown')}"
    if "scale" in meta:
        line += f"; scale {meta['scale']:g}"
    if meta.get("blocks") is not None:
        line += f", {meta['blocks']} blocks"
    if "seconds" in meta:
        line += f", {meta['seconds']:.0f} s"
    return line


# ---------------------------------------------------------------------------
# The table

def _exits(exits: int | list[int]) -> str:
    """One count, or the different counts the runs had."""
    return f"{exits:,}" if isinstance(exits, int) else "/".join(f"{e:,}" for e in exits)


# A method's columns: (key, head, format), in this order; a section shows the
# columns that at least one of its methods has.
_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("best_us_per_ring", "µs/call", "{:,.2f}".format),
    ("best_us_per_call", "µs/call", "{:,.1f}".format),
    ("best_ns_per_entry", "ns/entry", "{:,.1f}".format),
    ("best_ns_per_write", "ns/write", "{:,.1f}".format),
    ("median_us_per_ring", "median µs", "{:,.2f}".format),
    ("median_ns_per_write", "median ns", "{:,.1f}".format),
    ("p50_us", "p50 µs", "{:,.1f}".format),
    ("p99_us", "p99 µs", "{:,.1f}".format),
    ("min_us", "min µs", "{:,.1f}".format),
    ("min_lead_us", "lead µs", "{:,.0f}".format),
    ("median_records_per_s", "records/s", "{:,.0f}".format),
    ("best_records_per_s", "best", "{:,.0f}".format),
    ("median_ns_per_record", "ns/rec", "{:,.0f}".format),
    ("median_receive_calls", "receives", "{:,.0f}".format),
    ("median_stores_per_s", "stores/s", "{:,.0f}".format),
    ("best_stores_per_s", "best", "{:,.0f}".format),
    ("median_ns_per_store", "ns/store", "{:,.0f}".format),
    ("median_writes_per_s", "writes/s", "{:,.0f}".format),
    ("best_writes_per_s", "best", "{:,.0f}".format),
    ("median_guest_writes_per_s", "guest w/s", "{:,.0f}".format),
    ("watcher_cpu_share", "watcher CPU", "{:.1%}".format),
    ("exits", "exits", _exits),
    ("retried", "retried", "{:,}".format),
)


def methods_of(section: Section) -> list[Method]:
    """Every method of a section, in report order (per threads/processes where it has both)."""
    if "methods" in section:
        return list(section["methods"].values())
    return [{**m, "label": f"{kind}: {m['label']}"} for kind in section
            if kind in ("threads", "processes") for m in section[kind].values()]


def _method_rows(methods: list[Method], width: int) -> list[str]:
    columns = [c for c in _COLUMNS if any(c[0] in m for m in methods)]
    cells = [[fmt(m[key]) if m.get(key) is not None else "-" for key, _h, fmt in columns]
             for m in methods]
    widths = [max(len(head), *(len(row[i]) for row in cells)) for i, (_k, head, _f) in
              enumerate(columns)]
    rows = [f"    {'method':<{width}}" + "".join(f"  {head:>{w}}" for (_k, head, _f), w
                                                 in zip(columns, widths))]
    for m, row in zip(methods, cells):
        why = next((f"{k}: {m[k]}" for k in ("missing", "unmeasured") if m.get(k)), None)
        rows.append(f"    {m['label']:<{width}}  " + (why if why else "  ".join(
            f"{cell:>{w}}" for cell, w in zip(row, widths))))
    return rows


def _batch_rows(batches: list[dict[str, Any]], width: int) -> list[str]:
    sizes = sorted({b["entries"] for b in batches})
    labels: dict[str, str] = {}
    cell: dict[tuple[str, int], float] = {}
    for b in batches:
        labels.setdefault(b["method"], b["label"])
        cell[b["method"], b["entries"]] = b["best_ns_per_entry"]
    rows = [f"    {'ns/entry by entries per call':<{width}}" + "".join(f"{s:>10}" for s in sizes)]
    for key, label in labels.items():
        rows.append(f"    {label:<{width}}" + "".join(
            f"{cell[key, s]:>10,.1f}" if (key, s) in cell else f"{'-':>10}" for s in sizes))
    return rows


def _ratio_rows(ratios: list[Ratio]) -> list[str]:
    width = max(len("ratio"), *(len(r["name"]) for r in ratios))
    head = f"{'ratio':<{width}} {'value':>9} {'(range)':>17}  {'target':<8} result"
    rows = [head, "-" * len(head)]
    for r in ratios:
        target = "-" if r.get("op") is None else f"{r['op']} {r['target']:g}x"
        if r.get("blocks") is None:
            rows.append(f"{r['name']:<{width}} {'-':>9} {'':>17}  {target:<8} {verdict(r)}")
            continue
        span = f"{r['blocks_min']:.2f}-{r['blocks_max']:.2f}x"
        rows.append(f"{r['name']:<{width}} {r['blocks']:>8.2f}x {span:>17}  {target:<8} "
                    f"{verdict(r)}")
    return rows


def format_table(report: Report) -> str:
    """The human-readable table kvmcoal bench prints: every method, then every ratio."""
    lines = [headline(report["meta"]), ""]
    measured = [s for s in report["sections"].values() if "skipped" not in s]
    width = max((len(m["label"]) for s in measured for m in methods_of(s)), default=0)
    width = max(width, len("ns/entry by entries per call"))
    ratios: list[Ratio] = []
    for name, section in report["sections"].items():
        for why in ("skipped", "unmeasured"):
            if why in section:
                lines += [f"{name}: {why}: {section[why]}", ""]
        if "skipped" in section or "unmeasured" in section:
            continue
        lines.append(f"{name}: " + "\n    ".join(section.get("caption", ())))
        lines += _method_rows(methods_of(section), width)
        if section.get("batches"):
            lines += _batch_rows(section["batches"], width)
        lines.append("")
        ratios += section.get("ratios", ())
    if ratios:
        lines += _ratio_rows(ratios)
        lines += ["", "value: median over interleaved blocks of the within-block ratio; "
                  "range: lowest to highest block.",
                  "Steadier figures: kvmcoal bench --only SECTION --scale N --blocks B "
                  "(docs/BENCHMARKS.md)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The JSON and the output paths

# Paths that are this process's standard output: --json writes JSON only there.
STDOUT_PATHS = ("-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")


def check_output_path(path: str | Path, option: str) -> None:
    """Raise RuntimeError now, before measuring, if *path* cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise RuntimeError(f"{option} {path}: is a directory")
    parent = target.parent
    if not parent.is_dir():
        raise RuntimeError(f"{option} {path}: the directory {parent} does not exist")
    if not os.access(target if target.exists() else parent, os.W_OK):
        raise RuntimeError(f"{option} {path}: not writable")


def write_json(report: Report, path: str | Path) -> None:
    """*report* as indented JSON into *path* ("-": standard output)."""
    if str(path) == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def check_messages(missed: Iterable[str], not_judged: Iterable[str]) -> list[str]:
    """What --check prints on stderr."""
    lines = []
    if missed := list(missed):
        lines.append("kvmcoal bench --check: targets missed: " + "; ".join(missed))
    if not_judged := list(not_judged):
        lines.append("kvmcoal bench --check: targets not judged: " + "; ".join(not_judged))
    return lines
