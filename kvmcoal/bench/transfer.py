"""The transfer section: 24-byte records between processes and threads, kvmcoal against peers.

A producer sends N records (the ring's 24-byte ABI records of 8-byte
writes) to the calling thread, which sleeps whenever nothing is there; the
records are checked, all of them, in order, and the producer must exit 0.
The producer is a spawned process or a thread of this process, running the
same code either way; the mechanisms are kvmcoal (KvmcoalTransfer, a
Ring.push per record, and KvmcoalBatchTransfer, Ring.push_many of 169) and
the peers multiprocessing.Queue, os.pipe, faster-fifo and pyzmq
(TRANSFERS).  A peer whose package does not import raises PeerMissing, so
it is reported as missing, not dropped.

What is checked, and what a failure means: every record arrived, once, in
order, byte for byte, and the producer exited 0 (data: a failure raises
AssertionError, always); the producer started, and exited after the last
record, within TIMEOUT_S (timing: on a busy machine that can fail, and the
transfer is made again, see reporting.valid_sample; a mechanism whose
transfers keep failing it is reported as unmeasured).

The targets: across processes, kvmcoal at least 10x the records/s of
multiprocessing.Queue and at least 2x faster-fifo's.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import multiprocessing
import os
import queue
import select
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import kvmcoal
from kvmcoal import CoalescedBuffer
from kvmcoal.errors import PeerMissing

from .baselines import ENTRY
from .reporting import (TIMEOUT_S, InvalidSample, Method, Progress, RetryBudget, Section,
                        Unmeasured, noop, ratio, rotated, valid_sample)

RECORDS = 200_000                 # records per transfer, by default

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


def _open_passed_fds(opener: Callable[..., object], *dups: Any) -> object:
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
        self._worker: Any   # a Thread or a SpawnProcess
        if thread:
            self._worker = threading.Thread(target=self._in_thread, args=args,
                                            name="transfer-producer", daemon=True)
        else:
            self._worker = sync.Process(target=_produce, args=args, name="transfer-producer")
        self._worker.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not self._ready.wait(0.05):
            if not self._worker.is_alive():          # it failed: a bug, not the machine
                self.kill()
                raise AssertionError(f"the producer did not start ({self.status()})")
            if time.monotonic() > deadline:          # timing: the machine is too busy
                self.kill()
                raise InvalidSample(f"the producer did not start within {TIMEOUT_S:g} s")

    def _in_thread(self, *args: Any) -> None:
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
        """Let the producer end, and wait for it; AssertionError unless it exited 0 (or returned).

        InvalidSample if it is still running after TIMEOUT_S (then it is killed):
        a timing failure, once the consumer has every record.
        """
        self._done.set()
        self._worker.join(TIMEOUT_S)
        if self._worker.is_alive():
            self.kill()
            raise InvalidSample(f"the producer did not exit within {TIMEOUT_S:g} s of the "
                                "last record")
        if self.thread:
            if self.error is not None:
                raise AssertionError("the producer thread failed") from self.error
            return
        exitcode = self._worker.exitcode
        self._worker.close()
        if exitcode != 0:
            raise AssertionError(f"the producer process exited with code {exitcode}")

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
        assert self._producer is not None, "prepare() first"
        self._producer.go()
        self._got, self.batches = self._receive(self.records)
        return self._got

    def finish(self) -> None:
        """Check the last transfer (every record, in order) and reap its producer."""
        if self._producer is None:
            return
        producer, self._producer = self._producer, None
        late: InvalidSample | None = None
        try:
            try:
                producer.reap()
            except InvalidSample as exc:
                late = exc          # raised after the data checks, which come first
            # Data checks: a failure is a bug, whatever the machine does.
            if self._got != self.records:
                raise AssertionError(f"received {self._got} of {self.records} records")
            check_stream(self._received(), self.records)
        finally:
            self._close_transfer()
        if late is not None:
            raise late
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
        # Records that do not arrive within TIMEOUT_S are lost, not late: a data failure.
        return AssertionError(f"{self.label}: the producer stalled after {got} of "
                              f"{self.records} records "
                              f"({self._producer.status() if self._producer else 'gone'})")

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

    def __init__(self, records: int = RECORDS, nbytes: int | None = None, *,
                 thread: bool = False) -> None:
        super().__init__(records, thread=thread)
        self.buf = CoalescedBuffer(nbytes)
        self._out = bytearray()

    @property
    def label(self) -> str:
        return f"kvmcoal, {self.buf.nbytes}-byte ring ({self.buf.ring.capacity} entries)"

    def _open_transfer(self) -> None:
        if len(self.buf.ring):
            raise AssertionError("records left in the ring before a transfer")
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
        if len(self.buf.ring):
            raise AssertionError("records left in the ring after the transfer")
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

    def __init__(self, records: int = RECORDS, nbytes: int | None = 65536, *,
                 thread: bool = False) -> None:
        super().__init__(records, nbytes, thread=thread)

    @property
    def label(self) -> str:
        return (f"kvmcoal push_many of {TRANSFER_BATCH}, {self.buf.nbytes}-byte ring "
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

    _queue: Any = None

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
        assert self._reader is not None, "prepare() first"
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
        import faster_fifo  # type: ignore[import-not-found,import-untyped,unused-ignore]
        return faster_fifo.Queue(loads=bytes, dumps=_unchanged)

    def _receive(self, n: int) -> tuple[int, int]:
        get_many = self._queue.get_many
        got = self._list
        extend = got.extend
        calls = 0
        try:
            while len(got) < n:
                extend(get_many(True, TIMEOUT_S))
                calls += 1
        except queue.Empty:          # what faster-fifo raises (its Empty is queue's)
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
    "kvmcoal_64k": functools.partial(KvmcoalTransfer, nbytes=65536),
    "kvmcoal_batch": KvmcoalBatchTransfer,
    "queue": QueueTransfer,
    "pipe": PipeTransfer,
    "faster_fifo": FasterFifoTransfer,
    "zmq": ZmqTransfer,
}


# What measure() compares: the producer in a process or in a thread, and the
# ratios it reports: (mode, numerator, denominator, op, target); kvmcoal's
# one-page ring against each peer, the 64 KiB ring against the Queue for
# reference.
MODES = {"processes": False, "threads": True}
RATIOS: list[tuple[str, str, str, str | None, float | None]] = [
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
# Tries of one transfer whose producer was too slow to start or to exit.
TRIES_PER_TRANSFER = 3


def _timed_transfer(t: Transfer) -> tuple[float, int]:
    """One transfer: prepared (untimed), run (timed), checked; its records/s and receives."""
    t.prepare()
    t0 = time.perf_counter()
    n = t.run()
    elapsed = time.perf_counter() - t0
    t.finish()              # every record, in order, and the producer exited 0
    return n / elapsed, t.batches


def measure(records: int, transfers: int, progress: Progress | None = None) -> Section:
    """Records/s of every mechanism of TRANSFERS, producer in a process and in a thread.

    Each of *transfers* blocks makes one transfer of each mechanism, in a
    rotated order, so that all are measured under the same conditions; a
    peer that does not import is reported with "missing" (its reason), one
    whose transfers keep failing their timing checks with "unmeasured", and
    so are the ratios against them.
    """
    say = progress or noop
    methods: list[tuple[str, str, Transfer]] = []
    missing: dict[str, str] = {}
    unmeasured: dict[tuple[str, str], str] = {}
    budgets: dict[tuple[str, str], RetryBudget] = {}
    try:
        for mode, thread in MODES.items():
            for key, make in TRANSFERS.items():
                try:
                    methods.append((mode, key, make(records, thread=thread)))
                except PeerMissing as exc:
                    missing[key] = str(exc)
                budgets[mode, key] = RetryBudget(transfers, per_sample=TRIES_PER_TRANSFER,
                                                 least=TRIES_PER_TRANSFER)
        rates: dict[tuple[str, str], list[float]] = {(m, k): [] for m, k, _ in methods}
        calls: dict[tuple[str, str], list[int]] = {(m, k): [] for m, k, _ in methods}
        for b in range(transfers):
            say(f"throughput: block {b + 1} of {transfers}, {len(methods)} transfers "
                f"of {records} records")
            for mode, key, t in rotated(methods, b):
                if (mode, key) in unmeasured:
                    continue
                try:
                    rate, receives = valid_sample(functools.partial(_timed_transfer, t),
                                                  budgets[mode, key])
                except Unmeasured as exc:
                    unmeasured[mode, key] = str(exc)
                    continue
                rates[mode, key].append(rate)
                calls[mode, key].append(receives)
        for mode, key, t in methods:
            if (mode, key) not in unmeasured and t.transfers != transfers:
                raise AssertionError(f"{mode} {key}: {t.transfers} transfers checked, "
                                     f"not {transfers}")
        labels = {(mode, key): t.label for mode, key, t in methods}
    finally:
        for _mode, _key, t in methods:
            t.close()

    out: Section = {
        "caption": [f"{records} {RECORD_BYTES}-byte records from a producer (spawned process "
                    "or thread) to this thread, asleep whenever nothing is there;",
                    f"{transfers} transfers per method, interleaved; every record checked, in "
                    f"order; receives: the consumer's receive calls per transfer; os.pipe and "
                    f"faster-fifo send {TRANSFER_BATCH} records per call"],
        "records": records, "record_bytes": RECORD_BYTES, "transfers": transfers,
        "batch": TRANSFER_BATCH, "ratios": []}
    for mode in MODES:
        got: dict[str, Method] = {}
        for key in TRANSFERS:
            retried = budgets[mode, key].retried
            if key in missing:
                got[key] = {"label": SHORT_NAMES[key], "missing": missing[key]}
            elif (mode, key) in unmeasured:
                got[key] = {"label": labels[mode, key], "unmeasured": unmeasured[mode, key],
                            "retried": retried}
            else:
                median = statistics.median(rates[mode, key])
                got[key] = {
                    "label": labels[mode, key],
                    "transfers": len(rates[mode, key]),
                    "median_records_per_s": median,
                    "best_records_per_s": max(rates[mode, key]),
                    "median_ns_per_record": 1e9 / median,
                    "median_receive_calls": statistics.median(calls[mode, key]),
                    "retried": retried,
                }
        out[mode] = got
        per_block = {key: rates.get((mode, key), []) for key in TRANSFERS}
        out["ratios"] += [
            ratio(f"records/s, {mode}: {SHORT_NAMES[num]} / {SHORT_NAMES[den]}", got, num, den,
                  per_block, op, target, pooled={"pooled": "median_records_per_s"})
            for m, num, den, op, target in RATIOS if m == mode]
    return out
