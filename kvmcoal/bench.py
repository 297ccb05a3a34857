"""``kvmcoal bench``: a quick run of the headline benchmark comparisons.

The measuring code lives in the source tree's ``benchmarks/`` directory
(``report.py``, ``report_buffers.py``, ``report_kvm.py``; their workloads,
baselines and the C programs they compile), not in the installed package:
``kvmcoal bench`` finds that directory, runs each report's ``measure`` with
counts small enough for the whole run to take under a minute, and prints one
table of each figure and of each ratio to its baseline, with the target
kvmcoal sets itself and the verdict.  The report scripts, run directly, take longer and
give steadier figures; ``docs/BENCHMARKS.md`` explains both.

Sections (``--only``/``--skip``):

* ``consumer``: draining a full ring and batches of 1, 8 and 64 entries
  with ``drain_into``, ``drain``, ``consume``, ``pop`` and iteration,
  against pure-Python baselines and a C consumer;
* ``producer``: ``EmulatedVm.write`` against ``Ring.push``;
* ``wakeup``: producer write to consumer return from ``wait()``, against a
  bare eventfd and ``select``, between threads and between processes;
* ``transfer``: 24-byte records between processes and threads, against
  ``multiprocessing.Queue``, ``os.pipe``, faster-fifo and pyzmq;
* ``kvm``: a real guest on /dev/kvm storing N times, coalesced or not,
  through the Python run loop and through a small C VMM.

A section that cannot run here (no /dev/kvm, no gcc, a peer not installed)
is reported as skipped or missing, with the reason; it is never dropped
silently.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

SECTIONS = ("consumer", "producer", "wakeup", "transfer", "kvm")

Progress = Callable[[str], None]


class BenchmarksNotFoundError(RuntimeError):
    """The source tree's ``benchmarks/`` directory is not where ``kvmcoal bench`` looked."""


def find_benchmarks(explicit: str | Path | None = None) -> Path:
    """The ``benchmarks/`` directory to run: *explicit*, beside the package, or in the cwd.

    An editable install (``pip install -e .``, the README's set-up) keeps
    the package in the source tree, so ``benchmarks/`` sits beside it.
    """
    candidates = ([Path(explicit)] if explicit is not None else
                  [Path(__file__).resolve().parent.parent / "benchmarks",
                   Path.cwd() / "benchmarks"])
    for path in candidates:
        if (path / "report.py").is_file() and (path / "__init__.py").is_file():
            return path.resolve()
    raise BenchmarksNotFoundError(
        "kvmcoal bench runs the benchmarks of a source checkout, and found none at "
        + " or ".join(str(p) for p in candidates)
        + ": run it from a clone (pip install -e '.[bench]'), or pass --benchmarks DIR")


def load_reports(benchmarks: Path) -> dict[str, ModuleType]:
    """Import ``benchmarks.report``, ``.report_buffers``, ``.report_kvm`` and ``.reporting``."""
    parent = str(benchmarks.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    package = importlib.import_module(benchmarks.name)
    if Path(package.__file__ or "").resolve().parent != benchmarks:
        raise BenchmarksNotFoundError(
            f"another module named {benchmarks.name!r} ({package.__file__}) shadows "
            f"{benchmarks}")
    return {name: importlib.import_module(f"{benchmarks.name}.{name}")
            for name in ("report", "report_buffers", "report_kvm", "reporting")}


def _count(base: int, scale: float, least: int = 1) -> int:
    return max(least, round(base * scale))


def run(sections: Iterable[str] = SECTIONS, *, scale: float = 1.0,
        benchmarks: str | Path | None = None, progress: Progress | None = None) -> dict:
    """Run the quick benchmark *sections*; the combined report (what ``--json`` writes).

    *scale* multiplies every repeat and record count (1.0: about a minute
    on a 2-CPU machine).  Each section's entry is its report's own output
    (``"ratios"`` each with ``name``, ``op``, ``target``, ``blocks`` and
    ``met``), or ``{"skipped": reason}``.
    """
    say = progress or (lambda message: None)
    mods = load_reports(find_benchmarks(benchmarks))
    reporting = mods["reporting"]
    started = time.perf_counter()
    out: dict[str, Any] = {"meta": {**reporting.environment(), "scale": scale},
                           "sections": {}}
    for name in sections:
        if name not in SECTIONS:
            raise ValueError(f"unknown section {name!r}: choose from {', '.join(SECTIONS)}")
        say(f"{name}: starting")      # the reports' own messages name their stage
        out["sections"][name] = section = _MEASURE[name](mods, scale, say)
        for r in section.get("ratios", ()):
            if "met" not in r:
                r["met"] = (None if r.get("missing") else
                            reporting.is_met(r.get("op"), r.get("target"), r["blocks"]))
    out["meta"]["seconds"] = time.perf_counter() - started
    return out


def _consumer(mods: dict[str, ModuleType], scale: float, step: Progress) -> dict:
    repeat = _count(3000, scale, 5)
    return mods["report"].measure(repeat, min(10, repeat), progress=step)


def _producer(mods: dict[str, ModuleType], scale: float, step: Progress) -> dict:
    repeat = _count(1000, scale, 3)
    return mods["report_buffers"].measure_producer(repeat, min(5, repeat), progress=step)


def _wakeup(mods: dict[str, ModuleType], scale: float, step: Progress) -> dict:
    round_trips = _count(1500, scale, 4)
    return mods["report_buffers"].measure_wakeups(round_trips, min(5, round_trips),
                                                  progress=step)


def _transfer(mods: dict[str, ModuleType], scale: float, step: Progress) -> dict:
    return mods["report_buffers"].measure_throughput(_count(200_000, scale, 1000), 3,
                                                     progress=step)


def _kvm(mods: dict[str, ModuleType], scale: float, step: Progress) -> dict:
    report_kvm = mods["report_kvm"]
    reason = report_kvm.kw.kvm_unavailable()
    if reason is not None:
        return {"skipped": f"/dev/kvm cannot be used: {reason}"}
    # Without gcc the Python VMM runs alone; the C VMM's rows say "missing".
    return report_kvm.measure(_count(60_000, scale, 300), 5, progress=step)


_MEASURE: dict[str, Callable[[dict[str, ModuleType], float, Progress], dict]] = {
    "consumer": _consumer, "producer": _producer, "wakeup": _wakeup,
    "transfer": _transfer, "kvm": _kvm,
}


# ---------------------------------------------------------------------------
# The table

# A method's headline figure: the first of these keys it has, and its unit.
_FIGURES = (
    ("best_ns_per_entry", "{:,.1f} ns/entry"),
    ("best_ns_per_write", "{:,.1f} ns/write"),
    ("median_records_per_s", "{:,.0f} records/s"),
    ("median_stores_per_s", "{:,.0f} stores/s"),
    ("best_us_per_ring", "{:,.2f} µs/call"),
    ("best_us_per_call", "{:,.2f} µs/call"),
)


def _figure(method: dict) -> str:
    if method.get("missing"):
        return f"missing: {method['missing']}"
    if "p50_us" in method:
        return f"p50 {method['p50_us']:.1f} µs, p99 {method['p99_us']:.1f} µs"
    for key, fmt in _FIGURES:
        if method.get(key) is not None:
            return fmt.format(method[key])
    return "-"


def _methods(section: dict) -> list[dict]:
    """Every method of a section, in report order (wakeups are per threads/processes)."""
    if "methods" in section:
        return list(section["methods"].values())
    found = []
    for kind in ("threads", "processes"):
        for method in section.get(kind, {}).values():
            found.append({**method, "label": f"{kind}: {method['label']}"})
    return found


def _verdict(r: dict) -> str:
    if r.get("missing"):
        return f"missing: {r['missing']}"
    if r.get("op") is None:
        return "(reference)"
    if r["met"]:
        return "met"
    got, target = r["blocks"], r["target"]
    short = (target - got) / target if r["op"] == ">=" else (got - target) / target
    return f"MISSED by {abs(got - target):.2f}x ({short:.1%})"


def _batch_rows(batches: list[dict]) -> list[str]:
    sizes = sorted({b["entries"] for b in batches})
    labels: dict[str, str] = {}
    cell: dict[tuple[str, int], float] = {}
    for b in batches:
        labels.setdefault(b["method"], b["label"])
        cell[b["method"], b["entries"]] = b["best_ns_per_entry"]
    head = f"    {'ns/entry by batch size':<38}" + "".join(f"{s:>9}" for s in sizes)
    rows = [head]
    for key, label in labels.items():
        rows.append(f"    {label:<38}" + "".join(
            f"{cell[key, s]:>9.1f}" if (key, s) in cell else f"{'-':>9}" for s in sizes))
    return rows


def format_table(report: dict) -> str:
    """The human-readable table ``kvmcoal bench`` prints."""
    meta = report["meta"]
    lines = [f"kvmcoal bench: kvmcoal {meta['kvmcoal']} ({meta['ring_module']}), Python "
             f"{meta['python']}, {meta['machine']}; scale {meta['scale']:g}, "
             f"{meta.get('seconds', 0):.0f} s", ""]
    measured = {name: section for name, section in report["sections"].items()
                if "skipped" not in section}
    width = max((len(m["label"]) for section in measured.values()
                 for m in _methods(section)), default=0)
    ratios: list[dict] = []
    for name, section in report["sections"].items():
        if "skipped" in section:
            lines += [f"{name}: skipped: {section['skipped']}", ""]
            continue
        lines.append(f"{name}:")
        lines += [f"    {m['label']:<{width}}  {_figure(m)}" for m in _methods(section)]
        if section.get("batches"):
            lines += _batch_rows(section["batches"])
        lines.append("")
        ratios += section.get("ratios", ())
    if ratios:
        width = max(len("ratio"), *(len(r["name"]) for r in ratios))
        head = f"{'ratio':<{width}} {'value':>8} {'(range)':>15}  {'target':<8} result"
        lines += [head, "-" * len(head)]
        for r in ratios:
            if r.get("missing"):
                lines.append(f"{r['name']:<{width}} {'-':>8} {'':>15}  {'':<8} {_verdict(r)}")
                continue
            span = f"{r['blocks_min']:.2f}-{r['blocks_max']:.2f}x"
            target = "-" if r.get("op") is None else f"{r['op']} {r['target']:g}x"
            lines.append(f"{r['name']:<{width}} {r['blocks']:>7.2f}x {span:>15}  {target:<8} "
                         f"{_verdict(r)}")
        lines += ["", "value: median over interleaved blocks of the within-block ratio; "
                  "range: lowest to highest block.",
                  "A quick run: for steadier figures run the scripts in benchmarks/ "
                  "(docs/BENCHMARKS.md)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The plot


# The consumer section's methods that are kvmcoal's own (the rest are baselines).
_KVMCOAL_CONSUMERS = frozenset({"drain_into_numpy", "drain_into_bytearray", "drain", "consume",
                                "pop_loop", "iteration"})


def _pyplot() -> ModuleType:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"--plot needs matplotlib (pip install 'kvmcoal[plot]'): {exc}") \
            from None
    return plt


def check_plot_path(path: str | Path, sections: Sequence[str]) -> None:
    """Raise RuntimeError now, before measuring, if :func:`plot` could not write *path*."""
    if "consumer" not in sections and ("kvm" not in sections or _kvm_unusable()):
        raise RuntimeError("nothing to plot: --plot needs the consumer section, or the kvm "
                           "section on a machine where /dev/kvm works")
    plt = _pyplot()
    suffix = Path(path).suffix.lstrip(".").lower()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if suffix not in formats:
        kind = repr(suffix) if suffix else "a file without an extension"
        raise RuntimeError(f"--plot {path}: matplotlib cannot write {kind}; use one of "
                           + ", ".join(f".{f}" for f in sorted(formats)))
    check_output_path(path, "--plot")


def _kvm_unusable() -> str | None:
    from . import kvm
    return kvm.why_unavailable()


# Paths that are this process's standard output: --json writes JSON only there.
_STDOUT_PATHS = ("-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")


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


def plot(report: dict, path: str | Path) -> None:
    """Draw ns/entry per consumer method and batch size, and guest stores/s, into *path*.

    Needs matplotlib (``pip install 'kvmcoal[plot]'``).
    """
    plt = _pyplot()
    sections = report["sections"]
    consumer = sections.get("consumer", {})
    kvm_methods = {key: m for key, m in sections.get("kvm", {}).get("methods", {}).items()
                   if not m.get("missing")}
    panels = [p for p in ("batches", "kvm") if (consumer.get("batches") if p == "batches"
                                                 else kvm_methods)]
    if not panels:
        raise RuntimeError("nothing to plot: run the consumer or kvm section")
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 5.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "batches":
            by_method: dict[str, list[tuple[int, float]]] = {}
            method_labels: dict[str, str] = {}
            for b in consumer["batches"]:
                by_method.setdefault(b["method"], []).append((b["entries"], b["best_ns_per_entry"]))
                method_labels[b["method"]] = b["label"]
            tab20 = plt.get_cmap("tab20")
            for i, (key, points) in enumerate(by_method.items()):
                points.sort()
                # kvmcoal's own methods solid, the baselines dashed.
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        color=tab20(i % 20),
                        linestyle="-" if key in _KVMCOAL_CONSUMERS else "--",
                        label=method_labels[key])
            ax.set_xscale("log")
            ax.set_yscale("log")
            sizes = sorted({b["entries"] for b in consumer["batches"]})
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.minorticks_off()
            ax.set_xlabel("entries per call (batch size)")
            ax.set_ylabel("ns per entry (best)")
            ax.set_title("Consumer cost per entry (solid: kvmcoal, dashed: baselines)")
            ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
            ax.grid(True, which="both", alpha=0.3)
        else:
            runs = [m["label"] for m in kvm_methods.values()]
            rates = [m["median_stores_per_s"] for m in kvm_methods.values()]
            ax.barh(runs, rates, color=["tab:green" if "uncoalesced" not in run else "tab:red"
                                        for run in runs])
            ax.set_xlabel("guest stores per second (median)")
            ax.set_title("Real KVM: coalesced (green) vs not (red)")
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize="small")
    meta = report["meta"]
    fig.suptitle(f"kvmcoal {meta['kvmcoal']}, Python {meta['python']}, {meta['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The command


class _ProgressLine:
    """Progress on stderr: one rewritten line on a terminal, else a line per step."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._start = time.perf_counter()

    def __call__(self, message: str) -> None:
        text = f"[{time.perf_counter() - self._start:5.1f} s] {message}"
        if self._tty:
            self._stream.write(f"\r\033[K{text}")
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty:
            self._stream.write("\r\033[K")
            self._stream.flush()


def main(only: Sequence[str] | None, skip: Sequence[str], scale: float, json_path: str | None,
         plot_path: str | None, check: bool, benchmarks: str | None = None,
         quiet: bool = False) -> int:
    """``kvmcoal bench``'s body; the exit status.

    With *check* it is 1 if a target was missed or could not be judged (a
    section skipped, a peer or the C VMM missing).  Output paths and the
    plot's needs are checked before anything is measured.
    """
    sections = [s for s in (only or SECTIONS) if s not in skip]
    if not sections:
        raise RuntimeError("nothing to run: --only and --skip leave no section")
    if json_path in _STDOUT_PATHS:
        json_path = "-"      # the table would be mixed with the JSON, or truncated by it
    if json_path is not None and json_path != "-":
        check_output_path(json_path, "--json")
    if plot_path is not None:
        check_plot_path(plot_path, sections)
    progress = None if quiet else _ProgressLine(sys.stderr)
    try:
        report = run(sections, scale=scale, benchmarks=benchmarks, progress=progress)
    finally:
        if progress is not None:
            progress.done()
    if json_path == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_table(report))
        if json_path is not None:
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
    if plot_path is not None:
        plot(report, plot_path)
    if not check:
        return 0
    ratios = [r for s in report["sections"].values() for r in s.get("ratios", ())]
    missed = [r["name"] for r in ratios if r.get("met") is False]
    not_judged = [f"{name} section (skipped: {s['skipped']})"
                  for name, s in report["sections"].items() if "skipped" in s]
    not_judged += load_reports(find_benchmarks(benchmarks))["reporting"].unjudged(ratios)
    if not_judged:
        print("kvmcoal bench --check: targets not judged: " + "; ".join(not_judged),
              file=sys.stderr)
    return 1 if missed or not_judged else 0
