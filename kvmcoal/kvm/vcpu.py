"""The vCPU: its fd and kvm_run mapping, registers, KVM_RUN and the run loop."""

from __future__ import annotations

import errno
import mmap
import operator
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import GuestError
from . import _abi
from ._abi import KvmRunView
from .exits import (Exit, FailEntryExit, HltExit, InternalErrorExit, IoExit, MmioExit,
                    OtherExit, ShutdownExit)
from .fd import OwnsFd
from .x86 import ModeSetup

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["ReadHandler", "Vcpu", "WriteHandler"]

# Bound once: the exit decoding below reads it on every KVM_RUN return.
ABI = _abi.KVM_ABI
_EXIT_NAMES = {number: name[len("KVM_EXIT_"):] for name, number in ABI.items()
               if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN",
                                                                 "KVM_EXIT_IO_OUT")}

WriteHandler = Callable[[int, bytes, bool], object]
"""``write(addr, data, pio)``: a guest write of ``len(data)`` bytes (little-endian)."""
ReadHandler = Callable[[int, int, bool], int]
"""``read(addr, size, pio) -> value``: answer a guest MMIO load or ``in``."""


def _le_bytes(value: int, size: int) -> bytes:
    """*value* as *size* little-endian bytes; the handler's excess high bits are dropped."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"the read handler must return an int, not {type(value).__name__!r}") \
            from None
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class Vcpu(OwnsFd, ModeSetup):
    """A vCPU: registers, KVM_RUN and its typed exits.  Made by :meth:`Vm.create_vcpu`.

    The x86 mode set-up methods (``setup_real_mode``, ``setup_protected_mode``,
    ``setup_long_mode``) come from :class:`kvmcoal.kvm.x86.ModeSetup`.

    One thread at a time may be in :meth:`run` or :meth:`run_loop`; another
    thread's call raises RuntimeError, and so does :meth:`close` from
    another thread while it runs.
    """

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self._fd = fd
        try:
            os.set_inheritable(fd, False)
            self._map = mmap.mmap(fd, vm._vcpu_mmap_size)
            try:
                self._run = KvmRunView(self._map)
            except BaseException:
                self._map.close()
                raise
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        # Held by the thread in run()/run_loop(); re-entrant, so a handler
        # (or a signal handler) on that thread may still close this vCPU.
        self._run_lock = threading.RLock()
        self._in_loop = False    # run_loop() is running, on the thread holding the lock
        self._tid = 0            # the thread that ran it last (its native id)
        self._decoded = 0        # the exit _decode_exit last counted
        self._ring_full_refusals = 0

    def fileno(self) -> int:
        """The vCPU fd; ValueError once closed."""
        if self._fd < 0:
            raise ValueError("operation on a closed Vcpu")
        return self._fd

    def _claim(self, what: str) -> None:
        if not self._run_lock.acquire(blocking=False):
            raise RuntimeError(f"vCPU {self.id} is running in another thread: cannot {what} "
                               f"until its run() or run_loop() returns")

    def get_regs(self) -> dict[str, int]:
        """KVM_GET_REGS: the general-purpose registers, rip and rflags, by name."""
        return _abi.kvm_get_regs(self.fileno())

    def set_regs(self, **regs: int) -> None:
        """Change the named general-purpose registers (rax, ..., rip, rflags)."""
        _abi.kvm_set_regs(self.fileno(), regs)

    def get_sregs(self) -> dict[str, Any]:
        """KVM_GET_SREGS: control registers, EFER, and segments and tables as dicts."""
        return _abi.kvm_get_sregs(self.fileno())

    def set_sregs(self, changes: dict[str, Any]) -> None:
        """Change special registers; segments field by field (see kvm_set_sregs)."""
        _abi.kvm_set_sregs(self.fileno(), changes)

    def stats(self) -> dict[str, Any]:
        """Counters of this vCPU, as plain values.

        ``exits``: KVM_RUN returns; ``exits_by_reason``: the same by
        ``KVM_EXIT_*`` name (``"MMIO"``, ``"IO"``, ``"HLT"``, ...; a number
        for a reason kvmcoal has no name for); ``ring_full_refusals``:
        writes that exited although a coalesced zone holds them, which the
        kernel does only when the ring is full.
        """
        return {"exits": self._run.exits,
                "exits_by_reason": {_EXIT_NAMES.get(reason, str(reason)): n
                                    for reason, n in self._run.exits_by_reason().items()},
                "ring_full_refusals": self._ring_full_refusals}

    @property
    def exit_count(self) -> int:
        """KVM_RUN returns so far: each one an exit to userspace."""
        return self._run.exits

    def run(self) -> Exit:
        """Enter the guest until it exits to userspace; return the exit.

        The caller handles the exit (``complete_mmio_read``, ``complete_io_in``
        for reads) before the next ``run()``.  An exit that ``run_loop`` left
        undelivered (a handler raised) is returned first, without entering
        the guest, whole.  A signal that interrupts KVM_RUN runs its Python
        handler and the vCPU is entered again, unless the handler raised (or
        closed the vCPU).  Raises RuntimeError if another thread is running
        this vCPU, or if called from a ``run_loop`` handler of this vCPU.
        """
        self._claim("run it")
        try:
            if self._in_loop:
                raise RuntimeError(f"vCPU {self.id}: run() called from a run_loop() handler")
            exit_ = self._enter()
            # If an exception lands before this line, the exit stays pending and
            # the next run() returns it again: repeated, never lost.
            self._run.delivered()
            return exit_
        finally:
            self._run_lock.release()

    def _enter(self) -> Exit:
        """The exit kvm_run holds: a pending one, else a new one from KVM_RUN.

        The caller holds ``_run_lock``.
        """
        tid = threading.get_native_id()
        if tid != self._tid:
            self._tid = tid            # for the watcher's tracepoint wake-up
            if self.vm._tracing:
                self.vm._trace_thread(tid)
        # fileno() each time round: a signal handler may have closed the vCPU.
        try:
            while not self._run.enter(self.fileno(), self.vm._routing):
                pass
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # What KVM says when the guest runs where no memory slot is.
            raise OSError(errno.ENOSPC, f"KVM_RUN: the guest at rip={self.get_regs()['rip']:#x} "
                                        f"is outside guest memory (this VM has "
                                        f"{len(self.vm._memory)} memory slots): back it with "
                                        f"Vm.add_memory() first") from None
        return self._decode_exit()

    def run_loop(self, write: WriteHandler, read: ReadHandler, *,
                 drain: Callable[[], object] | None = None) -> HltExit:
        """Run the guest until it halts, delivering every access.

        Writes, from the ring and from exits, go to ``write(addr, data, pio)``
        in guest order; MMIO loads and ``in`` are answered by
        ``read(addr, size, pio)``, which returns an int.  After **every**
        KVM_RUN return the VM's ring is drained into *write* *before* the
        exit is handled, so a write that exited, and any read, comes after
        all the writes the guest made earlier.  Several vCPUs may run their
        loops on several threads: the ring's consumer lock makes each drain
        deliver its entries exactly once, in ring order, and a vCPU's drain
        waits for one in progress.  *drain*, if given, replaces the default
        drain (``ring.consume(write)``) after every KVM_RUN: a Bus passes
        its flush, which drains its other rings too.  Raises GuestError for
        an exit it cannot continue from.

        If a handler raises, the exception propagates and nothing is lost
        or repeated: a write handed to ``write`` counts as delivered (as in
        ``Ring.consume``); the rest of the ring stays in it; an exit not yet
        fully delivered (a read not yet answered, the writes of an ``out``
        not yet handed over) is kept, and the next ``run_loop`` call drains
        the ring and finishes it before it enters the guest again.  The
        state of that exit lives in C, set in the same call as KVM_RUN's
        return, so an exception from a signal handler cannot lose it
        either; one landing between a handler's return and the bookkeeping
        after it can repeat or drop that one access.
        """
        self._claim("run it")
        try:
            if self._in_loop:
                raise RuntimeError(f"vCPU {self.id}: run_loop() called from its own handler")
            self._in_loop = True
            try:
                return self._loop(write, read, drain)
            finally:
                self._in_loop = False
        finally:
            self._run_lock.release()

    def _loop(self, write: WriteHandler, read: ReadHandler,
              drain: Callable[[], object] | None) -> HltExit:
        if drain is None and self.vm._ring_page:
            ring = self.vm.ring

            def drain() -> object:
                return ring.consume(write)
        run = self._run
        while True:
            exit_ = self._enter()        # a pending, maybe partly delivered, exit first
            if drain is not None:
                drain()
            if isinstance(exit_, MmioExit):
                if exit_.is_write:
                    run.delivered()              # handed over: delivered, even if write raises
                    write(exit_.phys_addr, exit_.data, False)
                else:
                    self.complete_mmio_read(
                        _le_bytes(read(exit_.phys_addr, exit_.len, False), exit_.len))
                    run.delivered()
            elif isinstance(exit_, IoExit):
                size, count = exit_.size, exit_.count
                if exit_.is_out and count == 1:    # the common case, kept short
                    run.delivered()
                    write(exit_.port, exit_.data, True)
                elif exit_.is_out:
                    while run.progress < count:
                        i = run.progress * size
                        run.progress += 1
                        if run.progress == count:
                            run.delivered()
                        write(exit_.port, exit_.data[i:i + size], True)
                    run.delivered()              # (count 0: nothing to hand over)
                else:
                    offset = run.io()[4]
                    while run.progress < count:
                        # Each value goes into kvm_run as it is read: a read
                        # that raised later does not ask the earlier ones again.
                        value = _le_bytes(read(exit_.port, size, True), size)
                        at = offset + run.progress * size
                        self._map[at:at + size] = value
                        run.progress += 1
                    run.delivered()
            elif isinstance(exit_, HltExit):
                run.delivered()
                return exit_
            else:
                run.delivered()
                raise GuestError(exit_)

    def _decode_exit(self) -> Exit:
        run = self._run
        reason = run.exit_reason
        # A write that exits although a zone holds it found the ring full
        # (the kernel coalesces every other write a zone holds); counted
        # once per exit, not again when a pending exit is handed back.
        fresh = run.exits != self._decoded
        self._decoded = run.exits
        if reason == ABI["KVM_EXIT_MMIO"]:
            phys_addr, data, is_write = run.mmio()
            if fresh and is_write and self.vm._zoned(phys_addr, len(data), False):
                self._ring_full_refusals += 1
            return MmioExit(phys_addr, data, is_write)
        if reason == ABI["KVM_EXIT_IO"]:
            direction, size, port, count, offset = run.io()
            is_out = direction == ABI["KVM_EXIT_IO_OUT"]
            data = self._map[offset:offset + size * count] if is_out else b""
            if fresh and is_out and self.vm._zoned(port, size, True):
                self._ring_full_refusals += 1
            return IoExit(port, size, count, is_out, data)
        if reason == ABI["KVM_EXIT_HLT"]:
            return HltExit()
        if reason == ABI["KVM_EXIT_SHUTDOWN"]:
            return ShutdownExit()
        if reason == ABI["KVM_EXIT_FAIL_ENTRY"]:
            return FailEntryExit(*run.fail_entry())
        if reason == ABI["KVM_EXIT_INTERNAL_ERROR"]:
            return InternalErrorExit(*run.internal())
        return OtherExit(reason)

    def complete_mmio_read(self, data: bytes) -> None:
        """Give the value of the MMIO read the last exit asked for."""
        self.fileno()
        if self._run.exit_reason != ABI["KVM_EXIT_MMIO"]:
            raise ValueError("the last exit was not MMIO")
        self._run.set_mmio_data(data)

    def complete_io_in(self, data: bytes) -> None:
        """Give the bytes of the IN the last exit asked for (size * count)."""
        self.fileno()
        if self._run.exit_reason != ABI["KVM_EXIT_IO"]:
            raise ValueError("the last exit was not port I/O")
        direction, size, _port, count, offset = self._run.io()
        if direction != ABI["KVM_EXIT_IO_IN"]:
            raise ValueError("the last exit was an OUT, not an IN")
        if len(data) != size * count:
            raise ValueError(f"the pending IN takes {size * count} bytes, got {len(data)}")
        self._map[offset:offset + len(data)] = data

    def close(self) -> None:
        """Close the vCPU and its kvm_run mapping.  Idempotent.

        Raises RuntimeError while another thread is in :meth:`run` or
        :meth:`run_loop`; a handler on the running thread may close it.
        """
        with self.vm._lock:    # not while Vm.ring maps the ring through this fd
            self._claim("close it")
            try:
                self._close_claimed()
            finally:
                self._run_lock.release()

    def _close_when_collected(self) -> None:
        self._close_claimed()    # nothing can be running it: no thread holds it

    def _close_claimed(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._run.release()
            self._map.close()
            os.close(fd)

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} {'closed' if self._fd < 0 else f'fd={self._fd}'}>"
