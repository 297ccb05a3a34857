"""The workloads shared by the buffer benchmarks and ``report_buffers.py``.

Three scenarios, each with its correctness checks built in, so a benchmark
that silently does nothing cannot produce a figure:

* :class:`ProducerWorkload`: a batch of 4-byte writes into a zone bound to a
  1 MiB :class:`~kvmcoal.CoalescedBuffer`, through ``EmulatedVm.write`` or
  ``Ring.push`` on the same ring; the ring is reset between batches,
  outside the timing.
* :class:`ThreadWakeups` and :class:`ProcessWakeups`: paced round trips in
  which a producer (a thread, or a subprocess attached to the buffer by its
  fds) makes one write while the consumer sleeps, and the consumer's wake
  latency is taken.  One producer serves every mechanism, so the
  mechanisms compared share the same threads or processes (and the same
  CPU placement) and can be interleaved round trip by round trip.
* :class:`KvmcoalTransfer` and :class:`QueueTransfer`: a producer subprocess
  sends *N* 24-byte records to this process, through a ring or a
  ``multiprocessing.Queue``; the records are checked, all of them, in order.

Knobs (environment): ``KVMCOAL_BENCH_PRODUCER_ROUNDS`` (default 1000),
``KVMCOAL_BENCH_ROUND_TRIPS`` (default 2000), ``KVMCOAL_BENCH_RECORDS``
(default 200000).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import select
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import kvmcoal
from kvmcoal import CoalescedBuffer, EmulatedVm, Zone

# Timed calls per producer benchmark (each call makes PRODUCER_BATCH writes).
PRODUCER_ROUNDS = int(os.environ.get("KVMCOAL_BENCH_PRODUCER_ROUNDS", "1000"))
# Paced round trips per wake-latency benchmark.
ROUND_TRIPS = int(os.environ.get("KVMCOAL_BENCH_ROUND_TRIPS", "2000"))
# Records per cross-process transfer.
RECORDS = int(os.environ.get("KVMCOAL_BENCH_RECORDS", "200000"))
# Records per transfer when pytest-benchmark is disabled (smoke runs).
SMOKE_RECORDS = 5000

PRODUCER_BATCH = 4096             # writes per timed producer call
PRODUCER_RING_BYTES = 1 << 20     # 43689 entries: a batch fits ten times over
PRODUCER_DATA = b"\x2a\x00\x00\x00"
ZONE_BASE = 0xFE00_0000

PACE_S = 200e-6                   # the producer sleeps this long before each write
TIMEOUT_S = 30.0                  # no single wait in these benchmarks should come close

ENTRY = struct.Struct("<QII8s")   # the ring's 24-byte record: phys_addr, len, pio, data


# (test id, latency summary) of each timed wake-latency benchmark in this
# pytest session, printed by conftest.py's terminal summary: pytest-benchmark's
# own table shows the time of each block of round trips, not the latencies.
WAKE_FIGURES: list[tuple[str, dict]] = []


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    """The *q*-th percentile (0-100) of sorted values, interpolating linearly."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary(latencies_ns: list[int]) -> dict:
    """p50, p99, min and max of one-way latencies, in µs."""
    s = sorted(latencies_ns)
    return {
        "samples": len(s),
        "p50_us": percentile(s, 50) / 1e3,
        "p99_us": percentile(s, 99) / 1e3,
        "min_us": s[0] / 1e3,
        "max_us": s[-1] / 1e3,
    }


def _start_producer(script: str, fds: tuple[int, ...], *args: str) -> tuple[subprocess.Popen, int]:
    """Start ``python -c script`` and wait until it says it is ready.

    Its arguments are *fds*, then the read end of a "go" pipe and the write
    end of a "ready" pipe, then *args*; all the fds are passed to it.  It
    writes ``b"r"`` on the ready pipe once set up.  Returns the process and
    the write end of its go pipe; if it does not start, it is reaped and
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


def _reap(proc: subprocess.Popen) -> int:
    """Wait for *proc* to exit and return its status; killed (and re-raised) after TIMEOUT_S."""
    try:
        return proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


# --------------------------------------------------------------------------
# 1. The producer path
# --------------------------------------------------------------------------

class ProducerWorkload:
    """PRODUCER_BATCH 4-byte writes into a zone whose ring is a 1 MiB buffer.

    ``vm_write_batch`` (``EmulatedVm.write``) and ``ring_push_batch``
    (``Ring.push``) make the same writes, to the same addresses, into the
    same ring, in the same plain ``for`` loop; ``empty_loop`` is that loop
    alone.  ``reset`` is the untimed setup before each call: it checks that
    the previous call published exactly one batch (``first == 0``, ``last ==
    PRODUCER_BATCH``), then empties the ring.  Nothing consumes the ring, so
    its wakeup stays signalled and neither path makes the eventfd system
    call in the timed region (it happens once, at the very first write).
    """

    def __init__(self, batch: int = PRODUCER_BATCH, ring_bytes: int = PRODUCER_RING_BYTES) -> None:
        self.vm = EmulatedVm()
        self.buf = self.vm.create_coalesced_buffer(size=ring_bytes)
        self.ring = self.buf.ring
        if batch > self.ring.capacity:
            raise ValueError(f"a batch of {batch} does not fit a ring of {self.ring.capacity}")
        self.batch = batch
        self.vm.register_coalesced_mmio2(Zone(ZONE_BASE, 4 * batch), self.buf)
        self.addrs = [ZONE_BASE + 4 * i for i in range(batch)]
        self.data = PRODUCER_DATA
        self.expected = b"".join(ENTRY.pack(a, 4, 0, self.data) for a in self.addrs)
        self.resets = 0
        self._armed = False

    def vm_write_batch(self) -> None:
        write, data = self.vm.write, self.data
        for addr in self.addrs:
            write(addr, data)

    def ring_push_batch(self) -> None:
        push, data = self.ring.push, self.data
        for addr in self.addrs:
            push(addr, data)

    def empty_loop(self) -> None:
        for _addr in self.addrs:
            pass

    def check_batch(self) -> None:
        """The ring holds exactly one batch, from slot 0 (i.e. the last call wrote it all)."""
        first, last = self.ring.first, self.ring.last
        if (first, last) != (0, self.batch):
            raise AssertionError(f"the timed call left first={first} last={last}, not one "
                                 f"batch of {self.batch} writes from slot 0")

    def reset(self) -> None:
        """Untimed setup: check the previous timed call, then empty the ring."""
        if self._armed:
            self.check_batch()
        self.ring.reset()
        self._armed = True
        self.resets += 1

    def check_contents(self) -> None:
        """Untimed: every write of the last batch is in the ring, in order, byte for byte."""
        self.check_batch()
        memfd, _ = self.buf.fds()
        got = os.pread(memfd, len(self.expected), kvmcoal.RING_HEADER_SIZE)
        assert got == self.expected, "the ring does not hold the batch's writes"

    def check_each_path(self) -> None:
        """Untimed: both paths accept every write of a batch and record it exactly."""
        for name, one in (("EmulatedVm.write", self.vm.write), ("Ring.push", self.ring.push)):
            self.ring.reset()
            for addr in self.addrs:
                if one(addr, self.data) is not True:
                    raise AssertionError(f"{name} refused a write at {addr:#x}")
            self.check_contents()
        assert self.vm.write(ZONE_BASE + 4 * self.batch, self.data) is False  # outside the zone
        self.ring.reset()
        self._armed = False

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> ProducerWorkload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# 2. Wake latency
# --------------------------------------------------------------------------

WAKE_ADDR = 0x1000                # the thread harness's zone (EmulatedVm.write mode)

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


def _waiter(buf: CoalescedBuffer) -> tuple:
    """The consumer's (wait, drain) on *buf*, bound once, outside the round trips."""
    return buf.wait, buf.ring.drain


class _Wakeups:
    """Paced round trips against one producer; the calling thread is the consumer.

    A round trip: the consumer writes a one-byte command to the producer's
    pipe, takes ``t_enter`` and goes to sleep (``CoalescedBuffer.wait`` or
    ``select.select``); the producer reads the command, sleeps PACE_S so the
    consumer is really asleep, takes ``t0`` and makes one write; the consumer
    takes ``t1`` as soon as its wait returns, then empties what it waited on
    (``Ring.drain``, ``os.eventfd_read``).  The latency is ``t1 - t0``;
    ``t0 - t_enter`` (the "lead") shows the consumer had gone to sleep well
    before the write.

    :meth:`run` makes a sequence of round trips in a tight loop and checks
    what was received only after the loop.  Keep it that way: how much the
    consumer does between two round trips changes the scheduler's choice of
    whether a woken consumer preempts the producer on the same CPU, and with
    a busier consumer loop the GIL effect described in ``test_wakeup.py``
    (``Ring.push`` holds the GIL across its eventfd ``write``) stops showing.

    A subclass sets ``clock`` (what ``t_enter``, ``t0`` and ``t1`` are read
    from) and, in ``__init__``, ``efd`` (the bare eventfd), ``_go_w`` (the
    command pipe), ``_waits`` (mode -> the ``(wait, drain)`` pair the
    consumer uses, for every mode but ``eventfd``) and ``_t0`` (a one-item
    list: the slot the producer stores ``t0`` in, or ``[None]`` where ``t0``
    travels with the write).
    """

    modes: dict[str, str] = {}
    clock: Callable[[], int]

    def __init__(self) -> None:
        self.latencies: dict[str, list[int]] = {m: [] for m in self.modes}
        self.leads: dict[str, list[int]] = {m: [] for m in self.modes}
        self._seq = {m: 0 for m in self.modes}
        self._closed = False

    def reset_samples(self) -> None:
        for m in self.modes:
            self.latencies[m].clear()
            self.leads[m].clear()

    def summary(self, mode: str) -> dict:
        out = latency_summary(self.latencies[mode])
        out["min_lead_us"] = min(self.leads[mode]) / 1e3
        return out

    def run(self, modes: list[str]) -> int:
        """One paced round trip per item of *modes*, in order; returns how many.

        Raises AssertionError (after the loop) if a wakeup did not come, or
        brought anything but the one write that was asked for.
        """
        raw = self._loop(modes)
        for mode, t_enter, t0, t1, ready, got in raw:
            if not ready:
                self._fail(mode, f"no wakeup within {TIMEOUT_S} s")
            t0 = self._check_received(mode, t0, got)
            if not t_enter < t0 < t1:
                self._fail(mode, f"t0={t0} is not between the consumer's t_enter={t_enter} "
                                 f"and t1={t1}: not one write made while it slept")
            self._seq[mode] += 1
            self.latencies[mode].append(t1 - t0)
            self.leads[mode].append(t0 - t_enter)
        return len(raw)

    def _loop(self, modes: list[str]) -> list[tuple]:
        """The round trips, raw: (mode, t_enter, t0 or None, t1, ready, got) each."""
        write, go, commands = os.write, self._go_w, _COMMANDS
        clock, stamp = self.clock, self._t0
        select_, efd, eventfd_read = select.select, self.efd, os.eventfd_read
        waits = self._waits
        raw: list[tuple] = []
        append = raw.append
        for mode in modes:
            write(go, commands[mode])
            if mode == "eventfd":
                t_enter = clock()
                ready = select_([efd], [], [], TIMEOUT_S)[0]
                t1 = clock()
                got = eventfd_read(efd) if ready else None
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

    def _check_received(self, mode: str, t0: int, got: object) -> int:
        """Check what one round trip received; return its t0."""
        raise NotImplementedError

    def _fail(self, mode: str, what: str) -> None:
        raise AssertionError(f"{mode}: {what}")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class ThreadWakeups(_Wakeups):
    """Producer thread, consumer = the calling thread; time.perf_counter_ns.

    Modes: ``kvmcoal`` (``Ring.push`` of one entry into a CoalescedBuffer,
    the consumer in ``buf.wait()``), ``eventfd`` (``os.eventfd_write`` on a
    bare eventfd, the consumer in ``select.select`` then ``os.eventfd_read``)
    and ``vm_write`` (``EmulatedVm.write`` into a zone bound to a buffer,
    which runs the ring's producer with the GIL released).  The producer
    stores ``t0`` in a shared slot just before the write, the same way in
    every mode; the consumer reads it after ``t1``.
    """

    modes = THREAD_MODES
    clock = time.perf_counter_ns

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

    def _check_received(self, mode: str, t0: int, got: object) -> int:
        if mode == "eventfd":
            if got != 1:
                self._fail(mode, f"the eventfd counted {got} writes, not 1")
        else:
            seq = self._seq[mode]
            if [(e.phys_addr, e.value) for e in got] != [(WAKE_ADDR, seq)]:
                self._fail(mode, f"expected the one write #{seq}, got {got}")
        return t0

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


class ProcessWakeups(_Wakeups):
    """Producer subprocess (attached by fds), consumer = this process; time.monotonic_ns.

    Modes: ``kvmcoal`` (the subprocess attaches to a CoalescedBuffer with
    ``CoalescedBuffer.attach(memfd, eventfd)`` and pushes one entry; the
    consumer sleeps in ``buf.wait()``) and ``eventfd`` (``os.eventfd_write``
    on a bare eventfd; ``select.select`` then ``os.eventfd_read``).
    CLOCK_MONOTONIC is system-wide, so ``t0`` travels with the write: in the
    entry's ``phys_addr`` (an int, so no encoding sits between the clock
    read and the push; ``data`` carries the sequence number, prepared before
    the pacing sleep) and in the eventfd's counter (which the consumer's
    read returns; two writes would read as their sum, far past ``t1``).
    """

    modes = PROCESS_MODES
    clock = time.monotonic_ns

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

    def _check_received(self, mode: str, t0: object, got: object) -> int:
        if mode == "eventfd":
            return got                  # t0; run() checks it lies between t_enter and t1
        seq = self._seq[mode]
        if len(got) != 1 or got[0].value != seq:
            self._fail(mode, f"expected the one write #{seq}, got {got}")
        return got[0].phys_addr

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


# --------------------------------------------------------------------------
# 3. Cross-process throughput of 24-byte records
# --------------------------------------------------------------------------

def record(i: int) -> bytes:
    """Record *i*: the ring's 24-byte ABI record of an 8-byte write of *i* at address *i*."""
    return ENTRY.pack(i, 8, 0, i.to_bytes(8, "little"))


@functools.lru_cache(maxsize=4)
def expected_stream(n: int) -> bytes:
    """Records 0 to n - 1, back to back: what every transfer must deliver."""
    return b"".join(record(i) for i in range(n))


TRANSFER_PRODUCER = textwrap.dedent("""
    import os, sys
    from kvmcoal import CoalescedBuffer
    memfd, efd, go, ready, n = map(int, sys.argv[1:6])
    buf = CoalescedBuffer.attach(memfd, efd)
    push, yield_ = buf.ring.push, os.sched_yield
    datas = [i.to_bytes(8, "little") for i in range(n)]
    os.write(ready, b"r")
    if os.read(go, 1) != b"g":
        sys.exit("no go")
    for i, data in enumerate(datas):
        while not push(i, data):               # the ring is full: let the consumer run
            yield_()
""")


class KvmcoalTransfer:
    """*records* records through a CoalescedBuffer ring, from a producer subprocess.

    The producer attaches to the buffer by its fds, builds its data, says it
    is ready and waits for "go".  ``prepare`` (untimed) checks and reaps the
    previous transfer and starts a producer; ``run`` (timed) sends "go" and
    receives every record: the consumer sleeps in ``buf.wait()`` whenever
    the ring is empty and drains with ``Ring.drain_into`` straight into one
    preallocated bytearray; ``finish`` (untimed) checks that the bytearray
    holds records 0 to N - 1, byte for byte, and that the producer exited 0.
    """

    def __init__(self, records: int = RECORDS, ring_bytes: int | None = None) -> None:
        self.records = records
        self.buf = CoalescedBuffer(ring_bytes)
        self.expected = expected_stream(records)
        self.transfers = 0          # checked and reaped
        self.batches = 0            # drain_into calls of the last run
        self._proc: subprocess.Popen | None = None
        self._go_w = -1
        self._out = bytearray()
        self._got = 0

    @property
    def label(self) -> str:
        return f"kvmcoal, {self.buf.size}-byte ring ({self.buf.ring.capacity} entries)"

    def prepare(self) -> None:
        self.finish()
        self._out = bytearray(len(self.expected))
        self._got = 0
        self._proc, self._go_w = _start_producer(TRANSFER_PRODUCER, self.buf.fds(),
                                                 str(self.records))

    def run(self) -> int:
        """Timed: start the producer and receive every record; returns how many."""
        n = self.records
        wait, drain_into = self.buf.wait, self.buf.ring.drain_into
        out = memoryview(self._out)
        got = batches = 0
        os.write(self._go_w, b"g")
        while got < n:
            if not wait(TIMEOUT_S):
                raise AssertionError(f"the producer stalled after {got} of {n} records "
                                     f"(status {self._proc.poll()})")
            got += drain_into(out[got * 24:])
            batches += 1
        out.release()
        self._got = got
        self.batches = batches
        return got

    def finish(self) -> None:
        """Check the last transfer (every record, in order) and reap its producer."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        os.close(self._go_w)
        status = _reap(proc)
        assert status == 0, f"the producer process exited with status {status}"
        assert self._got == self.records, f"received {self._got} of {self.records} records"
        assert len(self.buf.ring) == 0, "records left in the ring after the transfer"
        if self._out != self.expected:
            view = memoryview(self._out).cast("Q")
            bad = next(k for k in range(self.records) if view[3 * k] != k or view[3 * k + 2] != k)
            raise AssertionError(f"record {bad} is wrong or out of order: phys_addr "
                                 f"{view[3 * bad]}, data {view[3 * bad + 2]}")
        self.transfers += 1

    def close(self) -> None:
        """Release everything; a producer still running (after a failure) is killed."""
        proc, self._proc = self._proc, None
        if proc is not None:
            os.close(self._go_w)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.buf.close()

    def __enter__(self) -> KvmcoalTransfer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_STALLED = None  # what the watchdog puts in the queue


def queue_producer(q, ready, go, n: int) -> None:
    """Spawned producer: the same records as bytes, one ``put`` each."""
    records = [record(i) for i in range(n)]
    ready.set()
    if not go.wait(TIMEOUT_S):
        raise SystemExit("no go")
    put = q.put
    for rec in records:
        put(rec)
    q.close()
    q.join_thread()  # every record is in the pipe before the process ends


class QueueTransfer:
    """The same records through a ``multiprocessing.Queue`` (spawned producer).

    One ``put`` per record in the producer, one ``get`` per record in the
    consumer, appended to a list; the list is checked after the timing.
    ``get()`` blocks without a timeout (its timeout form polls the pipe on
    every call and is much slower); a watchdog timer puts a sentinel into
    the queue if a transfer takes far too long, so a dead producer fails the
    run instead of hanging it.
    """

    label = "multiprocessing.Queue, put/get per record"

    def __init__(self, records: int = RECORDS) -> None:
        self.records = records
        self.expected = expected_stream(records)
        self.transfers = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._queue = None
        self._go = None
        self._got: list[bytes] = []

    def prepare(self) -> None:
        self.finish()
        ctx = self._ctx
        self._queue = ctx.Queue()
        ready, self._go = ctx.Event(), ctx.Event()
        self._proc = ctx.Process(target=queue_producer,
                                 args=(self._queue, ready, self._go, self.records))
        self._proc.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not ready.wait(0.05):
            if not self._proc.is_alive() or time.monotonic() > deadline:
                raise AssertionError(f"the Queue producer process did not start "
                                     f"(exit code {self._proc.exitcode})")
        self._got = []

    def run(self) -> int:
        """Timed: start the producer and receive every record; returns how many."""
        n = self.records
        get = self._queue.get
        got = self._got
        append = got.append
        watchdog = threading.Timer(TIMEOUT_S, self._queue.put, (_STALLED,))
        watchdog.start()
        try:
            self._go.set()
            for _ in range(n):
                rec = get()
                if rec is _STALLED:
                    raise AssertionError(f"the producer stalled after {len(got)} of {n} records "
                                         f"(exit code {self._proc.exitcode})")
                append(rec)
        finally:
            watchdog.cancel()
            watchdog.join()
        return len(got)

    def finish(self) -> None:
        """Check the last transfer (every record, in order) and reap its producer."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        proc.join(TIMEOUT_S)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        exitcode = proc.exitcode
        proc.close()
        q, self._queue = self._queue, None
        q.close()
        q.join_thread()
        assert exitcode == 0, f"the Queue producer exited with code {exitcode}"
        got, self._got = self._got, []
        assert len(got) == self.records, f"received {len(got)} of {self.records} records"
        if b"".join(got) != self.expected:
            bad = next(k for k, rec in enumerate(got) if rec != record(k))
            raise AssertionError(f"record {bad} is wrong or out of order: {got[bad]!r}")
        self.transfers += 1

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.exitcode is None:
                self._proc.kill()
            self._proc.join()
            self._proc.close()
            self._proc = None
        if self._queue is not None:
            self._queue.close()
            self._queue.join_thread()
            self._queue = None

    def __enter__(self) -> QueueTransfer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
