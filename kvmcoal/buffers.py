"""Coalesced buffers: one ring in shared memory, pollable, shareable between processes.

This is the userspace form of the fd-based "v2" API proposed for Linux
(KVM_CREATE_COALESCED_MMIO_BUFFER): a buffer owns one ring, zones are bound
to it (:meth:`kvmcoal.EmulatedVm.register_coalesced_mmio2`), and its file
descriptor is readable while the ring holds entries, so a consumer can sleep
in ``select``/``epoll``/asyncio or in :meth:`CoalescedBuffer.wait` instead of
waiting for the next exit.

Memory layout of the memfd (sealed against shrinking and growing, so no peer
can make a mapping fault)::

    [0, nbytes)                        struct kvm_coalesced_mmio_ring
    [align8(nbytes), +64)              control block: magic "KVMC", version,
                                       nbytes (u64), signalled word (u32)

The wakeup protocol is described in ``src/ring_impl.h`` and ``docs/WAKEUPS.md``.

>>> with CoalescedBuffer() as buf:
...     buf.ring.push(0x3F8, b"A", pio=True)
...     buf.readable()
True
True
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import mmap
import os
import resource
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from . import _ring
from ._ring import Entry, Ring
from .errors import BufferForkedError

__all__ = ["CoalescedBuffer"]

_CONTROL = struct.Struct("<IIQI")     # magic, version, nbytes, signalled
_CONTROL_SIZE = 64
_MAGIC = 0x434D564B                   # "KVMC" little-endian
_VERSION = 1
_SIGNALED_OFFSET = 16                 # offset of the signalled word in the block
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
# wait() sleeps at most this long per poll(): its timeout is a C int of ms.
_MAX_SLEEP_MS = 2**31 - 1
_FOREVER_S = 100 * 365 * 24 * 3600


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _memfd_size(nbytes: int) -> int:
    return _align8(nbytes) + _CONTROL_SIZE


# A buffer holds this many file descriptors while it is open: its memfd,
# its eventfd, the mmap's duplicate of the memfd, and the ring's duplicate
# of the eventfd (for sleepers, see Ring._sleep).
FDS_PER_BUFFER = 4


def _raise_if_out_of_fds(exc: OSError) -> None:
    """EMFILE: say how many fds the open buffers hold, and what to do."""
    if exc.errno != errno.EMFILE:
        return
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = sum(1 for buf in list(_live_buffers) if not buf.closed)
    raise OSError(errno.EMFILE,
                  f"out of file descriptors: a CoalescedBuffer holds {FDS_PER_BUFFER}, this "
                  f"process has {n} open ({FDS_PER_BUFFER * n} fds) and may have {soft} in "
                  f"all; raise the limit (ulimit -n, or resource.setrlimit(RLIMIT_NOFILE)), "
                  f"or close buffers you no longer use") from exc


# Buffers alive in this process, invalidated in a forked child.
_live_buffers: weakref.WeakSet[CoalescedBuffer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for buf in list(_live_buffers):
        buf._forked()


def _after_fork_in_parent() -> None:
    # The child holds every eventfd now, and could change its flags.
    for buf in list(_live_buffers):
        if not buf._closed:
            buf._ring._share_notifier()


os.register_at_fork(after_in_child=_after_fork_in_child, after_in_parent=_after_fork_in_parent)


class CoalescedBuffer:
    """One coalesced ring in sealed shared memory, with a pollable wakeup fd.

    ``CoalescedBuffer(nbytes=None)`` makes a new buffer whose ring occupies
    *nbytes* bytes (default: one page; any size from 32 bytes, the ring's
    ``max`` follows from it).  :meth:`attach` opens an existing one from its
    file descriptors, for a peer process.

    Consumer side: use :attr:`ring` (``drain``, ``consume``, ...) and sleep
    in :meth:`wait`, :meth:`wait_async`, or any poller on :meth:`fileno`.
    Producer side: ``ring.push`` or, through zones, ``EmulatedVm.write``.
    One producer *process* at a time; producer threads in it are serialized
    by the ring's lock.
    """

    # Both None until _open() sets them (see _unopened()).
    _map: mmap.mmap
    _ring: Ring

    def __init__(self, nbytes: int | None = None) -> None:
        nbytes = _ring.PAGE_SIZE if nbytes is None else nbytes
        _ring.ring_max(nbytes)  # validates the size with a clear error
        self._unopened()
        try:
            self._memfd = os.memfd_create("kvmcoal-buffer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self._memfd, _memfd_size(nbytes))
            fcntl.fcntl(self._memfd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
            self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._open(nbytes, initialize=True)
        except OSError as exc:
            self._teardown()
            _raise_if_out_of_fds(exc)
            raise
        except BaseException:
            self._teardown()
            raise

    @classmethod
    def attach(cls, memfd: int, eventfd: int) -> CoalescedBuffer:
        """Open the buffer behind *memfd* and *eventfd* (e.g. received from a peer).

        The descriptors are duplicated; the caller keeps and closes its own.
        Raises ValueError if they are not a kvmcoal buffer's sealed memfd and
        eventfd, and OSError if they cannot be used at all (a closed fd
        number, a memfd that cannot be mapped for writing).

        Attaching in the producer's own process gives a second ``Ring``
        over the same memory, with a producer lock of its own: producers in
        one process must share one buffer object, or their writes race.
        """
        buf = cls.__new__(cls)
        buf._unopened()
        try:
            buf._memfd = os.dup(memfd)
            buf._efd = os.dup(eventfd)
            buf._open(cls._check_fds(buf._memfd, buf._efd), initialize=False)
        except OSError as exc:
            buf._teardown()
            _raise_if_out_of_fds(exc)
            raise
        except BaseException:
            buf._teardown()
            raise
        return buf

    def _unopened(self) -> None:
        # The state _teardown() can undo from any point of the set-up: an
        # exception may land anywhere in it (Ctrl-C, a signal handler's).
        self._closed = True
        self._memfd = self._efd = -1
        self._map = None    # type: ignore[assignment]
        self._ring = None   # type: ignore[assignment]

    @staticmethod
    def _check_fds(memfd: int, eventfd: int) -> int:
        try:
            seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
        except OSError as exc:
            raise ValueError(f"fd {memfd} is not a sealable memfd ({exc.strerror})") from None
        if seals & _SEALS != _SEALS:
            raise ValueError(f"memfd {memfd} is not sealed against shrinking and growing")
        size = os.fstat(memfd).st_size
        if size < _memfd_size(_ring.MIN_RING_NBYTES):
            raise ValueError(f"memfd {memfd} of {size} bytes is too small for a buffer")
        header = os.pread(memfd, _CONTROL.size, size - _CONTROL_SIZE)
        magic, version, nbytes, _ = _CONTROL.unpack(header)
        if magic != _MAGIC or version != _VERSION:
            raise ValueError(f"memfd {memfd} does not hold a kvmcoal buffer "
                             f"(magic {magic:#x}, version {version})")
        if nbytes < _ring.MIN_RING_NBYTES or _memfd_size(nbytes) != size:
            raise ValueError(f"memfd {memfd}: a ring of {nbytes} bytes does not fit "
                             f"its {size} bytes")
        if os.readlink(f"/proc/self/fd/{eventfd}") != "anon_inode:[eventfd]":
            raise ValueError(f"fd {eventfd} is not an eventfd")
        return nbytes

    def _open(self, nbytes: int, *, initialize: bool) -> None:
        # On failure the caller's _teardown() undoes whatever this got to.
        self._map = mmap.mmap(self._memfd, _memfd_size(nbytes))
        control = _align8(nbytes)
        if initialize:
            _CONTROL.pack_into(self._map, control, _MAGIC, _VERSION, nbytes, 0)
        self._nbytes = nbytes
        self._ring = _ring.Ring(self._map, nbytes=nbytes)
        self._ring._attach_notifier(self._efd, control + _SIGNALED_OFFSET)
        if not initialize:          # attached: another process made it
            self._ring._share_notifier()
        self._close_lock = threading.RLock()   # two threads' close() would close fds twice
        self._pid = os.getpid()
        self._on_close: list[Any] = []
        _live_buffers.add(self)
        self._closed = False        # last: from here on close() undoes it all

    def _teardown(self) -> None:
        """Undo a set-up from wherever it got to: each piece once, each fd closed once."""
        self._closed = True
        _live_buffers.discard(self)
        if self._ring is not None:
            self._ring.release()   # its export of the map first, or the map cannot close
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass               # a caller's view of it keeps it mapped; it goes with that
        self._close_fds()

    def _close_fds(self) -> None:
        # Each number is forgotten before it is closed: closed at most once,
        # whatever interrupts this (a leak is possible, a double close is not).
        efd, self._efd = self._efd, -1
        if efd >= 0:
            os.close(efd)
        memfd, self._memfd = self._memfd, -1
        if memfd >= 0:
            os.close(memfd)

    def _forked(self) -> None:
        # In a child after fork(): cut the ring loose without taking its locks
        # (a parent thread may have held them at the fork), so no call in the
        # child can write the parent's ring by accident; the close lock is new
        # for the same reason.
        self._close_lock = threading.RLock()
        if not self._closed:
            self._ring._release_after_fork()
            self._pid = -1

    def _check(self) -> None:
        if self._closed:
            raise ValueError("operation on a closed CoalescedBuffer")
        if self._pid != os.getpid():
            raise BufferForkedError(
                "this CoalescedBuffer was inherited across fork(); attach to it with "
                "CoalescedBuffer.attach(*fds) in the child instead")

    @property
    def ring(self) -> Ring:
        """The buffer's ring (consumer and producer side)."""
        self._check()
        return self._ring

    @property
    def nbytes(self) -> int:
        """Bytes the ring occupies."""
        return self._nbytes

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (or in a child that inherited it, once closed there)."""
        return self._closed

    def stats(self) -> dict[str, int]:
        """Counters of this buffer's ring, as plain values.

        ``pending``: entries in it now; ``depth_high_water``: the most seen
        in it at once, by a producer of this process after a push or by a
        consumer call as it started; ``entries_consumed``: entries consumer
        calls of this process took out, in ``consumer_passes`` calls.
        """
        self._check()
        high, taken, passes = self._ring._stats()
        return {"pending": len(self._ring), "depth_high_water": high,
                "entries_consumed": taken, "consumer_passes": passes}

    def fileno(self) -> int:
        """The eventfd: readable while the ring holds entries (level-triggered).

        Use it with select, selectors, epoll or asyncio's add_reader.  Drain
        through :attr:`ring` (or :meth:`wait`): a consumer call that leaves
        the ring empty makes the fd unreadable again.  It may, rarely, be
        readable once with the ring empty (a producer racing the consumer);
        it is never unreadable while the ring holds entries.
        """
        self._check()
        return self._efd

    def fds(self) -> tuple[int, int]:
        """(memfd, eventfd) to hand to a peer (``socket.send_fds``, ``pass_fds``).

        Hand these, not :meth:`fileno`, to other processes: calling ``fds()``
        is what tells the buffer that a peer may now change the eventfd's
        flags, so that it checks each read and write of it first.

        They stay owned by this buffer; in a child that inherited the buffer
        across fork() they are still valid for :meth:`attach`.
        """
        if self._closed:
            raise ValueError("operation on a closed CoalescedBuffer")
        self._ring._share_notifier()   # a peer may now change the eventfd's flags
        return self._memfd, self._efd

    def send(self, sock: socket.socket) -> None:
        """Send this buffer's fds over a Unix socket to a peer's :meth:`receive`."""
        socket.send_fds(sock, [b"kvmcoal-buffer"], list(self.fds()))

    @classmethod
    def receive(cls, sock: socket.socket) -> CoalescedBuffer:
        """Receive a buffer sent with :meth:`send` and attach to it."""
        msg, fds, _flags, _addr = socket.recv_fds(sock, 64, 2)
        try:
            if msg != b"kvmcoal-buffer" or len(fds) != 2:
                raise ValueError(f"expected a kvmcoal buffer, got {msg!r} with {len(fds)} fds")
            return cls.attach(*fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _poll_fd(self, timeout_ms: int, events: int = select.POLLIN) -> bool:
        # A poll object per call: several threads may wait at once.  poll, not
        # select: any fd number.
        poller = select.poll()
        poller.register(self._efd, events)
        return bool(poller.poll(timeout_ms))

    def readable(self) -> bool:
        """Whether the eventfd polls readable right now (without waiting)."""
        self._check()
        return self._poll_fd(0)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the ring holds entries; False if *timeout* seconds pass first.

        Releases the GIL while it sleeps.  Returns at once if entries are
        pending.
        """
        self._check()
        ring = self._ring
        if ring._consuming_here():
            raise RuntimeError("CoalescedBuffer.wait() called from inside a consume() handler "
                               "of its own ring, which cannot clear the wakeup")
        if timeout is not None and timeout != timeout:
            raise ValueError("wait() timeout is NaN: give seconds, or None to wait for ever")
        if timeout is not None and timeout < 0:
            timeout = 0
        # Beyond a century is for ever (and keeps the arithmetic below finite).
        deadline = (None if timeout is None or timeout > _FOREVER_S
                    else time.monotonic() + timeout)
        while True:
            if len(ring):
                return True
            ring._clear_wakeup()  # an empty ring's eventfd, cleared before sleeping on it
            if deadline is None:
                ms = -1
            else:   # a long timeout sleeps in steps: poll() takes an int of ms
                ms = min(_MAX_SLEEP_MS,
                         max(0, int((deadline - time.monotonic()) * 1000 + 0.999)))
            # The sleep and the check after it are C: the code that runs
            # between the wakeup and the return is what the wake latency pays.
            if ring._sleep(ms):
                return True
            self._check()   # close() from another thread wakes us
            if deadline is not None and time.monotonic() >= deadline:
                return False

    async def wait_async(self) -> None:
        """Await entries in the ring (asyncio; the event loop watches the eventfd).

        Several tasks may await one buffer at once; a :meth:`close` from
        any thread wakes them all with ValueError.  Cancelling the task
        unregisters its reader.
        """
        self._check()
        loop = asyncio.get_running_loop()
        ring = self._ring
        while not len(ring):
            ring._clear_wakeup()
            if len(ring):
                break
            self._check()
            ready: asyncio.Future[None] = loop.create_future()

            def on_readable() -> None:
                if not ready.done():
                    ready.set_result(None)

            # The loop watches a duplicate of the eventfd that this await
            # owns, not self._efd: two tasks awaiting one buffer would
            # replace each other's reader on one number, and a close() from
            # another thread would free that number under the loop.
            try:
                fd = ring._dup_notifier_fd()
            except ValueError:
                self._check()   # closed by another thread just now: say so
                raise
            try:
                loop.add_reader(fd, on_readable)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
            finally:
                os.close(fd)
            self._check()

    async def batches(self, limit: int | None = None) -> AsyncIterator[list[Entry]]:
        """Async iterator of non-empty drained batches (at most *limit* entries each).

        >>> async def consumer(buf):            # doctest: +SKIP
        ...     async for batch in buf.batches():
        ...         handle(batch)
        """
        while True:
            await self.wait_async()
            batch = self._ring.drain(limit)
            if batch:
                yield batch

    def __aiter__(self) -> AsyncIterator[list[Entry]]:
        return self.batches()

    def close(self) -> None:
        """Deregister the buffer's zones, release the ring, close the fds.  Idempotent.

        Threads sleeping in :meth:`wait` or :meth:`wait_async` wake up and get
        ValueError.  Raises RuntimeError (and closes nothing) if called from
        a consume() handler of this buffer's ring.  Safe to call from
        several threads at once: one closes, the others return.
        """
        # Before the lock: a close() on another thread may hold it while it
        # waits for this very handler to return.
        if not self._closed and self._ring._consuming_here():
            raise RuntimeError("CoalescedBuffer.close() called from inside a consume() handler "
                               "of its own ring: close it after the consumer call returns")
        with self._close_lock:
            if self._closed:
                # Finish a close (or a set-up) that an exception interrupted
                # half-way: each piece of the teardown happens once.
                self._teardown()
                return
            self._ring.release()   # first: it refuses from inside a handler
            self._closed = True    # a close() from a callback below returns at once
            callbacks, self._on_close = self._on_close, []
            try:
                for callback in callbacks:
                    callback(self)
            finally:               # a callback that raised must not leak the fds
                # Wake every sleeper (they find the buffer closed).  A counter
                # too full to write (a peer's doing) is readable already: skip
                # it.  A forked child's copy has no sleepers: its write would
                # only wake the parent's consumer for nothing.
                if self._pid == os.getpid() and self._poll_fd(0, select.POLLOUT):
                    try:
                        os.eventfd_write(self._efd, 1)
                    except BlockingIOError:
                        pass
                self._teardown()

    def __enter__(self) -> CoalescedBuffer:
        self._check()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Open, or closed only part of the way (an exception landed inside
        # close()): either way something is still held.
        held = getattr(self, "_memfd", -1) >= 0 or getattr(self, "_efd", -1) >= 0
        if not getattr(self, "_closed", True) or held:
            if hasattr(self, "_close_lock"):
                self.close()
            else:                  # the set-up never got as far as the lock
                self._teardown()

    def __repr__(self) -> str:
        if self._closed:
            return "<CoalescedBuffer closed>"
        return f"<CoalescedBuffer fd={self._efd} nbytes={self._nbytes}>"
