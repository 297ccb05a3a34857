"""The real-KVM workload shared by ``test_kvm_vmm.py`` and ``report_kvm.py``.

One guest, ``kvmcoal/guests/store_loop.S``: 16-bit real mode, each
iteration a 4-byte MMIO store to 0xd0010, a 2-byte MMIO store to 0xd0018
and a 1-byte ``out`` to port 0x400 (values counting up), then ``hlt``.  It
runs five ways, each time in a fresh VM set up as ``kvmcoal demo`` does
(64 KiB at GPA 0, the guest at 0x1000, es = 0xd000, ecx = iterations):

* the Python VMM, ``Vcpu.run_loop`` delivering to a :class:`CheckingDevice`,
  with the MMIO page and the port registered as coalesced zones, or with no
  zone (then every store exits to userspace);
* the Python VMM with a device that takes the ring in batches
  (:class:`BatchCheckingDevice`: ``drain_into`` and one bulk check per
  drain instead of a Python call per write), coalesced;
* ``benchmarks/cvmm.c``, a small C VMM doing the same: same setup, same
  zones, the same loop (drain the ring after every KVM_RUN, then dispatch
  the exit) and a handler doing the same check-and-count.  It runs as one
  long-lived process (``--serve``), as the Python VMM does, because the
  first run of a freshly started process is often markedly slower here.

Only the run is timed, from just before the first KVM_RUN to the HLT exit:
Python with ``time.perf_counter`` around ``run_loop``; C with
``CLOCK_MONOTONIC`` inside the C program (``measure()``), or from here, from
"go" to its result line (``run()``, for pytest-benchmark).  Setting the VM
up, tearing it down and building the expected stream are not timed.  Every
run checks that each store arrived exactly once, in guest order.

The C VMM is built with ``gcc -O2`` on first use into ``benchmarks/build/``
(git-ignored), named by a hash of its source and flags so that an edit
rebuilds it.
"""

from __future__ import annotations

import inspect
import json
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import kvmcoal
from kvmcoal import Zone, guests, kvm

if __package__:
    from . import cbuild
else:  # imported by a report run as a script: python benchmarks/report_kvm.py
    import cbuild

MMIO_BASE = 0xD0000
MMIO_REG = MMIO_BASE + 0x10
PORT = 0x400
CODE_ADDR = 0x1000
MEMORY_SIZE = 0x10000
STORES_PER_ITERATION = 3

DEFAULT_STORES = 100_000
SMOKE_STORES = 3_000

HERE = Path(__file__).resolve().parent
CVMM_SOURCE = HERE / "cvmm.c"
GUEST_BIN = guests.source_dir() / "store_loop.bin"
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]
_RECORD = struct.Struct("<QII8s")   # struct kvm_coalesced_mmio, as drain_into writes it


def iterations_for(stores: int) -> int:
    """Guest loop iterations for about *stores* stores (three per iteration)."""
    return max(1, round(stores / STORES_PER_ITERATION))


def expected_writes(iterations: int) -> list[tuple[int, bytes, bool]]:
    """Every ``(addr, data, pio)`` the guest writes, in order, as ``write`` receives them."""
    out = []
    for v in range(iterations):
        out.append((MMIO_REG, (v & 0xFFFFFFFF).to_bytes(4, "little"), False))
        out.append((MMIO_REG + 8, (v & 0xFFFF).to_bytes(2, "little"), False))
        out.append((PORT, (v & 0xFF).to_bytes(1, "little"), True))
    return out


class CheckingDevice:
    """The benchmark's IoHandler: each write must be the next one expected; count it."""

    def __init__(self, expected: list[tuple[int, bytes, bool]]) -> None:
        self._expected = iter(expected)
        self.count = 0

    def write(self, addr: int, data: bytes, pio: bool) -> None:
        if (addr, data, pio) != next(self._expected, None):
            raise AssertionError(f"write {self.count} out of order: {data!r} to "
                                 f"{'port' if pio else 'MMIO'} {addr:#x}")
        self.count += 1

    def read(self, addr: int, size: int, pio: bool) -> int:
        raise AssertionError(f"store_loop never reads, but read {addr:#x}")

    def check_complete(self) -> None:
        if next(self._expected, None) is not None:
            raise AssertionError(f"only {self.count} writes arrived: the rest went missing")


class BatchCheckingDevice(CheckingDevice):
    """A device model that takes the ring's writes in batches, checked in bulk.

    A Python VMM whose device consumes whole batches (a framebuffer applying
    them with numpy, a log appending them) does not need a Python call per
    write.  ``drain`` replaces ``run_loop``'s default ``ring.consume(write)``:
    one ``Ring.drain_into`` of every pending record into a preallocated
    buffer, then one comparison of those raw records with the expected
    ones (``drain_into`` zeroes ``data`` beyond ``len``, so the records are
    exact).  Writes that exited (a full ring) still come one by one through
    ``write``; both share one position in the expected stream, so order
    across the two paths is checked too.
    """

    def __init__(self, expected: list[tuple[int, bytes, bool]], ring: kvmcoal.Ring) -> None:
        super().__init__(expected)
        self._list = expected
        self._records = memoryview(b"".join(
            _RECORD.pack(a, len(d), p, d) for a, d, p in expected))
        self._ring = ring
        self._out = bytearray(ring.capacity * kvmcoal.ENTRY_SIZE)

    def drain(self) -> int:
        n = self._ring.drain_into(self._out)
        if n:
            start = self.count * kvmcoal.ENTRY_SIZE
            end = start + n * kvmcoal.ENTRY_SIZE
            if self._out[:n * kvmcoal.ENTRY_SIZE] != self._records[start:end]:
                raise AssertionError(f"a batch of {n} writes from write {self.count} on "
                                     "is not the expected stream")
            self.count += n
        return n

    def write(self, addr: int, data: bytes, pio: bool) -> None:
        if self.count >= len(self._list) or (addr, data, pio) != self._list[self.count]:
            raise AssertionError(f"write {self.count} out of order: {data!r} to "
                                 f"{'port' if pio else 'MMIO'} {addr:#x}")
        self.count += 1

    def check_complete(self) -> None:
        if self.count != len(self._list):
            raise AssertionError(f"only {self.count} of {len(self._list)} writes arrived")


# kvmcoal's run loop took one IoHandler object (``run_loop(handler)``) and, since
# 6d75e64, takes the two callables (``run_loop(write, read)``); either works here.
_RUN_LOOP_TAKES_HANDLER = "handler" in inspect.signature(kvm.Vcpu.run_loop).parameters


def run_loop(vcpu: kvm.Vcpu, device: CheckingDevice) -> None:
    """``vcpu.run_loop`` delivering to *device*'s ``write`` and ``read`` (and ``drain``)."""
    if _RUN_LOOP_TAKES_HANDLER:
        vcpu.run_loop(device)
    elif isinstance(device, BatchCheckingDevice):
        vcpu.run_loop(device.write, device.read, drain=device.drain)
    else:
        vcpu.run_loop(device.write, device.read)


def kvm_unavailable() -> str | None:
    """Why the real-KVM benchmarks cannot run here, or None."""
    return kvm.why_unavailable()


# ---------------------------------------------------------------------------
# One way of running the guest: prepare (untimed), run (timed), finish (checked)


class GuestRun:
    """Runs of the guest one way, each ``prepare()``, ``run()``, ``finish()``.

    ``prepare`` sets up a fresh VM (untimed); ``run`` is the timed part and
    returns its seconds; ``finish`` checks that every store arrived once, in
    order, records the run's figures in ``last`` and counts it in ``runs``.
    ``next_round`` finishes a pending run, then prepares: pytest-benchmark's
    ``setup``, so every timed round is checked.  ``measure`` does one run.
    """

    label = ""

    def __init__(self, stores: int, coalesced: bool) -> None:
        self.iterations = iterations_for(stores)
        self.stores = STORES_PER_ITERATION * self.iterations
        self.coalesced = coalesced
        self.runs = 0
        self.last: dict[str, Any] | None = None
        self._seconds: float | None = None

    @property
    def key(self) -> str:
        return f"{self.label}_{'coalesced' if self.coalesced else 'uncoalesced'}"

    def prepare(self) -> None:
        raise NotImplementedError

    def run(self) -> float:
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def next_round(self) -> None:
        if self._seconds is not None:
            self.finish()
        self.prepare()

    def measure(self) -> dict[str, Any]:
        self.prepare()
        self.run()
        return self.finish()

    def _record(self, exits: int | None, seconds: float, **more: Any) -> dict[str, Any]:
        self.runs += 1
        self._seconds = None
        self.last = {"stores": self.stores, "exits": exits, "seconds": seconds,
                     "stores_per_s": self.stores / seconds,
                     "ns_per_store": seconds / self.stores * 1e9, **more}
        return self.last

    def __enter__(self) -> GuestRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PythonRun(GuestRun):
    """The Python VMM: ``Vcpu.run_loop`` delivering to a :class:`CheckingDevice`.

    With *batch*, to a :class:`BatchCheckingDevice` instead: the ring goes to
    the device in batches (``run_loop(..., drain=device.drain)``).
    """

    label = "python"

    def __init__(self, stores: int, coalesced: bool, batch: bool = False) -> None:
        super().__init__(stores, coalesced)
        if batch:
            self.label = "python_batch"
        self.batch = batch
        self._expected = expected_writes(self.iterations)
        self._kvm: kvm.Kvm | None = None
        self._vm: kvm.Vm | None = None
        self._vcpu: kvm.Vcpu | None = None
        self._device: CheckingDevice | None = None

    def prepare(self) -> None:
        """A fresh VM with the guest loaded and the registers set, as ``kvmcoal demo`` does."""
        self.close()
        self._kvm = k = kvm.Kvm()
        self._vm = vm = k.create_vm()
        memory = vm.add_memory(0, MEMORY_SIZE)
        code = guests.load("store_loop")
        memory[CODE_ADDR:CODE_ADDR + len(code)] = code
        self._vcpu = vcpu = vm.create_vcpu()
        if self.coalesced:
            vm.register_coalesced_mmio(Zone(MMIO_BASE, 0x1000))
            if k.has_coalesced_pio:
                vm.register_coalesced_mmio(Zone(PORT, 1, pio=True))
        vcpu.setup_real_mode(CODE_ADDR, segments={"es": MMIO_BASE >> 4}, rax=0,
                             rcx=self.iterations, rdi=MMIO_REG - MMIO_BASE, rdx=PORT)
        _ = vm.ring   # mapped now rather than in the timed run_loop
        self._device = (BatchCheckingDevice(self._expected, vm.ring) if self.batch
                        else CheckingDevice(self._expected))

    def run(self) -> float:
        """The timed part: ``run_loop`` until HLT."""
        assert self._vcpu is not None and self._device is not None, "prepare() first"
        start = time.perf_counter()
        run_loop(self._vcpu, self._device)
        self._seconds = time.perf_counter() - start
        return self._seconds

    def finish(self) -> dict[str, Any]:
        assert self._vcpu is not None and self._device is not None and self._seconds is not None
        self._device.check_complete()
        assert self._device.count == self.stores
        exits = getattr(self._vcpu, "exit_count", None)   # KVM_RUN returns
        self.close()
        return self._record(exits, self._seconds)

    def close(self) -> None:
        for res in (self._vm, self._kvm):
            if res is not None:
                res.close()
        self._kvm = self._vm = self._vcpu = self._device = None


# ---------------------------------------------------------------------------
# The C VMM


# The C VMM cannot be built here (no gcc, or no <linux/kvm.h>); the message says why.
CvmmUnavailable = cbuild.CBuildUnavailable


def build_cvmm() -> Path:
    """``benchmarks/build/cvmm-HASH``, compiled with gcc -O2 unless it is there already."""
    return cbuild.build(CVMM_SOURCE, "executable", CFLAGS)


def _parse(line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise RuntimeError(f"cvmm printed no result: {line!r}") from None


def run_cvmm_once(stores: int, coalesced: bool, binary: Path | None = None) -> dict[str, Any]:
    """``cvmm GUEST N [--coalesce]``: one run in a fresh process; its JSON and exit status."""
    cmd = [str(binary or build_cvmm()), str(GUEST_BIN), str(iterations_for(stores)),
           *(["--coalesce"] if coalesced else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return {**_parse(proc.stdout), "returncode": proc.returncode, "stderr": proc.stderr}


class CvmmServer:
    """A long-lived ``cvmm GUEST --serve``: many runs, each in a fresh VM, like a Python VMM.

    ``prepare(iterations, coalesced)`` has it set a VM up; ``go()`` runs it
    and returns the result line and the seconds from sending "go" to
    reading the line.  ``close()`` ends it and checks its exit status.
    """

    def __init__(self, binary: Path | None = None) -> None:
        self.binary = binary or build_cvmm()
        self._proc: subprocess.Popen | None = None

    def _pipes(self):
        if self._proc is None:
            self._proc = subprocess.Popen([str(self.binary), str(GUEST_BIN), "--serve"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        return self._proc.stdin, self._proc.stdout

    def prepare(self, iterations: int, coalesced: bool) -> None:
        stdin, stdout = self._pipes()
        stdin.write(f"prepare {iterations} {int(coalesced)}\n")
        stdin.flush()
        ready = stdout.readline()
        if ready != "ready\n":
            raise RuntimeError(f"cvmm did not get ready: {ready!r}")

    def go(self) -> tuple[dict, float]:
        stdin, stdout = self._pipes()
        start = time.perf_counter()
        stdin.write("go\n")
        stdin.flush()
        line = stdout.readline()
        return _parse(line), time.perf_counter() - start

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if rc != 0:
            raise AssertionError(f"cvmm --serve exited {rc}: a run went wrong")

    def __enter__(self) -> CvmmServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class CRun(GuestRun):
    """The C VMM, ``cvmm``: the same guest, setup, loop and checks, in a long-lived process.

    ``prepare`` has the server set up a VM; ``run`` tells it to go and reads
    its result, timed from here (so that, like PythonRun.run, it can be
    handed to pytest-benchmark); ``finish`` checks the result.  ``measure``
    does the three and takes the time the C program measured itself
    (``c_seconds`` in the figures either way).  Without a *server* the run
    starts, and closes, its own.
    """

    label = "c"

    def __init__(self, stores: int, coalesced: bool, server: CvmmServer | None = None) -> None:
        super().__init__(stores, coalesced)
        self._own_server = server is None
        self.server = server or CvmmServer()
        self._result: dict | None = None

    def prepare(self) -> None:
        self._result = None
        self.server.prepare(self.iterations, self.coalesced)

    def run(self) -> float:
        """The timed part: let the prepared VMM go and read its result."""
        self._result, self._seconds = self.server.go()
        return self._seconds

    def finish(self) -> dict[str, Any]:
        result, seconds = self._result, self._seconds
        assert result is not None and seconds is not None, "run() first"
        self._result = None
        if result.get("ok") is not True:
            raise AssertionError(f"cvmm: not every store arrived once, in order ({result})")
        assert result["stores"] == self.stores and result["coalesced"] == self.coalesced
        return self._record(result["exits"], seconds, c_seconds=result["seconds"])

    def measure(self) -> dict[str, Any]:
        """One run, timed by the C program itself."""
        self.prepare()
        self.run()
        self._seconds = self._result["seconds"] if self._result else None
        return self.finish()

    def close(self) -> None:
        if self._own_server:
            self.server.close()
