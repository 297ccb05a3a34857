"""kvmcoal bench: the headline benchmark comparisons, measured on this machine.

Each section times kvmcoal against its baselines, checks that every timed
call really did its work (every entry, record or store delivered, once, in
order), and prints each figure and each ratio to its baseline with the
target kvmcoal sets itself and the verdict.  At the default scale the whole
run takes under a minute on 2 CPUs; for steadier figures raise the counts
with --scale and the interleaved blocks with --blocks, one section at a
time (docs/BENCHMARKS.md gives the commands).

Sections (--only, --skip):

  consumer  draining a full ring and batches of 1, 8 and 64 entries with
            drain_into, drain, consume, pop and iteration, against
            pure-Python baselines, a C consumer and a plain Python loop
            calling the handler as often
  producer  EmulatedVm.write against Ring.push on the same ring
  router    the v2 router moving entries from the kernel ring into buffers
            (one buffer, two alternating, a buffer and Vm.ring's), against
            drain_into of the same entries
  bus       a Bus with 1 and 500 own-buffer devices: reads and empty
            flushes, against len() of every ring; delivery to a Python
            device, against a plain loop calling it; the poller threads
  wakeup    producer write to consumer return from wait(), against a bare
            eventfd and select, between threads and between processes
  transfer  24-byte records between processes and threads, against
            multiprocessing.Queue, os.pipe, faster-fifo and pyzmq
  kvm       a real guest on /dev/kvm storing N times, coalesced or not,
            through the Python run loop and through a small C VMM
  doorbell  a real guest's doorbell write to its poller's wake-up, with the
            router's watcher, against a bare eventfd wake-up; the watcher's
            CPU use
  sandbox   a device model in another process fed by the router, against
            one message per guest access over a Unix socket

A section or a row that cannot run here (no /dev/kvm, no C compiler,
numpy or a peer not installed) is reported as skipped or missing, with the
reason.  A figure whose samples keep failing their own timing check (a busy
machine) is reported as unmeasured, with the reason.  Nothing is dropped
silently, and --check counts both as not judged.  The C yardsticks are
compiled on first use into ~/.cache/kvmcoal/bench ($XDG_CACHE_HOME).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO

from .reporting import (STDOUT_PATHS, InvalidSample, Progress, Report, Section, Unmeasured,
                        check_messages, check_output_path, environment, format_table, judge,
                        noop, write_json)

__all__ = ["SECTIONS", "run", "main", "format_table"]

SECTIONS = ("consumer", "producer", "router", "bus", "wakeup", "transfer", "kvm", "doorbell",
            "sandbox")


def _count(base: int, scale: float, least: int = 1) -> int:
    return max(least, round(base * scale))


def _blocks(blocks: int | None, default: int, count: int) -> int:
    return min(default if blocks is None else blocks, count)


def _consumer(scale: float, blocks: int | None, say: Progress) -> Section:
    from . import consumer
    repeat = _count(3000, scale, 5)
    return consumer.measure(repeat, _blocks(blocks, 10, repeat), progress=say)


def _producer(scale: float, blocks: int | None, say: Progress) -> Section:
    from . import producer
    repeat = _count(1000, scale, 3)
    return producer.measure(repeat, _blocks(blocks, 5, repeat), progress=say)


def _router(scale: float, blocks: int | None, say: Progress) -> Section:
    from . import router
    repeat = _count(1000, scale, 4)
    return router.measure(repeat, _blocks(blocks, 5, repeat), progress=say)


def _bus(scale: float, blocks: int | None, say: Progress) -> Section:
    from . import bus
    repeat = _count(300, scale, 4)
    return bus.measure(repeat, _blocks(blocks, 5, repeat), progress=say)


def _wakeup(scale: float, blocks: int | None, say: Progress) -> Section:
    from . import wakeup
    round_trips = _count(1500, scale, 4)
    return wakeup.measure(round_trips, _blocks(blocks, 5, round_trips), progress=say)


def _transfer(scale: float, blocks: int | None, say: Progress) -> Section:
    from . import transfer
    return transfer.measure(_count(200_000, scale, 1000), 3 if blocks is None else blocks,
                            progress=say)


def _on_kvm(module: str, count: int, least: int,
            blocks: int) -> Callable[[float, int | None, Progress], Section]:
    """A section that needs /dev/kvm: *count* scaled (at least *least*), *blocks* by default."""
    def measure(scale: float, blocks_: int | None, say: Progress) -> Section:
        import importlib

        from kvmcoal import kvm
        reason = kvm.why_unavailable()
        if reason is not None:
            return {"skipped": f"/dev/kvm cannot be used: {reason}"}
        section = importlib.import_module(f"{__name__}.{module}")
        return section.measure(_count(count, scale, least),
                               blocks if blocks_ is None else blocks_, progress=say)
    return measure


# Without gcc the kvm section's Python VMM runs alone; the C VMM's rows say "missing".
_kvm = _on_kvm("vmm", 60_000, 300, 5)
_doorbell = _on_kvm("doorbell", 300, 20, 3)
_sandbox = _on_kvm("sandbox", 30_000, 300, 3)


_MEASURE: dict[str, Callable[[float, int | None, Progress], Section]] = {
    "consumer": _consumer, "producer": _producer, "router": _router, "bus": _bus,
    "wakeup": _wakeup,
    "transfer": _transfer, "kvm": _kvm, "doorbell": _doorbell, "sandbox": _sandbox,
}


def run(sections: Iterable[str] = SECTIONS, *, scale: float = 1.0, blocks: int | None = None,
        progress: Progress | None = None) -> Report:
    """Run the benchmark *sections*; the report (what --json writes).

    *scale* multiplies every repeat and record count (1.0: under a minute
    on a 2-CPU machine); *blocks*, if given, is every section's
    number of interleaved blocks.  The report has "meta" (the environment,
    the scale, the seconds it took) and "sections": each section's figures
    and "ratios" (each with name, op, target, blocks and met), or
    {"skipped": reason}.  A figure that could not be measured validly has
    "unmeasured" (the reason), and so has every ratio that needs it, with
    met None.
    """
    say = progress or noop
    names = list(sections)
    for name in names:
        if name not in SECTIONS:
            raise ValueError(f"unknown section {name!r}: choose from {', '.join(SECTIONS)}")
    started = time.perf_counter()
    out: Report = {"meta": {**environment(), "scale": scale, "blocks": blocks}, "sections": {}}
    for name in names:
        say(f"{name}: starting")      # the sections' own messages name their stage
        try:
            out["sections"][name] = _MEASURE[name](scale, blocks, say)
        except (Unmeasured, InvalidSample) as exc:
            # A timing check that no method caught: the whole section is unmeasured.
            out["sections"][name] = {"unmeasured": str(exc)}
    out["meta"]["seconds"] = time.perf_counter() - started
    return out


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
         plot_path: str | None, check: bool, quiet: bool = False,
         blocks: int | None = None) -> int:
    """kvmcoal bench's body; the exit status.

    With *check* it is 1 if a target was missed or could not be judged (a
    section skipped, a method missing or unmeasured), and stderr names
    them.  Output paths and the plot's needs are checked before anything is
    measured.
    """
    sections = [s for s in (only or SECTIONS) if s not in skip]
    if not sections:
        raise RuntimeError("nothing to run: --only and --skip leave no section")
    if blocks is not None and blocks < 1:
        raise ValueError("--blocks must be at least 1")
    if json_path in STDOUT_PATHS:
        json_path = "-"      # the table would be mixed with the JSON, or truncated by it
    if json_path is not None and json_path != "-":
        check_output_path(json_path, "--json")
    if plot_path is not None:
        from .plot import check_plot_path
        check_plot_path(plot_path, sections)
    progress = None if quiet else _ProgressLine(sys.stderr)
    try:
        report = run(sections, scale=scale, blocks=blocks, progress=progress)
    finally:
        if progress is not None:
            progress.done()
    if json_path != "-":
        print(format_table(report))
    if json_path is not None:
        write_json(report, json_path)
    if plot_path is not None:
        from .plot import plot
        plot(report, plot_path)
    if not check:
        return 0
    missed, not_judged = judge(report)
    for line in check_messages(missed, not_judged):
        print(line, file=sys.stderr)
    return 1 if missed or not_judged else 0
