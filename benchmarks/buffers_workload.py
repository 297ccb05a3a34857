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
* :class:`Transfer` and its subclasses: a producer sends *N* 24-byte
  records to the calling thread, which sleeps whenever nothing is there;
  the records are checked, all of them, in order.  The producer is a
  spawned process or a thread of this process, running the same code
  either way; the mechanisms are kvmcoal (:class:`KvmcoalTransfer`) and
  the peers ``multiprocessing.Queue``, ``os.pipe``, faster-fifo and pyzmq
  (:data:`TRANSFERS`).  A peer whose package does not import raises
  :class:`PeerMissing`, so it is reported as missing, not dropped.

Knobs (environment): ``KVMCOAL_BENCH_PRODUCER_ROUNDS`` (default 1000),
``KVMCOAL_BENCH_ROUND_TRIPS`` (default 2000), ``KVMCOAL_BENCH_RECORDS``
(default 200000).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import multiprocessing
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import kvmcoal
from kvmcoal import CoalescedBuffer, EmulatedVm, Zone

if __package__:
    from .knobs import env_count
else:  # imported by a script run from benchmarks/
    from knobs import env_count

# Timed calls per producer benchmark (each call makes PRODUCER_BATCH writes).
PRODUCER_ROUNDS = env_count("KVMCOAL_BENCH_PRODUCER_ROUNDS", 1000)
# Paced round trips per wake-latency benchmark.
ROUND_TRIPS = env_count("KVMCOAL_BENCH_ROUND_TRIPS", 2000)
# Records per transfer.
RECORDS = env_count("KVMCOAL_BENCH_RECORDS", 200000)
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
    alone; ``ring_push_many_batch`` pushes the same writes as raw records in
    one ``Ring.push_many`` call.  ``reset`` is the untimed setup before each call: it checks that
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

    def ring_push_many_batch(self) -> None:
        """The same writes as raw records, in one ``Ring.push_many`` call."""
        if self.ring.push_many(self.expected) != self.batch:
            raise AssertionError("push_many refused part of a batch that fits the ring")

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
        self.ring.reset()
        self.ring_push_many_batch()
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
# 3. Throughput of 24-byte records, across processes and across threads
# --------------------------------------------------------------------------

# Records per write (os.pipe) and per put_many (faster-fifo): a one-page
# ring's capacity, and 4056 bytes, within PIPE_BUF, so a pipe write is
# atomic and never splits a record.
TRANSFER_BATCH = kvmcoal.RING_MAX - 1
RECORD_BYTES = ENTRY.size


def record(i: int) -> bytes:
    """Record *i*: the ring's 24-byte ABI record of an 8-byte write of *i* at address *i*."""
    return ENTRY.pack(i, 8, 0, i.to_bytes(8, "little"))


@functools.lru_cache(maxsize=4)
def expected_stream(n: int) -> bytes:
    """Records 0 to n - 1, back to back: what every transfer must deliver."""
    return b"".join(record(i) for i in range(n))


def check_stream(got: bytes | bytearray, n: int) -> None:
    """Raise AssertionError, naming the first bad record, unless *got* is records 0 to n - 1."""
    if got == expected_stream(n):
        return
    bad = next((k for k in range(n)
                if got[k * RECORD_BYTES:(k + 1) * RECORD_BYTES] != record(k)), n)
    if (bad + 1) * RECORD_BYTES > len(got):
        raise AssertionError(f"{len(got)} bytes received: records from {bad} on are missing "
                             f"({n} records are {n * RECORD_BYTES} bytes)")
    phys_addr, _len, _pio, data = ENTRY.unpack_from(got, bad * RECORD_BYTES)
    raise AssertionError(f"record {bad} is wrong or out of order: phys_addr {phys_addr}, "
                         f"data {int.from_bytes(data, 'little')}")


class PeerMissing(Exception):
    """A peer's package does not import, so its figures are reported as missing.

    ``package`` is the name it is installed by (the ``bench`` extra lists
    it); the message, the ``reason`` of a "missing" entry or of a pytest
    skip, names it and carries the ImportError's text.
    """

    def __init__(self, package: str, error: ImportError) -> None:
        super().__init__(f"{package} does not import: {error}")
        self.package = package


class _PassedFds:
    """File descriptors for a spawned producer, rebuilt there by ``opener(*fds)``.

    Pickled while the process is spawned, each fd travels as
    multiprocessing's ``DupFd``, the way it passes a Connection's socket,
    so the child gets its own duplicates.
    """

    def __init__(self, opener: Callable, *fds: int) -> None:
        self.opener = opener
        self.fds = fds

    def __reduce__(self) -> tuple:
        from multiprocessing import reduction
        return _open_passed_fds, (self.opener, *(reduction.DupFd(fd) for fd in self.fds))


def _open_passed_fds(opener: Callable, *dups: object) -> object:
    return opener(*(dup.detach() for dup in dups))


def _attach_buffer(memfd: int, efd: int) -> CoalescedBuffer:
    """In a spawned producer: attach to the consumer's buffer by the fds it was passed."""
    try:
        return CoalescedBuffer.attach(memfd, efd)
    finally:
        os.close(memfd)
        os.close(efd)


def _the_fd(fd: int) -> int:
    return fd


def _produce(setup: Callable, end: object, n: int, ready, go, done) -> None:
    """A producer's life, the same in a spawned process and in a thread.

    ``setup(end, n)`` is a context manager: it opens the producer's end of
    the channel and builds the records (untimed), and gives the function
    that sends them.  The producer then says *ready*, sends on *go* and
    keeps its end open until the consumer says *done*: a ZeroMQ socket
    closed right after its last send can drop messages still queued, linger
    or not (libzmq issues 1922 and 3774; seen here as a transfer stalling
    a few hundred records short).  *done* set before *go* cancels the
    sending (a transfer closed without running).
    """
    with setup(end, n) as send:
        ready.set()
        if not go.wait(TIMEOUT_S):
            raise SystemExit("no go")
        if done.is_set():
            return
        send()
        done.wait(TIMEOUT_S)


class _Producer:
    """A transfer's producer: :func:`_produce` in a spawned process or in a thread.

    Spawned, not forked: forking a process that runs threads (pytest's,
    multiprocessing's feeders) is unsafe, and a spawned child has only what
    it was handed.  The constructor returns once the producer is ready;
    ``go()`` starts the sending; ``reap()``, once the consumer has
    everything, lets the producer end, waits for it and raises
    AssertionError unless it exited 0 (a thread: returned).
    """

    def __init__(self, setup: Callable, end: object, n: int, *, thread: bool) -> None:
        self.thread = thread
        self.error: BaseException | None = None
        sync = threading if thread else multiprocessing.get_context("spawn")
        self._ready, self._go, self._done = sync.Event(), sync.Event(), sync.Event()
        args = (setup, end, n, self._ready, self._go, self._done)
        if thread:
            self._worker = threading.Thread(target=self._in_thread, args=args,
                                            name="transfer-producer", daemon=True)
        else:
            self._worker = sync.Process(target=_produce, args=args, name="transfer-producer")
        self._worker.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not self._ready.wait(0.05):
            if not self._worker.is_alive() or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the producer did not start ({self.status()})")

    def _in_thread(self, *args: object) -> None:
        try:
            _produce(*args)
        except BaseException as exc:  # reported by reap() or the consumer's timeout
            self.error = exc

    def go(self) -> None:
        self._go.set()

    def status(self) -> str:
        """How the producer stands, for an error message."""
        if self._worker.is_alive():
            return "still running"
        if self.thread:
            return f"raised {self.error!r}" if self.error else "returned"
        return f"exit code {self._worker.exitcode}"

    def reap(self) -> None:
        """Let the producer end, and wait for it; AssertionError unless it exited 0 (or returned)."""
        self._done.set()
        self._worker.join(TIMEOUT_S)
        if self._worker.is_alive():
            self.kill()
            raise AssertionError(f"the producer did not finish within {TIMEOUT_S} s")
        if self.thread:
            if self.error is not None:
                raise AssertionError("the producer thread failed") from self.error
            return
        exitcode = self._worker.exitcode
        self._worker.close()
        assert exitcode == 0, f"the producer process exited with code {exitcode}"

    def kill(self) -> None:
        """Stop the producer (after a failure): a process at once, a thread see :meth:`join`."""
        self._done.set()
        self._go.set()
        if not self.thread and self._worker.is_alive():
            self._worker.kill()
            self._worker.join()

    def join(self) -> None:
        """After :meth:`kill` and closing the channel, which unblocks a thread's sending: wait."""
        if self.thread:
            self._worker.join(TIMEOUT_S)


def _send_each(records: list[bytes], send: Callable[[bytes], object]) -> None:
    """Hand *records* to *send*, one call per record."""
    for rec in records:
        send(rec)


def _send_in_batches(records: list[bytes], flush: Callable[[list[bytes]], object]) -> None:
    """Gather *records* one by one, as a producer makes them, and flush every TRANSFER_BATCH."""
    pending: list[bytes] = []
    append = pending.append
    for rec in records:
        append(rec)
        if len(pending) == TRANSFER_BATCH:
            flush(pending)
            pending.clear()
    if pending:
        flush(pending)


class Transfer:
    """*records* 24-byte records from a producer to the calling thread, every one checked.

    The producer is a spawned process (``thread=False``) or a thread of
    this process (``thread=True``); either way it runs the subclass's
    ``producer`` (see :func:`_produce`) on what :meth:`_producer_end`
    gives it.  The consumer, the calling thread, sleeps in the mechanism's
    blocking receive whenever nothing is there, each sleep bounded by
    TIMEOUT_S.

    ``prepare`` (untimed) checks and reaps the previous transfer, opens a
    channel if the mechanism needs a fresh one per transfer, and starts a
    producer, which builds its records before it says it is ready; ``run``
    (timed) says "go" and receives every record; ``finish`` (untimed)
    checks that the producer exited 0 and that records 0 to N - 1 arrived,
    byte for byte, in order.  ``batches`` is how many receive calls the last
    run made.

    A subclass sets ``name`` (or a ``label`` property) and ``producer``,
    and implements ``_producer_end`` and ``_receive``; a peer also sets
    ``package`` and ``module``, and a peer that does not import raises
    :class:`PeerMissing` from the constructor.
    """

    name = ""
    package: str | None = None      # a peer's PyPI name, for the "missing" report
    module: str | None = None       # what it imports as
    producer: Callable              # setup(end, n): see _produce

    def __init__(self, records: int = RECORDS, *, thread: bool = False) -> None:
        if self.module is not None:
            try:
                importlib.import_module(self.module)
            except ImportError as exc:
                raise PeerMissing(self.package or self.module, exc) from exc
        self.records = records
        self.thread = thread
        self.transfers = 0          # checked and reaped
        self.batches = 0            # receive calls of the last run
        self._producer: _Producer | None = None
        self._got = 0

    @property
    def label(self) -> str:
        return self.name

    @property
    def mode(self) -> str:
        return "threads" if self.thread else "processes"

    def prepare(self) -> None:
        self.finish()
        self._open_transfer()
        try:
            self._producer = _Producer(type(self).producer, self._producer_end(), self.records,
                                       thread=self.thread)
        except BaseException:
            self._close_transfer()
            raise
        self._got = 0

    def run(self) -> int:
        """Timed: start the producer and receive every record; returns how many."""
        self._producer.go()
        self._got, self.batches = self._receive(self.records)
        return self._got

    def finish(self) -> None:
        """Check the last transfer (every record, in order) and reap its producer."""
        if self._producer is None:
            return
        producer, self._producer = self._producer, None
        try:
            producer.reap()
            assert self._got == self.records, f"received {self._got} of {self.records} records"
            check_stream(self._received(), self.records)
        finally:
            self._close_transfer()
        self.transfers += 1

    def close(self) -> None:
        """Release everything; a producer still running (after a failure) is stopped."""
        producer, self._producer = self._producer, None
        try:
            if producer is not None:
                producer.kill()
        finally:
            self._close_transfer()
            self._close_channel()
        if producer is not None:
            producer.join()

    def _stalled(self, got: int) -> AssertionError:
        return AssertionError(f"{self.label}: the producer stalled after {got} of "
                              f"{self.records} records ({self._producer.status()})")

    # The mechanism's part.
    def _open_transfer(self) -> None:
        """Untimed, before a producer starts: a fresh channel, where one is needed."""

    def _producer_end(self) -> object:
        """What the producer gets: picklable where it is a process."""
        raise NotImplementedError

    def _receive(self, n: int) -> tuple[int, int]:
        """Timed: receive *n* records; (records received, receive calls)."""
        raise NotImplementedError

    def _received(self) -> bytes | bytearray:
        """Untimed: what the last run received, back to back."""
        raise NotImplementedError

    def _close_transfer(self) -> None:
        """Close what :meth:`_open_transfer` opened; idempotent."""

    def _close_channel(self) -> None:
        """Close what lives as long as the transfer object; idempotent."""

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def _kvmcoal_producer(buf: CoalescedBuffer, n: int) -> Iterator[Callable[[], None]]:
    datas = [i.to_bytes(8, "little") for i in range(n)]
    push, yield_ = buf.ring.push, os.sched_yield

    def send() -> None:
        for i, data in enumerate(datas):
            while not push(i, data):               # the ring is full: let the consumer run
                yield_()

    yield send


class KvmcoalTransfer(Transfer):
    """Through a CoalescedBuffer's ring: ``Ring.push`` per record, ``wait()`` and ``drain_into``.

    A producer process attaches to the buffer by its fds (handed over as the
    process is spawned); a producer thread pushes into the consumer's own
    buffer.  When the ring is full the producer yields the CPU and tries
    again.  The consumer sleeps in ``buf.wait()`` whenever the ring is empty
    and drains with ``Ring.drain_into`` straight into one preallocated
    bytearray, which is checked after the timing.
    """

    producer = _kvmcoal_producer

    def __init__(self, records: int = RECORDS, ring_bytes: int | None = None, *,
                 thread: bool = False) -> None:
        super().__init__(records, thread=thread)
        self.buf = CoalescedBuffer(ring_bytes)
        self._out = bytearray()

    @property
    def label(self) -> str:
        return f"kvmcoal, {self.buf.size}-byte ring ({self.buf.ring.capacity} entries)"

    def _open_transfer(self) -> None:
        assert len(self.buf.ring) == 0, "records left in the ring before a transfer"
        self._out = bytearray(self.records * RECORD_BYTES)

    def _producer_end(self) -> object:
        return self.buf if self.thread else _PassedFds(_attach_buffer, *self.buf.fds())

    def _receive(self, n: int) -> tuple[int, int]:
        wait, drain_into = self.buf.wait, self.buf.ring.drain_into
        out = memoryview(self._out)
        got = batches = 0
        try:
            while got < n:
                if not wait(TIMEOUT_S):
                    raise self._stalled(got)
                got += drain_into(out[got * RECORD_BYTES:])
                batches += 1
        finally:
            out.release()
        return got, batches

    def _received(self) -> bytearray:
        assert len(self.buf.ring) == 0, "records left in the ring after the transfer"
        return self._out

    def _close_channel(self) -> None:
        self.buf.close()


@contextlib.contextmanager
def _kvmcoal_batch_producer(buf: CoalescedBuffer, n: int) -> Iterator[Callable[[], None]]:
    records = [record(i) for i in range(n)]
    push_many, yield_ = buf.ring.push_many, os.sched_yield

    def flush(batch: list[bytes]) -> None:
        data = memoryview(b"".join(batch))
        pushed = push_many(data)
        while pushed < len(batch):                 # the ring is full: let the consumer run
            yield_()
            pushed += push_many(data[pushed * RECORD_BYTES:])

    yield functools.partial(_send_in_batches, records, flush)


class KvmcoalBatchTransfer(KvmcoalTransfer):
    """:class:`KvmcoalTransfer` with the producer batching as the pipe's does.

    The producer gathers TRANSFER_BATCH records, then pushes them with one
    ``Ring.push_many`` call (one producer lock, at most one wakeup), as the
    ``os.pipe`` producer joins them into one ``write``.  The ring is 64 KiB,
    the size of a Linux pipe's buffer: a one-page ring holds exactly one
    batch, so the producer would wait for the consumer to empty it before
    each push, where the pipe holds sixteen.
    """

    producer = _kvmcoal_batch_producer

    def __init__(self, records: int = RECORDS, ring_bytes: int | None = 65536, *,
                 thread: bool = False) -> None:
        super().__init__(records, ring_bytes, thread=thread)

    @property
    def label(self) -> str:
        return (f"kvmcoal push_many of {TRANSFER_BATCH}, {self.buf.size}-byte ring "
                f"({self.buf.ring.capacity} entries)")


class _ListTransfer(Transfer):
    """A transfer whose consumer collects the records as bytes objects in a list."""

    def __init__(self, records: int = RECORDS, *, thread: bool = False) -> None:
        super().__init__(records, thread=thread)
        self._list: list[bytes] = []

    def _open_transfer(self) -> None:
        self._list = []

    def _received(self) -> bytes:
        return b"".join(self._list)


class _QueueTransfer(_ListTransfer):
    """Through a queue made afresh for each transfer, handed to the producer as it is."""

    _queue = None

    def _new_queue(self):
        raise NotImplementedError

    def _open_transfer(self) -> None:
        super()._open_transfer()
        self._queue = self._new_queue()

    def _producer_end(self) -> object:
        return self._queue

    def _close_transfer(self) -> None:
        q, self._queue = self._queue, None
        if q is not None:
            q.close()
            q.join_thread()


_STALLED = None  # what the watchdog puts in the queue


@contextlib.contextmanager
def _queue_producer(q, n: int) -> Iterator[Callable[[], None]]:
    # Nothing to close: a process that is not the queue's creator joins its
    # feeder thread at exit, so every record is in the pipe before it ends.
    yield functools.partial(_send_each, [record(i) for i in range(n)], q.put)


class QueueTransfer(_QueueTransfer):
    """Through a ``multiprocessing.Queue`` (a new one per transfer): put/get per record.

    One ``put`` per record in the producer, one ``get`` per record in the
    consumer, appended to a list; the list is checked after the timing.
    ``get()`` blocks without a timeout (its timeout form polls the pipe on
    every call and is much slower); a watchdog timer puts a sentinel into
    the queue if a transfer takes far too long, so a stalled or dead
    producer fails the run instead of hanging it.  (Not one killed in the
    middle of a put: that leaves half a message in the queue's pipe and its
    write lock taken, which is the Queue's own limit; a producer that
    raises still flushes what it put, at exit.)
    """

    name = "multiprocessing.Queue, put/get per record"
    producer = _queue_producer

    def _new_queue(self):
        return multiprocessing.get_context("spawn").Queue()

    def _receive(self, n: int) -> tuple[int, int]:
        get = self._queue.get
        got = self._list
        append = got.append
        watchdog = threading.Timer(TIMEOUT_S, self._queue.put, (_STALLED,))
        watchdog.start()
        try:
            for _ in range(n):
                rec = get()
                if rec is _STALLED:
                    raise self._stalled(len(got))
                append(rec)
        finally:
            watchdog.cancel()
            watchdog.join()
        return len(got), len(got)


@contextlib.contextmanager
def _pipe_producer(fd: int, n: int) -> Iterator[Callable[[], None]]:
    records = [record(i) for i in range(n)]
    write = os.write

    def flush(batch: list[bytes]) -> None:
        data = b"".join(batch)
        if write(fd, data) != len(data):      # cannot happen within PIPE_BUF
            raise AssertionError("a pipe write of at most PIPE_BUF bytes was split")

    yield functools.partial(_send_in_batches, records, flush)


class PipeTransfer(Transfer):
    """Through an ``os.pipe`` (a new one per transfer): TRANSFER_BATCH records per write.

    The producer gathers records one by one and writes them 169 at a time
    (4056 bytes: within PIPE_BUF, so each write is atomic and whole, and one
    write per batch is what a producer of a byte stream would do; a write
    per record costs a system call per record).  The consumer reads the
    non-blocking read end with ``readinto`` straight into one preallocated
    bytearray, as much as there is, and sleeps in ``select`` only when the
    pipe is empty, as ``CoalescedBuffer.wait()`` does.
    """

    name = f"os.pipe, {TRANSFER_BATCH} records per write"
    producer = _pipe_producer

    def __init__(self, records: int = RECORDS, *, thread: bool = False) -> None:
        super().__init__(records, thread=thread)
        self._reader: io.FileIO | None = None
        self._w = -1
        self._out = bytearray()

    def _open_transfer(self) -> None:
        r, self._w = os.pipe()
        os.set_blocking(r, False)
        self._reader = io.FileIO(r, "rb")       # owns r; readinto gives None when empty
        self._out = bytearray(self.records * RECORD_BYTES)

    def _producer_end(self) -> object:
        return self._w if self.thread else _PassedFds(_the_fd, self._w)

    def _receive(self, n: int) -> tuple[int, int]:
        total = n * RECORD_BYTES
        readinto, r, select_ = self._reader.readinto, self._reader.fileno(), select.select
        out = memoryview(self._out)
        got = reads = 0
        try:
            while got < total:
                k = readinto(out[got:])
                if k is None:                   # empty: sleep until it is readable
                    if not select_([r], [], [], TIMEOUT_S)[0]:
                        raise self._stalled(got // RECORD_BYTES)
                    continue
                if not k:
                    raise AssertionError(f"end of file after {got // RECORD_BYTES} records")
                got += k
                reads += 1
        finally:
            out.release()
        if got % RECORD_BYTES:
            raise AssertionError(f"{got} bytes received: not whole records")
        return got // RECORD_BYTES, reads

    def _received(self) -> bytearray:
        return self._out

    def _close_transfer(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        w, self._w = self._w, -1
        if w >= 0:
            os.close(w)


def _unchanged(data: bytes) -> bytes:
    return data


@contextlib.contextmanager
def _faster_fifo_producer(q, n: int) -> Iterator[Callable[[], None]]:
    records = [record(i) for i in range(n)]
    put_many = q.put_many
    yield functools.partial(_send_in_batches, records,
                            lambda batch: put_many(batch, True, TIMEOUT_S))


class FasterFifoTransfer(_QueueTransfer):
    """Through a ``faster_fifo.Queue`` (a new one per transfer): put_many/get_many.

    faster-fifo's fast path is its batch API: the producer gathers records
    one by one and ``put_many``s them TRANSFER_BATCH at a time (one message
    per record); the consumer ``get_many``s everything there is, sleeping
    in it while the queue is empty.  The records are bytes already, so the
    queue is made with faster-fifo's serializer hooks set to pass them
    through (``dumps`` unchanged, ``loads=bytes``) rather than pickle
    them, which more than doubles its rate; its buffer keeps its default size.
    """

    name = f"faster-fifo, put_many of {TRANSFER_BATCH} / get_many"
    package, module = "faster-fifo", "faster_fifo"
    producer = _faster_fifo_producer

    def _new_queue(self):
        import faster_fifo
        return faster_fifo.Queue(loads=bytes, dumps=_unchanged)

    def _receive(self, n: int) -> tuple[int, int]:
        from faster_fifo import Empty
        get_many = self._queue.get_many
        got = self._list
        extend = got.extend
        calls = 0
        try:
            while len(got) < n:
                extend(get_many(True, TIMEOUT_S))
                calls += 1
        except Empty:
            raise self._stalled(len(got)) from None
        return len(got), calls


@contextlib.contextmanager
def _zmq_producer(end: tuple, n: int) -> Iterator[Callable[[], None]]:
    import zmq
    shared_context, endpoint = end
    context = shared_context or zmq.Context()
    sock = context.socket(zmq.PUSH)
    try:
        sock.connect(endpoint)
        yield functools.partial(_send_each, [record(i) for i in range(n)], sock.send)
    finally:
        sock.close(linger=int(TIMEOUT_S * 1000))   # delivers what is still queued
        if shared_context is None:
            context.term()


class ZmqTransfer(_ListTransfer):
    """Through pyzmq PUSH/PULL: one message per record, over ``ipc://`` or ``inproc://``.

    A message per record is ZeroMQ's natural form (it batches small
    messages on the wire itself); batching records into one message would
    make it a byte stream like the pipe, and multipart messages of 169
    frames measured slower than single messages.  Between processes the
    PULL socket binds ``ipc://`` in a temporary directory; between threads
    both sockets share one context and ``inproc://``, ZeroMQ's transport
    for threads.  The consumer ``recv``s each record, sleeping in it while
    nothing is there (RCVTIMEO bounds the sleep); high-water marks keep
    their defaults.
    """

    package, module = "pyzmq", "zmq"
    producer = _zmq_producer

    def __init__(self, records: int = RECORDS, *, thread: bool = False) -> None:
        super().__init__(records, thread=thread)
        import zmq
        self._dir = None if thread else tempfile.mkdtemp(prefix="kvmcoal-zmq-")
        self.endpoint = (f"inproc://kvmcoal-transfer-{id(self):x}" if thread
                         else f"ipc://{self._dir}/records")
        self._context = zmq.Context()
        self._pull = self._context.socket(zmq.PULL)
        try:
            self._pull.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
            self._pull.bind(self.endpoint)
        except BaseException:
            self._close_channel()
            raise

    @property
    def label(self) -> str:
        return f"pyzmq PUSH/PULL {self.endpoint.split(':')[0]}://, a message per record"

    def _producer_end(self) -> object:
        return (self._context if self.thread else None, self.endpoint)

    def _receive(self, n: int) -> tuple[int, int]:
        import zmq
        recv = self._pull.recv
        got = self._list
        append = got.append
        try:
            for _ in range(n):
                append(recv())
        except zmq.Again:
            raise self._stalled(len(got)) from None
        return len(got), len(got)

    def _close_channel(self) -> None:
        if self._context.closed:
            return
        self._pull.close(linger=0)
        self._context.term()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


# The mechanisms compared, by key: kvmcoal (one-page ring, a 64 KiB one for
# reference, and a 64 KiB ring fed by push_many), then the peers.
TRANSFERS: dict[str, Callable[..., Transfer]] = {
    "kvmcoal": KvmcoalTransfer,
    "kvmcoal_64k": functools.partial(KvmcoalTransfer, ring_bytes=65536),
    "kvmcoal_batch": KvmcoalBatchTransfer,
    "queue": QueueTransfer,
    "pipe": PipeTransfer,
    "faster_fifo": FasterFifoTransfer,
    "zmq": ZmqTransfer,
}
