"""CoalescedBuffer: poll readiness, wakeups, sharing with other processes, fork."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kvmcoal import BufferForkedError, CoalescedBuffer, RingCorruptedError, ring_max


@pytest.fixture
def buf():
    with CoalescedBuffer() as b:
        yield b


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_readiness_is_level_triggered(buf):
    assert not readable(buf.fileno())
    assert buf.ring.push(0x10, b"a")
    assert readable(buf.fileno()) and buf.readable()
    assert buf.ring.push(0x10, b"b")
    assert readable(buf.fileno())
    assert buf.ring.pop().data == b"a"
    assert readable(buf.fileno())          # one entry is still pending
    assert buf.ring.drain()[0].data == b"b"
    assert not readable(buf.fileno())      # a drain that empties it
    for consume in (lambda r: r.consume(lambda *a: None), lambda r: r.drain_into(bytearray(240)),
                    lambda r: list(r)):
        buf.ring.push(1, b"x")
        assert readable(buf.fileno())
        consume(buf.ring)
        assert not readable(buf.fileno())


def test_pollers_of_every_kind(buf):
    sel = selectors.DefaultSelector()
    sel.register(buf, selectors.EVENT_READ)
    ep = select.epoll()
    ep.register(buf.fileno(), select.EPOLLIN)
    assert sel.select(0) == [] and ep.poll(0) == []
    buf.ring.push(1, b"x")
    assert len(sel.select(0)) == 1 and len(ep.poll(0)) == 1
    buf.ring.drain()
    assert sel.select(0) == [] and ep.poll(0) == []
    sel.close()
    ep.close()


def test_wait(buf):
    t0 = time.monotonic()
    assert buf.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.04
    buf.ring.push(1, b"x")
    assert buf.wait(0) is True and buf.wait() is True
    timer = threading.Timer(0.05, lambda: buf.ring.push(2, b"y"))
    buf.ring.drain()
    timer.start()
    assert buf.wait(10) is True
    assert [e.phys_addr for e in buf.ring.drain()] == [2]


def test_no_lost_wakeup_over_many_sleeps(buf):
    """A consumer that finds the ring empty and sleeps is always woken."""
    total = 30000
    got = []
    sleeps = 0

    def producer():
        for i in range(total):
            while not buf.ring.push(i, i.to_bytes(4, "little")):
                time.sleep(0)
            if i % 7 == 0:
                time.sleep(0)  # let the consumer empty the ring and go to sleep

    p = threading.Thread(target=producer)
    p.start()
    while len(got) < total:
        if not len(buf.ring):
            sleeps += 1
            assert buf.wait(10), f"lost wakeup after {len(got)} entries"
        got.extend(e.phys_addr for e in buf.ring.drain())
    p.join()
    assert got == list(range(total))
    assert sleeps > 1000, sleeps   # the consumer really slept and woke many times


def test_asyncio(buf):
    async def main():
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, buf.ring.push, 1, b"a")
        await asyncio.wait_for(buf.wait_async(), 5)
        batches = []
        loop.call_later(0.02, lambda: [buf.ring.push(i, b"b") for i in range(2, 5)])
        async for batch in buf:
            batches.append([e.phys_addr for e in batch])
            if sum(map(len, batches)) == 4:
                break
        return batches

    assert [a for b in asyncio.run(main()) for a in b] == [1, 2, 3, 4]


def test_any_ring_size():
    for size in (56, 1000, 65536, 3 * 4096 + 8):
        with CoalescedBuffer(size) as b:
            assert b.nbytes == size and b.ring.max == ring_max(size)
    with pytest.raises(ValueError, match="56-byte minimum"):
        CoalescedBuffer(32)          # one slot: could hold no entry


def test_memory_is_sealed(buf):
    memfd, _ = buf.fds()
    with pytest.raises(PermissionError):
        os.ftruncate(memfd, 64)
    with pytest.raises(PermissionError):
        os.ftruncate(memfd, 1 << 20)
    with pytest.raises(PermissionError):
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)


def test_closed_buffer(buf):
    buf.close()
    buf.close()
    assert buf.closed
    with pytest.raises(ValueError, match="closed"):
        buf.fileno()
    with pytest.raises(ValueError, match="closed"):
        buf.ring
    with pytest.raises(ValueError, match="closed"):
        buf.wait(0)


def test_attach_shares_the_ring(buf):
    peer = CoalescedBuffer.attach(*buf.fds())
    assert peer.ring.push(7, b"hi")
    assert buf.readable()
    assert buf.ring.pop().data == b"hi"
    assert not peer.readable()
    peer.close()
    assert buf.ring.push(8, b"ok")   # the attacher closed its own fds only


def test_attach_refuses_what_is_not_a_buffer(buf, tmp_path):
    memfd, efd = buf.fds()
    plain = os.memfd_create("plain", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(plain, 4096 + 64)
    sealed_plain = os.memfd_create("plain", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(sealed_plain, 4096 + 64)
    fcntl.fcntl(sealed_plain, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    regular = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(ValueError, match="not sealed"):
            CoalescedBuffer.attach(plain, efd)
        with pytest.raises(ValueError, match="magic"):
            CoalescedBuffer.attach(sealed_plain, efd)
        with pytest.raises(ValueError, match="sealable memfd"):
            CoalescedBuffer.attach(regular, efd)
        with pytest.raises(ValueError, match="not an eventfd"):
            CoalescedBuffer.attach(memfd, regular)
    finally:
        for fd in (plain, sealed_plain, regular):
            os.close(fd)


def test_send_and_receive_over_a_socket(buf):
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        buf.send(left)
        peer = CoalescedBuffer.receive(right)
    with peer:
        peer.ring.push(3, b"z")
        assert buf.ring.pop().phys_addr == 3


PRODUCER = textwrap.dedent("""
    import os, sys
    from kvmcoal import CoalescedBuffer
    memfd, efd, count = map(int, sys.argv[1:4])
    buf = CoalescedBuffer.attach(memfd, efd)
    push = buf.ring.push
    i = 0
    while count < 0 or i < count:
        if push(i, i.to_bytes(8, "little")):
            i += 1
        else:
            os.sched_yield()
""")


def start_producer(buf, count):
    memfd, efd = buf.fds()
    return subprocess.Popen([sys.executable, "-c", PRODUCER, str(memfd), str(efd), str(count)],
                            pass_fds=(memfd, efd))


STRESS_ENTRIES = int(os.environ.get("KVMCOAL_STRESS_ENTRIES", "1000000"))


def check_stream(buf, total):
    """Consume *total* sequence-numbered entries, sleeping in wait() whenever empty."""
    expected = 0
    sleeps = 0
    out = bytearray(24 * buf.ring.max)
    view = memoryview(out).cast("Q")
    while expected < total:
        if not len(buf.ring):
            sleeps += 1
            if not buf.wait(30):
                pytest.fail(f"producer stalled after {expected} entries")
        n = buf.ring.drain_into(out)
        for k in range(n):   # phys_addr is the sequence number, data repeats it
            assert view[3 * k] == expected and view[3 * k + 2] == expected
            expected += 1
    return sleeps


def test_stress_thread_to_thread(buf):
    total = STRESS_ENTRIES

    def producer():
        push = buf.ring.push
        i = 0
        while i < total:
            if push(i, i.to_bytes(8, "little")):
                i += 1
            else:
                time.sleep(0)

    t = threading.Thread(target=producer)
    t.start()
    check_stream(buf, total)
    t.join()
    assert len(buf.ring) == 0


def test_million_entries_from_another_process(buf):
    total = STRESS_ENTRIES
    proc = start_producer(buf, total)
    check_stream(buf, total)
    assert proc.wait(30) == 0
    assert len(buf.ring) == 0


def test_producer_killed_mid_stream_leaves_only_whole_entries(buf):
    proc = start_producer(buf, -1)
    seen = 0
    while seen < 20000:
        assert buf.wait(30)
        for e in buf.ring.drain():
            assert e.phys_addr == seen and e.value == seen
            seen += 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    for e in buf.ring.drain():   # whatever it published before dying is whole
        assert e.phys_addr == seen and e.value == seen
        seen += 1


def test_garbage_from_a_peer_raises_and_never_crashes(buf):
    memfd, _ = buf.fds()
    buf.ring.push(1, b"ok")
    os.pwrite(memfd, (9999).to_bytes(4, "little"), 4)   # a hostile `last`
    with pytest.raises(RingCorruptedError, match="last=9999"):
        buf.ring.drain()
    assert not buf.ring.push(2, b"x")                    # the producer refuses too
    buf.ring.reset()
    assert buf.ring.push(2, b"x") and buf.wait(0)


def test_fork_child_cannot_touch_the_parents_ring(buf):
    buf.ring.push(1, b"parent")
    ring = buf.ring
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            try:
                buf.ring
                code |= 1
            except BufferForkedError:
                pass
            try:
                ring.push(2, b"child")
                code |= 2
            except ValueError:
                pass
            child = CoalescedBuffer.attach(*buf.fds())   # deliberate use is fine
            if not child.ring.push(3, b"attached"):
                code |= 4
        except BaseException:
            code |= 8
        os.write(w, bytes([code]))
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"\0"
    os.close(r)
    os.waitpid(pid, 0)
    assert [e.data for e in buf.ring.drain()] == [b"parent", b"attached"]


def _sleeper(buf: CoalescedBuffer, errors: list) -> threading.Thread:
    """A thread that waits on *buf* until close() wakes it with ValueError (into *errors*)."""
    def sleep() -> None:
        try:
            buf.wait()
        except ValueError as exc:
            errors.append(exc)

    return threading.Thread(target=sleep)


def test_close_from_another_thread_wakes_waiters():
    buf = CoalescedBuffer()
    errors = []
    t = _sleeper(buf, errors)
    t.start()
    time.sleep(0.05)
    buf.close()
    t.join(5)
    assert not t.is_alive() and "closed" in str(errors[0])


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_while_threads_sleep_reuses_no_fd_under_them():
    """The sleepers poll the ring's own duplicate of the eventfd: close() closes the
    buffer's fds at once, fd numbers get reused, and the sleepers still wake and leave;
    the last one out closes the duplicate."""
    before = _open_fds()
    buf = CoalescedBuffer()
    errors = []
    threads = [_sleeper(buf, errors) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    buf.close()
    reused = [os.eventfd(0) for _ in range(4)]   # likely the numbers close() just freed
    try:
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads)
        assert len(errors) == 3 and all("closed" in str(e) for e in errors)
    finally:
        for fd in reused:
            os.close(fd)
    assert _open_fds() == before


def test_tasks_awaiting_one_buffer_all_wake(buf):
    """Each await registers its own duplicate of the eventfd with the loop, so two
    tasks on one buffer do not replace each other's reader."""
    async def main():
        waiters = [asyncio.ensure_future(buf.wait_async()) for _ in range(3)]
        await asyncio.sleep(0.02)             # all three are registered and asleep
        threading.Timer(0.02, buf.ring.push, (1, b"a")).start()
        await asyncio.wait_for(asyncio.gather(*waiters), 5)

    before = _open_fds()
    asyncio.run(main())
    assert _open_fds() == before              # every await closed its duplicate


def test_close_from_another_thread_wakes_async_waiters_and_reuses_no_fd_under_them():
    before = _open_fds()
    buf = CoalescedBuffer()
    reused: list[int] = []

    def close_and_reuse_the_numbers():
        buf.close()
        reused.extend(os.eventfd(0) for _ in range(4))

    closer = threading.Timer(0.02, close_and_reuse_the_numbers)

    async def main():
        waiters = [asyncio.ensure_future(buf.wait_async()) for _ in range(2)]
        await asyncio.sleep(0.02)
        closer.start()
        return await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)

    try:
        results = asyncio.run(main())
    finally:
        closer.join(5)      # the waiters may wake before it has opened all four
        for fd in reused:
            os.close(fd)
    assert len(results) == 2
    assert all(isinstance(r, ValueError) and "closed" in str(r) for r in results), results
    assert _open_fds() == before


def test_cancelled_wait_async_leaves_no_reader_or_fd(buf):
    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(buf.wait_async())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        buf.ring.push(1, b"a")                # a reader left behind would run now
        await asyncio.sleep(0.02)
        assert not loop._selector.get_map() or all(   # only the loop's own self-pipe
            key.fd == loop._ssock.fileno() for key in loop._selector.get_map().values())

    before = _open_fds()
    asyncio.run(main())
    assert _open_fds() == before


def test_wait_inside_a_handler_is_refused_and_close_is_refused_there_too(buf):
    buf.ring.push(1, b"x")
    caught = []

    def handler(addr, data, pio):
        for call in (lambda: buf.wait(0.1), buf.close):
            try:
                call()
            except RuntimeError as exc:
                caught.append(str(exc))

    buf.ring.consume(handler)
    assert len(caught) == 2 and all("inside" in c for c in caught)
    assert not buf.closed and buf.ring.push(2, b"y")   # still whole and usable


def test_concurrent_waiters_and_readable(buf):
    results = []
    threads = [threading.Thread(target=lambda: results.append(buf.wait(5))) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(50):
        buf.readable()
    buf.ring.push(1, b"x")
    for t in threads:
        t.join(5)
    assert results == [True, True, True]


def test_failed_attach_reports_the_real_error_and_keeps_the_callers_fds(buf):
    memfd = os.memfd_create("wsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        src, _ = buf.fds()
        os.ftruncate(memfd, os.fstat(src).st_size)
        os.pwrite(memfd, os.pread(src, os.fstat(src).st_size, 0), 0)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE)
        with pytest.raises(PermissionError):   # mmap of a write-sealed memfd
            CoalescedBuffer.attach(memfd, buf.fds()[1])
        os.fstat(memfd)                         # still open: attach closed only its dups
        assert buf.ring.push(1, b"x")
    finally:
        os.close(memfd)


def test_notifier_offset_is_bounds_checked():
    from kvmcoal import _ring
    ring = _ring.Ring(bytearray(4096 + 64), nbytes=4096)
    for offset in (2**63 - 4, -4, 4096 + 62, 100):
        with pytest.raises(ValueError, match="notifier word"):
            ring._attach_notifier(0, offset)


def test_a_ring_kept_past_its_buffers_close_refuses_everything():
    buf = CoalescedBuffer()
    ring = buf.ring
    ring.push(1, b"x")
    buf.close()
    for call in (len, lambda r: r.push(1, b"x"), lambda r: r.drain(), lambda r: r.pop(),
                 lambda r: r.consume(print), lambda r: r.drain_into(bytearray(24))):
        with pytest.raises(ValueError, match="released"):
            call(ring)


class _Alarm(Exception):
    pass


def test_a_signal_during_wait_runs_its_handler_and_can_interrupt_it(buf):
    calls = []

    def count(signum, frame):
        calls.append(signum)

    def interrupt(signum, frame):
        raise _Alarm

    old = signal.signal(signal.SIGALRM, count)
    try:
        # A handler that returns: wait() sleeps on to its timeout.
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        assert buf.wait(0.3) is False
        assert calls == [signal.SIGALRM] and time.monotonic() - start >= 0.29
        # A handler that raises: the exception comes out of wait() at once.
        signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        with pytest.raises(_Alarm):
            buf.wait(5)
        assert time.monotonic() - start < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    # The buffer still works.
    assert buf.ring.push(0x10, b"\x01") and buf.wait(1) is True


def test_push_many_wakes_a_sleeping_consumer_once(buf):
    records = b"".join((0x10 + i).to_bytes(8, "little") + (1).to_bytes(4, "little")
                       + bytes(4) + bytes([i]) + bytes(7) for i in range(50))
    timer = threading.Timer(0.05, lambda: buf.ring.push_many(records))
    timer.start()
    assert buf.wait(10) is True
    timer.join()
    assert [e.value for e in buf.ring.drain()] == list(range(50))
    assert not buf.readable()      # the one wakeup was cleared by the drain


def _make_blocking(fd: int) -> None:
    """What any process holding the buffer's eventfd can do to its shared flags."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def test_a_peer_clearing_o_nonblock_cannot_hang_the_consumer(buf):
    _make_blocking(buf.fds()[1])            # fds(): handed to a peer, which does this
    t0 = time.monotonic()
    assert buf.wait(0.2) is False                 # the idle read must not block
    assert time.monotonic() - t0 < 2
    assert buf.ring.push(1, b"a") and buf.wait(1)
    assert len(buf.ring.drain()) == 1


def test_a_peer_saturating_the_counter_cannot_freeze_producers_or_close():
    """With O_NONBLOCK cleared and the counter one short of its limit, a write to the
    eventfd would block with the producer lock held; kvmcoal skips it (the fd is
    readable already), reports success for the entry it recorded, and closes."""
    buf = CoalescedBuffer()
    efd = buf.fds()[1]
    _make_blocking(efd)
    os.eventfd_write(efd, 0xFFFFFFFFFFFFFFFE)
    done = threading.Event()

    def produce() -> None:
        for i in range(3):
            assert buf.ring.push(i, b"x")
            buf.ring.drain()             # re-arms the wakeup, so the next push signals
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert done.wait(5), "a producer blocked on the saturated eventfd"
    buf.close()
    assert buf.closed


def test_close_from_two_threads_closes_each_fd_once():
    for _ in range(20):
        before = _open_fds()
        buf = CoalescedBuffer()
        buf.ring.push(1, b"a")
        started = threading.Event()

        def slow_consumer() -> None:
            buf.ring.consume(lambda *a: (started.set(), time.sleep(0.05)))

        consumer = threading.Thread(target=slow_consumer)
        consumer.start()
        started.wait(5)
        closers = [threading.Thread(target=buf.close) for _ in range(2)]
        for t in closers:
            t.start()
        reused = [os.eventfd(0) for _ in range(2)]   # likely the numbers close() frees
        for t in closers + [consumer]:
            t.join(5)
        for fd in reused:
            os.fstat(fd)                              # neither was closed by a second close()
            os.close(fd)
        assert _open_fds() == before


def test_wait_takes_any_timeout():
    with CoalescedBuffer() as buf:
        threading.Timer(0.05, buf.ring.push, (1, b"a")).start()
        assert buf.wait(30 * 24 * 3600) is True      # more ms than a C int holds
        buf.ring.drain()
        threading.Timer(0.05, buf.ring.push, (1, b"a")).start()
        assert buf.wait(float("inf")) is True
        with pytest.raises(ValueError, match="NaN"):
            buf.wait(float("nan"))


def test_a_forked_childs_close_does_not_wake_the_parent(buf):
    pid = os.fork()
    if pid == 0:
        buf.close()                      # or just exiting, through __del__
        os._exit(0)
    os.waitpid(pid, 0)
    assert not buf.readable()            # no spurious wakeup from the child


def test_close_with_an_eventfd_numbered_past_1024_closes_everything():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        buf = CoalescedBuffer()
        assert buf.fileno() >= 1024
        memfd, efd = buf.fds()
        buf.close()
        for fd in (memfd, efd):
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_close_callback_that_raises_does_not_leak_the_fds():
    buf = CoalescedBuffer()
    memfd, efd = buf.fds()

    def failing(_buf):
        raise KeyError("callback failed")

    buf._on_close.append(failing)
    with pytest.raises(KeyError):
        buf.close()
    assert buf.closed
    for fd in (memfd, efd):
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize("timeout", [1e300, 1e307, 1e308, float("inf")])
def test_wait_takes_huge_timeouts(buf, timeout):
    threading.Timer(0.05, buf.ring.push, (1, b"a")).start()
    assert buf.wait(timeout) is True


@pytest.mark.parametrize("timeout", [-1, -1e308, float("-inf")])
def test_a_negative_timeout_is_no_wait(buf, timeout):
    assert buf.wait(timeout) is False


def test_close_with_a_view_of_the_memory_alive_still_closes_the_fds():
    buf = CoalescedBuffer()
    memfd, efd = buf.fds()
    view = memoryview(buf._map)          # as a caller's numpy view of the ring would
    buf.close()
    for fd in (memfd, efd):
        with pytest.raises(OSError):
            os.fstat(fd)
    view.release()


def test_close_from_a_handler_is_refused_even_while_another_thread_closes():
    """The handler's close() used to block on the close lock that the other
    thread's close() held while it waited for this very handler: a deadlock."""
    buf = CoalescedBuffer()
    assert buf.ring.push(1, b"x")
    other_closing = threading.Event()
    outcome: list[object] = []

    def handler(addr, data, pio):
        closer = threading.Thread(target=lambda: (other_closing.set(), buf.close()), daemon=True)
        closer.start()
        assert other_closing.wait(5)
        time.sleep(0.05)                 # the closer now holds the lock and waits for us
        try:
            buf.close()
        except RuntimeError as exc:
            outcome.append(exc)
        outcome.append(closer)

    consumer = threading.Thread(target=buf.ring.consume, args=(handler,), daemon=True)
    consumer.start()
    consumer.join(10)
    assert not consumer.is_alive(), "close() from the handler deadlocked"
    error, closer = outcome
    assert isinstance(error, RuntimeError) and "consume() handler" in str(error)
    closer.join(10)
    assert buf.closed


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("make", ["new", "attach"])
def test_an_exception_anywhere_in_set_up_closes_each_fd_once(make):
    """An exception may land on any line of the set-up (Ctrl-C, a signal handler
    raising).  Injected on each line in turn, with a trace function: nothing
    leaks, and the half-built object never closes an fd number a second time,
    by then someone else's (the pipe below)."""
    import gc

    source = CoalescedBuffer()
    memfd, efd = source.fds()
    code = CoalescedBuffer._open.__code__
    lines = sorted({line for _, _, line in code.co_lines() if line is not None})
    lines += ["__init__"] if make == "new" else []
    assert len(lines) > 10

    class Injected(Exception):
        pass

    def build():
        return CoalescedBuffer() if make == "new" else CoalescedBuffer.attach(memfd, efd)

    gc.collect()
    baseline = _fds()
    for target in lines:
        def tracer(frame, event, arg, target=target):
            if frame.f_code is code and event == "line" and frame.f_lineno == target:
                raise Injected(target)
            if target == "__init__" and event == "return" and frame.f_code is code:
                raise Injected(target)   # _open done: the last step of the constructor
            return tracer

        sys.settrace(tracer)
        try:
            build().close()              # a line this path never reaches
        except Injected:
            pass
        finally:
            sys.settrace(None)
        r, w = os.pipe()                 # the numbers a double close would hit
        gc.collect()                     # the half-built buffer's __del__, if any
        os.write(w, b"ok")
        assert os.read(r, 2) == b"ok"
        os.close(r)
        os.close(w)
        assert _fds() == baseline, f"fds leaked with the exception at {target}"
    source.close()


def test_an_exception_anywhere_in_close_still_frees_everything():
    """An exception inside close() (a signal handler's, say) used to leave the
    fds open for good: close() and __del__ saw the buffer closed and skipped."""
    import gc

    import inspect
    import linecache

    codes = [CoalescedBuffer.close.__code__, CoalescedBuffer._teardown.__code__,
             CoalescedBuffer._close_fds.__code__]
    source = inspect.getsourcefile(CoalescedBuffer)

    def in_the_window(line: int) -> bool:
        # Between forgetting an fd number and closing it, the number lives only
        # in a local: an exception there leaks that one fd (the documented
        # limit; the alternative order could close someone else's).
        text = linecache.getline(source, line)
        return "os.close(" in text or text.strip() in ("if efd >= 0:", "if memfd >= 0:")

    targets = [(code, line) for code in codes
               for line in sorted({ln for _, _, ln in code.co_lines() if ln is not None})
               if not (code is codes[2] and in_the_window(line))]
    assert len(targets) > 20

    class Injected(Exception):
        pass

    gc.collect()
    baseline = _fds()
    for code, target in targets:
        buf = CoalescedBuffer()
        assert buf.ring.push(1, b"x")

        def tracer(frame, event, arg, code=code, target=target):
            if frame.f_code is code and event == "line" and frame.f_lineno == target:
                raise Injected(target)
            return tracer

        sys.settrace(tracer)
        try:
            buf.close()
        except Injected:
            pass
        finally:
            sys.settrace(None)
        del buf
        gc.collect()                     # __del__ finishes what close() did not
        assert _fds() == baseline, f"fds leaked with the exception at {code.co_name}:{target}"


def test_running_out_of_fds_says_how_many_the_buffers_hold():
    """Past RLIMIT_NOFILE, a new buffer's EMFILE names the fds buffers hold and the fix
    (in a child: the limit is the process's)."""
    script = textwrap.dedent("""
        import errno, resource
        from kvmcoal import CoalescedBuffer
        from kvmcoal.buffers import FDS_PER_BUFFER
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(CoalescedBuffer())
        except OSError as exc:
            assert exc.errno == errno.EMFILE, exc
            msg = str(exc)
            assert f"a CoalescedBuffer holds {FDS_PER_BUFFER}" in msg, msg
            assert f"this process has {len(held)} open" in msg and "ulimit -n" in msg, msg
        assert 5 < len(held) < 16, len(held)
        for b in held:
            b.close()
        CoalescedBuffer().close()          # nothing leaked by the failed one
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
