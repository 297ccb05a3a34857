"""The wakeup section: wake latency of a sleeping consumer, kvmcoal against a bare eventfd.

Paced round trips in which a producer (a thread, or a subprocess attached
to the buffer by its fds) makes one write while the consumer sleeps, and
the consumer's wake latency is taken: the time from the producer's clock
read just before the write to the consumer's return from its wait.  One
producer serves every mechanism, so the mechanisms compared share the same
threads or processes (and the same CPU placement) and are interleaved
round trip by round trip.

Every round trip is checked twice.  Its data: the wakeup came, and brought
the one write asked for, no more, no other (a failure is a bug: it raises
AssertionError).  Its timing: the write was made while the consumer slept
(t_enter < t0 < t1).  On a busy machine the consumer can be descheduled
for longer than the producer's pacing sleep between asking for the write
and going to sleep; then the write came first and the round trip measured
no wakeup.  That is no bug: the round trip is made again (at the end of
the run), and a mode whose round trips keep failing the check is reported
as unmeasured, with the reason (see reporting.RetryBudget).

The target: kvmcoal's p50 at most 1.2x a bare eventfd's, between threads
and between processes.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvmcoal import CoalescedBuffer, EmulatedVm, Zone

from .reporting import (TIMEOUT_S, Method, Progress, RetryBudget, Section, Unmeasured, noop,
                        percentile, ratio, rotated)

PACE_S = 200e-6                   # the producer sleeps this long before each write
WAKE_ADDR = 0x1000                # the thread harness's zone (EmulatedVm.write mode)
WARMUP_ROUND_TRIPS = 20           # per mode, untimed, not in the figures

THREAD_MODES = {
    "kvmcoal": "Ring.push -> CoalescedBuffer.wait()",
    "eventfd": "os.eventfd_write -> select.select",
    "vm_write": "EmulatedVm.write -> CoalescedBuffer.wait()",
}
PROCESS_MODES = {
    "kvmcoal": "Ring.push (attached) -> CoalescedBuffer.wait()",
    "eventfd": "os.eventfd_write -> select.select",
}
_COMMANDS = {"kvmcoal": b"k", "eventfd": b"e", "vm_write": b"w"}

# One round trip, raw: (mode, t_enter, t0 or None, t1, ready, what was received).
RawTrip = tuple[str, int, Any, int, bool, Any]


def latency_summary(latencies_ns: Sequence[int]) -> dict[str, Any]:
    """p50, p99, min and max of one-way latencies, in µs."""
    s = sorted(latencies_ns)
    return {
        "samples": len(s),
        "p50_us": percentile(s, 50) / 1e3,
        "p99_us": percentile(s, 99) / 1e3,
        "min_us": s[0] / 1e3,
        "max_us": s[-1] / 1e3,
    }


def _start_producer(script: str, fds: tuple[int, ...], *args: str,
                    ) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``python -c script`` and wait until it says it is ready.

    Its arguments are *fds*, then the read end of a "go" pipe and the write
    end of a "ready" pipe, then *args*; all the fds are passed to it.  It
    writes b"r" on the ready pipe once set up.  Returns the process and the
    write end of its go pipe; if it does not start, it is reaped and
    AssertionError is raised.
    """
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    fds = (*fds, go_r, ready_w)
    proc = None
    try:
        try:
            proc = subprocess.Popen([sys.executable, "-c", script, *map(str, fds), *args],
                                    pass_fds=fds)
        finally:
            os.close(go_r)
            os.close(ready_w)
        if os.read(ready_r, 1) != b"r":
            raise AssertionError(f"the producer process failed to start "
                                 f"(exit status {proc.wait(TIMEOUT_S)})")
    except BaseException:
        os.close(go_w)
        if proc is not None:
            _reap(proc)
        raise
    finally:
        os.close(ready_r)
    return proc, go_w


def _reap(proc: subprocess.Popen[bytes]) -> int:
    """Wait for *proc* to exit and return its status; killed (and re-raised) after TIMEOUT_S."""
    try:
        return proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _waiter(buf: CoalescedBuffer) -> tuple[Callable[[float], bool], Callable[[], list[Any]]]:
    """The consumer's (wait, drain) on *buf*, bound once, outside the round trips."""
    return buf.wait, buf.ring.drain


class Wakeups:
    """Paced round trips against one producer; the calling thread is the consumer.

    A round trip: the consumer writes a one-byte command to the producer's
    pipe, takes t_enter and goes to sleep (CoalescedBuffer.wait or
    select.select); the producer reads the command, sleeps PACE_S so the
    consumer is really asleep, takes t0 and makes one write; the consumer
    takes t1 as soon as its wait returns, then empties what it waited on
    (Ring.drain, os.eventfd_read).  The latency is t1 - t0; t0 - t_enter
    (the "lead") shows the consumer had gone to sleep well before the write.

    run() makes a sequence of round trips in a tight loop and checks what
    was received only after the loop.  Keep it that way: how much the
    consumer does between two round trips changes the scheduler's choice of
    whether a woken consumer preempts the producer on the same CPU, and with
    a busier consumer loop the GIL effect described in
    benchmarks/test_wakeup.py (Ring.push holds the GIL across its eventfd
    write) stops showing.

    A subclass sets clock (what t_enter, t0 and t1 are read from) and, in
    __init__, efd (the bare eventfd), _go_w (the command pipe), _waits
    (mode -> the (wait, drain) pair the consumer uses, for every mode but
    eventfd) and _t0 (a one-item list: the slot the producer stores t0 in,
    or [None] where t0 travels with the write).
    """

    modes: dict[str, str] = {}
    clock: Callable[[], int]
    efd: int
    _go_w: int
    _waits: dict[str, tuple[Callable[[float], bool], Callable[[], list[Any]]]]
    _t0: list[Any]

    def __init__(self) -> None:
        self.latencies: dict[str, list[int]] = {m: [] for m in self.modes}
        self.leads: dict[str, list[int]] = {m: [] for m in self.modes}
        self.budgets = {m: RetryBudget() for m in self.modes}
        # mode -> why it could not be measured (its round trips kept failing
        # their timing check); such a mode is left out of every later run.
        self.unmeasured: dict[str, str] = {}
        self._seq = {m: 0 for m in self.modes}
        self._closed = False

    def reset_samples(self) -> None:
        """Forget the figures so far (after a warm-up); an unmeasured mode stays so."""
        for m in self.modes:
            self.latencies[m].clear()
            self.leads[m].clear()
            if m not in self.unmeasured:        # its retries say why it is unmeasured
                self.budgets[m] = RetryBudget()

    def summary(self, mode: str) -> dict[str, Any]:
        out = latency_summary(self.latencies[mode])
        out["min_lead_us"] = min(self.leads[mode]) / 1e3
        out["retried"] = self.budgets[mode].retried
        return out

    def run(self, modes: Sequence[str]) -> int:
        """One valid paced round trip per item of *modes*, in order; returns how many.

        Raises AssertionError if a wakeup did not come, or brought anything
        but the one write that was asked for (a bug, never retried).  A
        round trip whose write was not made while the consumer slept is
        made again after the others; a mode that runs out of retries is put
        in ``unmeasured`` and skipped from then on (not counted).
        """
        pending = [(m, 1) for m in modes if m not in self.unmeasured]
        for m in self.modes:
            self.budgets[m].add(sum(1 for p, _ in pending if p == m))
        taken = 0
        while pending:
            raw = self._loop([mode for mode, _tries in pending])
            again = []
            for (mode, tries), (_mode, t_enter, t0, t1, ready, got) in zip(pending, raw):
                # Data checks: a failure is a bug, raised whatever the machine does.
                if not ready:
                    self._fail(mode, f"no wakeup within {TIMEOUT_S} s")
                t0 = self._check_received(mode, t0, got)
                self._seq[mode] += 1
                # The timing check: the write came while the consumer slept.
                if t_enter < t0 < t1:
                    self.latencies[mode].append(t1 - t0)
                    self.leads[mode].append(t0 - t_enter)
                    taken += 1
                    continue
                if mode in self.unmeasured:
                    continue
                try:
                    self.budgets[mode].again(
                        tries, f"t0={t0} is not between the consumer's t_enter={t_enter} and "
                               f"t1={t1}: the write was not made while it slept")
                except Unmeasured as exc:
                    self.unmeasured[mode] = str(exc)
                else:
                    again.append((mode, tries + 1))
            pending = [(mode, tries) for mode, tries in again if mode not in self.unmeasured]
        return taken

    def _loop(self, modes: list[str]) -> list[RawTrip]:
        """The round trips, raw: (mode, t_enter, t0 or None, t1, ready, got) each."""
        write, go, commands = os.write, self._go_w, _COMMANDS
        clock, stamp = self.clock, self._t0
        select_, efd, eventfd_read = select.select, self.efd, os.eventfd_read
        waits = self._waits
        raw: list[RawTrip] = []
        append = raw.append
        for mode in modes:
            write(go, commands[mode])
            if mode == "eventfd":
                t_enter = clock()
                ready = bool(select_([efd], [], [], TIMEOUT_S)[0])
                t1 = clock()
                got: Any = eventfd_read(efd) if ready else None
            else:
                wait, drain = waits[mode]
                t_enter = clock()
                ready = wait(TIMEOUT_S)
                t1 = clock()
                got = drain()
            append((mode, t_enter, stamp[0], t1, ready, got))
            if not ready:
                break
        return raw

    def _check_received(self, mode: str, t0: Any, got: Any) -> int:
        """Check what one round trip received; return its t0."""
        raise NotImplementedError

    def _fail(self, mode: str, what: str) -> None:
        raise AssertionError(f"{mode}: {what}")

    def __enter__(self) -> Wakeups:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class ThreadWakeups(Wakeups):
    """Producer thread, consumer = the calling thread; time.perf_counter_ns.

    Modes: kvmcoal (Ring.push of one entry into a CoalescedBuffer, the
    consumer in buf.wait()), eventfd (os.eventfd_write on a bare eventfd,
    the consumer in select.select then os.eventfd_read) and vm_write
    (EmulatedVm.write into a zone bound to a buffer, which runs the ring's
    producer with the GIL released).  The producer stores t0 in a shared
    slot just before the write, the same way in every mode; the consumer
    reads it after t1.
    """

    modes = THREAD_MODES
    clock = staticmethod(time.perf_counter_ns)

    def __init__(self, pace: float = PACE_S) -> None:
        super().__init__()
        self.pace = pace
        self.buf = CoalescedBuffer()
        self.vm = EmulatedVm()
        self.vm_buf = self.vm.create_coalesced_buffer()
        self.vm.register_coalesced_mmio2(Zone(WAKE_ADDR, 8), self.vm_buf)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._go_r, self._go_w = os.pipe()
        self._waits = {"kvmcoal": _waiter(self.buf), "vm_write": _waiter(self.vm_buf)}
        self._t0 = [0]
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._producer, name="wake-producer", daemon=True)
        self._thread.start()

    def _producer(self) -> None:
        read, go, sleep, pace = os.read, self._go_r, time.sleep, self.pace
        clock, t0 = self.clock, self._t0
        push, write = self.buf.ring.push, self.vm.write
        eventfd_write, efd = os.eventfd_write, self.efd
        seq_k = seq_w = 0
        try:
            while True:
                cmd = read(go, 1)
                if cmd == b"k":
                    data = seq_k.to_bytes(8, "little")
                    seq_k += 1
                    sleep(pace)
                    t0[0] = clock()
                    ok = push(WAKE_ADDR, data)
                elif cmd == b"e":
                    sleep(pace)
                    t0[0] = clock()
                    eventfd_write(efd, 1)
                    ok = True
                elif cmd == b"w":
                    data = seq_w.to_bytes(8, "little")
                    seq_w += 1
                    sleep(pace)
                    t0[0] = clock()
                    ok = write(WAKE_ADDR, data)
                else:
                    return
                if not ok:
                    raise AssertionError(f"the producer's write was refused (command {cmd!r})")
        except BaseException as exc:  # reported by the consumer, which would time out
            self._error = exc

    def _check_received(self, mode: str, t0: Any, got: Any) -> int:
        if mode == "eventfd":
            if got != 1:
                self._fail(mode, f"the eventfd counted {got} writes, not 1")
        else:
            seq = self._seq[mode]
            if [(e.phys_addr, e.value) for e in got] != [(WAKE_ADDR, seq)]:
                self._fail(mode, f"expected the one write #{seq}, got {got}")
        return int(t0)

    def _fail(self, mode: str, what: str) -> None:
        if self._error is not None:
            raise AssertionError(f"{mode}: the producer thread failed") from self._error
        super()._fail(mode, what)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._go_w, b"q")
        self._thread.join(TIMEOUT_S)
        alive = self._thread.is_alive()
        os.close(self._go_w)
        os.close(self._go_r)
        os.close(self.efd)
        self.buf.close()
        self.vm.close()
        if alive:
            raise AssertionError("the producer thread did not stop")
        if self._error is not None:
            raise AssertionError("the producer thread failed") from self._error


WAKE_PRODUCER = textwrap.dedent("""
    import os, sys, time
    from kvmcoal import CoalescedBuffer
    memfd, ring_efd, efd, go, ready = map(int, sys.argv[1:6])
    pace = float(sys.argv[6])
    buf = CoalescedBuffer.attach(memfd, ring_efd)
    push, eventfd_write = buf.ring.push, os.eventfd_write
    read, sleep, clock = os.read, time.sleep, time.monotonic_ns
    seq = 0
    os.write(ready, b"r")
    while True:
        cmd = read(go, 1)
        if cmd == b"k":
            data = seq.to_bytes(8, "little")
            seq += 1
            sleep(pace)
            if not push(clock(), data):        # t0 rides in the entry's phys_addr
                sys.exit("push refused a write into an empty ring")
        elif cmd == b"e":
            sleep(pace)
            eventfd_write(efd, clock())        # t0 rides in the eventfd's counter
        else:
            break
""")


class ProcessWakeups(Wakeups):
    """Producer subprocess (attached by fds), consumer = this process; time.monotonic_ns.

    Modes: kvmcoal (the subprocess attaches to a CoalescedBuffer with
    CoalescedBuffer.attach(memfd, eventfd) and pushes one entry; the
    consumer sleeps in buf.wait()) and eventfd (os.eventfd_write on a bare
    eventfd; select.select then os.eventfd_read).  CLOCK_MONOTONIC is
    system-wide, so t0 travels with the write: in the entry's phys_addr
    (an int, so no encoding sits between the clock read and the push; data
    carries the sequence number, prepared before the pacing sleep) and in
    the eventfd's counter (which the consumer's read returns; two writes
    would read as their sum, far past t1).
    """

    modes = PROCESS_MODES
    clock = staticmethod(time.monotonic_ns)

    def __init__(self, pace: float = PACE_S) -> None:
        super().__init__()
        self.buf = CoalescedBuffer()
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._waits = {"kvmcoal": _waiter(self.buf)}
        self._t0 = [None]                # t0 comes with what the consumer receives
        memfd, ring_efd = self.buf.fds()
        try:
            self._proc, self._go_w = _start_producer(WAKE_PRODUCER, (memfd, ring_efd, self.efd),
                                                     repr(pace))
        except BaseException:
            os.close(self.efd)
            self.buf.close()
            raise

    def _check_received(self, mode: str, t0: Any, got: Any) -> int:
        if mode == "eventfd":
            return int(got)             # t0; run() checks it lies between t_enter and t1
        seq = self._seq[mode]
        if len(got) != 1 or got[0].value != seq:
            self._fail(mode, f"expected the one write #{seq}, got {got}")
        return int(got[0].phys_addr)

    def _fail(self, mode: str, what: str) -> None:
        status = self._proc.poll()
        if status is not None:
            what += f" (the producer process exited with status {status})"
        super()._fail(mode, what)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._go_w, b"q")
        except BrokenPipeError:
            pass
        os.close(self._go_w)
        try:
            status = _reap(self._proc)
        finally:
            os.close(self.efd)
            self.buf.close()
        if status != 0:
            raise AssertionError(f"the producer process exited with status {status}")


HARNESSES: dict[str, Callable[[], Wakeups]] = {"threads": ThreadWakeups,
                                               "processes": ProcessWakeups}


def measure(round_trips: int, blocks: int, progress: Progress | None = None,
            harnesses: dict[str, Callable[[], Wakeups]] | None = None) -> Section:
    """p50 and p99 wake latency of every mode, threads then processes; figures and ratios.

    Each of *blocks* blocks makes round_trips // blocks round trips per
    mode, the modes alternating (rotated from round trip to round trip);
    the ratios' "blocks" figure is the median over blocks of the
    within-block ratio.  A mode whose round trips kept failing their
    timing check is reported with "unmeasured" (the reason), and so is
    every ratio that needs it.
    """
    say = progress or noop
    per_block = max(1, round_trips // blocks)
    out: Section = {"caption": [
        f"one write, consumer asleep (the producer sleeps {PACE_S * 1e6:.0f} µs first); "
        f"{per_block * blocks} round trips per mechanism in {blocks} blocks, mechanisms "
        "alternating;",
        "lead: the least time from the consumer entering its wait to the write; retried: "
        "round trips made again (the write came before the consumer slept)"],
        "pace_us": PACE_S * 1e6, "round_trips": per_block * blocks, "blocks": blocks,
        "ratios": []}
    for kind, make in (harnesses or HARNESSES).items():
        say(f"wake latency, {kind}: {round_trips} round trips per mechanism")
        with make() as h:
            modes = list(h.modes)
            h.run(modes * WARMUP_ROUND_TRIPS)
            h.reset_samples()
            block_p50: dict[str, list[float]] = {m: [] for m in modes}
            block_p99: dict[str, list[float]] = {m: [] for m in modes}
            for b in range(blocks):
                start = {m: len(h.latencies[m]) for m in modes}
                h.run([mode for i in range(per_block) for mode in rotated(modes, b + i)])
                for m in modes:
                    if m in h.unmeasured:
                        continue
                    s = sorted(h.latencies[m][start[m]:])
                    block_p50[m].append(percentile(s, 50))
                    block_p99[m].append(percentile(s, 99))
            got: dict[str, Method] = {}
            for m in modes:
                if m in h.unmeasured:
                    got[m] = {"label": h.modes[m], "unmeasured": h.unmeasured[m],
                              "retried": h.budgets[m].retried}
                else:
                    got[m] = {"label": h.modes[m], **h.summary(m)}
            out[kind] = got
        out["ratios"] += [
            ratio(f"wake p50, {kind}: kvmcoal / eventfd", got, "kvmcoal", "eventfd", block_p50,
                  "<=", 1.2, pooled={"pooled": "p50_us"}),
            ratio(f"wake p99, {kind}: kvmcoal / eventfd", got, "kvmcoal", "eventfd", block_p99,
                  pooled={"pooled": "p99_us"}),
        ]
        if "vm_write" in modes:
            out["ratios"].append(ratio(f"wake p50, {kind}: vm.write / eventfd", got, "vm_write",
                                       "eventfd", block_p50, pooled={"pooled": "p50_us"}))
    return out
