"""The kvm section: a real guest on /dev/kvm, the Python VMM with and without coalescing, and a C VMM.

One guest, kvmcoal/guests/store_loop.S: 16-bit real mode, each iteration a
4-byte MMIO store to 0xd0010, a 2-byte MMIO store to 0xd0018 and a 1-byte
out to port 0x400 (values counting up), then hlt.  It runs seven ways, each
time in a fresh VM set up as kvmcoal demo does (64 KiB at GPA 0, the guest
at 0x1000, es = 0xd000, ecx = iterations):

* the Python VMM, Vcpu.run_loop delivering to a CheckingDevice, with the
  MMIO page and the port registered as coalesced zones, or with no zone
  (then every store exits to userspace);
* the Python VMM with a device that takes the ring in batches
  (BatchCheckingDevice: drain_into and one bulk check per drain instead
  of a Python call per write), coalesced;
* the Python VMM through a Bus (``bus.run(vcpu)``) with the MMIO page and
  the port mapped coalesced to one device model: BusCheckingDevice, whose
  ``write(offset, size, value)`` does the same check-and-count, called
  once per write by the Bus's delivery in C; or BatchBusCheckingDevice,
  a batch device whose ``write_many`` checks each run of records in bulk;
* c/cvmm.c, a small C VMM doing the same: same setup, same zones, the same
  loop (drain the ring after every KVM_RUN, then dispatch the exit) and a
  handler doing the same check-and-count.  It runs as one long-lived
  process (--serve), as the Python VMM does, because the first run of a
  freshly started process is often markedly slower.  It is built with gcc
  on first use (cbuild.py); without gcc its rows are missing, with why.

Only the run is timed, from just before the first KVM_RUN to the HLT exit:
Python with time.perf_counter around run_loop; C with CLOCK_MONOTONIC inside
the C program (measure()), or from here, from "go" to its result line
(run(), for pytest-benchmark).  Setting the VM up, tearing it down and
building the expected stream are not timed.  Every run checks that each
store arrived exactly once, in guest order (data: a failure raises).

The targets: coalesced at least 2.5x the uncoalesced stores/s (Python VMM);
the Python VMM at least 0.9x the C VMM's stores/s, both coalescing, judged
with a Python call per write and with the batch device, by run_loop and
through Bus.run; through Bus.run with the batch device at least 0.98x.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import kvmcoal
from kvmcoal import Zone, guests, kvm

from . import cbuild
from .baselines import ENTRY
from .reporting import Method, Progress, Ratio, Section, noop, ratio, rotated

MMIO_BASE = 0xD0000
MMIO_REG = MMIO_BASE + 0x10
PORT = 0x400
CODE_ADDR = 0x1000
MEMORY_SIZE = 0x10000
STORES_PER_ITERATION = 3

GUEST_BIN = guests.source_dir() / "store_loop.bin"

Write = tuple[int, bytes, bool]


def iterations_for(stores: int) -> int:
    """Guest loop iterations for about *stores* stores (three per iteration)."""
    return max(1, round(stores / STORES_PER_ITERATION))


def expected_writes(iterations: int) -> list[Write]:
    """Every (addr, data, pio) the guest writes, in order, as write receives them."""
    out = []
    for v in range(iterations):
        out.append((MMIO_REG, (v & 0xFFFFFFFF).to_bytes(4, "little"), False))
        out.append((MMIO_REG + 8, (v & 0xFFFF).to_bytes(2, "little"), False))
        out.append((PORT, (v & 0xFF).to_bytes(1, "little"), True))
    return out


class CheckingDevice:
    """The benchmark's device: each write must be the next one expected; count it."""

    def __init__(self, expected: list[Write]) -> None:
        self._list = expected
        self.count = 0

    def write(self, addr: int, data: bytes, pio: bool) -> None:
        if self.count >= len(self._list) or (addr, data, pio) != self._list[self.count]:
            raise AssertionError(f"write {self.count} out of order: {data!r} to "
                                 f"{'port' if pio else 'MMIO'} {addr:#x}")
        self.count += 1

    def read(self, addr: int, size: int, pio: bool) -> int:
        raise AssertionError(f"store_loop never reads, but read {addr:#x}")

    def check_complete(self) -> None:
        if self.count != len(self._list):
            raise AssertionError(f"only {self.count} of {len(self._list)} writes arrived: "
                                 "the rest went missing")


class BatchCheckingDevice(CheckingDevice):
    """A device model that takes the ring's writes in batches, checked in bulk.

    A Python VMM whose device consumes whole batches (a framebuffer applying
    them with numpy, a log appending them) does not need a Python call per
    write.  drain replaces run_loop's default ring.consume(write): one
    Ring.drain_into of every pending record into a preallocated buffer,
    then one comparison of those raw records with the expected ones
    (drain_into zeroes data beyond len, so the records are exact).  Writes
    that exited (a full ring) still come one by one through write; both
    share one position in the expected stream, so order across the two
    paths is checked too.
    """

    def __init__(self, expected: list[Write], ring: kvmcoal.Ring) -> None:
        super().__init__(expected)
        self._records = memoryview(b"".join(ENTRY.pack(a, len(d), p, d) for a, d, p in expected))
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


# ---------------------------------------------------------------------------
# One way of running the guest: prepare (untimed), run (timed), finish (checked)


class GuestRun:
    """Runs of the guest one way, each prepare(), run(), finish().

    prepare sets up a fresh VM (untimed); run is the timed part and returns
    its seconds; finish checks that every store arrived once, in order,
    records the run's figures in last and counts it in runs.  next_round
    finishes a pending run, then prepares: pytest-benchmark's setup, so
    every timed round is checked.  measure does one run.
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
    """The Python VMM: Vcpu.run_loop delivering to a CheckingDevice.

    With *batch*, to a BatchCheckingDevice instead: the ring goes to the
    device in batches (run_loop(..., drain=device.drain)).
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
        """A fresh VM with the guest loaded and the registers set, as kvmcoal demo does."""
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
        """The timed part: run_loop until HLT."""
        vcpu, device = self._vcpu, self._device
        if vcpu is None or device is None:
            raise RuntimeError("prepare() first")
        drain = device.drain if isinstance(device, BatchCheckingDevice) else None
        start = time.perf_counter()
        vcpu.run_loop(device.write, device.read, drain=drain)
        self._seconds = time.perf_counter() - start
        return self._seconds

    def finish(self) -> dict[str, Any]:
        vcpu, device, seconds = self._vcpu, self._device, self._seconds
        if vcpu is None or device is None or seconds is None:
            raise RuntimeError("run() first")
        device.check_complete()
        exits = vcpu.exit_count   # KVM_RUN returns
        self.close()
        return self._record(exits, seconds)

    def close(self) -> None:
        for res in (self._vm, self._kvm):
            if res is not None:
                res.close()
        self._kvm = self._vm = self._vcpu = self._device = None


class BusCheckingDevice:
    """The Bus runs' device, mapped over the MMIO page and the port: each
    ``write(offset, size, value)`` must be the next one expected; count it.

    With *batch* it is a batch device too: ``write_many`` compares each run
    of raw records with the expected ones in one go (as BatchCheckingDevice
    does with its drains).  Writes that exited still come through write;
    both share one position in the expected stream.
    """

    def __init__(self, expected: list[Write]) -> None:
        self._list = [(addr - (0 if pio else MMIO_BASE), len(data),
                       int.from_bytes(data, "little")) for addr, data, pio in expected]
        # The records write_many gets: offsets in place of addresses.  bytes,
        # whose slices compare with memcmp (a memoryview's compare item by item).
        self._records = b"".join(ENTRY.pack(o, s, int(p), d) for (o, s, _v), (_a, d, p)
                                 in zip(self._list, expected))
        self.count = 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self.count >= len(self._list) or (offset, size, value) != self._list[self.count]:
            raise AssertionError(f"write {self.count} out of order: {value:#x} ({size} bytes) "
                                 f"at offset {offset:#x}")
        self.count += 1

    def read(self, offset: int, size: int) -> int:
        raise AssertionError(f"store_loop never reads, but read offset {offset:#x}")

    def check_complete(self) -> None:
        if self.count != len(self._list):
            raise AssertionError(f"only {self.count} of {len(self._list)} writes arrived: "
                                 "the rest went missing")


class BatchBusCheckingDevice(BusCheckingDevice):
    def write_many(self, records: Any) -> None:
        raw = bytes(records)
        start = self.count * kvmcoal.ENTRY_SIZE
        if raw != self._records[start:start + len(raw)]:
            raise AssertionError(f"a run of {len(raw) // kvmcoal.ENTRY_SIZE} writes from write "
                                 f"{self.count} on is not the expected stream")
        self.count += len(raw) // kvmcoal.ENTRY_SIZE


class BusRun(PythonRun):
    """The Python VMM through a Bus: ``bus.run(vcpu)``, a device call per write
    (BusCheckingDevice) or, with *batch*, a batch device (write_many)."""

    label = "python_bus"

    def __init__(self, stores: int, coalesced: bool, batch: bool = False) -> None:
        super().__init__(stores, coalesced)
        self.label = "python_bus_batch" if batch else "python_bus"
        self.bus_batch = batch
        self._bus: kvmcoal.Bus | None = None

    def prepare(self) -> None:
        super().prepare()
        assert self._vm is not None and self._kvm is not None
        # The zones PythonRun registered are the Bus's to make: start again.
        for zone, _ in self._vm.zones:
            self._vm.unregister_coalesced_mmio(zone)
        device = (BatchBusCheckingDevice if self.bus_batch else BusCheckingDevice)(
            self._expected)
        self._bus = bus = kvmcoal.Bus(self._vm)
        bus.map(device, MMIO_BASE, 0x1000, coalesced=self.coalesced)
        bus.map(device, PORT, 1, pio=True,
                coalesced=self.coalesced and self._kvm.has_coalesced_pio, device_offset=PORT)
        self._device = device      # type: ignore[assignment]

    def run(self) -> float:
        vcpu, bus = self._vcpu, self._bus
        if vcpu is None or bus is None:
            raise RuntimeError("prepare() first")
        start = time.perf_counter()
        bus.run(vcpu)
        self._seconds = time.perf_counter() - start
        return self._seconds

    def finish(self) -> dict[str, Any]:
        vcpu, vm, bus, device, seconds = (self._vcpu, self._vm, self._bus, self._device,
                                          self._seconds)
        if vcpu is None or vm is None or bus is None or device is None or seconds is None:
            raise RuntimeError("run() first")
        device.check_complete()
        stats = {"vm": vm.stats(), "vcpu": vcpu.stats(), "bus": bus.stats()}
        exits = vcpu.exit_count
        self.close()
        return self._record(exits, seconds, stats=stats)

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None
        super().close()


# ---------------------------------------------------------------------------
# The C VMM


# The C VMM cannot be built here (no gcc, or no <linux/kvm.h>); the message says why.
CvmmUnavailable = cbuild.CBuildUnavailable


def build_cvmm() -> Path:
    """The cached build of c/cvmm.c (gcc -O2), compiled unless it is there already."""
    return cbuild.build("cvmm.c", "executable")


def _parse(line: str) -> dict[str, Any]:
    try:
        result = json.loads(line)
    except json.JSONDecodeError:
        raise RuntimeError(f"cvmm printed no result: {line!r}") from None
    if not isinstance(result, dict):
        raise RuntimeError(f"cvmm printed no result: {line!r}")
    return result


def run_cvmm_once(stores: int, coalesced: bool, binary: Path | None = None) -> dict[str, Any]:
    """cvmm GUEST N [--coalesce]: one run in a fresh process; its JSON and exit status."""
    cmd = [str(binary or build_cvmm()), str(GUEST_BIN), str(iterations_for(stores)),
           *(["--coalesce"] if coalesced else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return {**_parse(proc.stdout), "returncode": proc.returncode, "stderr": proc.stderr}


class CvmmServer:
    """A long-lived cvmm GUEST --serve: many runs, each in a fresh VM, like a Python VMM.

    prepare(iterations, coalesced) has it set a VM up; go() runs it and
    returns the result line and the seconds from sending "go" to reading
    the line.  close() ends it and checks its exit status.
    """

    def __init__(self, binary: Path | None = None) -> None:
        self.binary = binary or build_cvmm()
        self._proc: subprocess.Popen[str] | None = None

    def _pipes(self) -> tuple[IO[str], IO[str]]:
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

    def go(self) -> tuple[dict[str, Any], float]:
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
    """The C VMM, cvmm: the same guest, setup, loop and checks, in a long-lived process.

    prepare has the server set up a VM; run tells it to go and reads its
    result, timed from here (so that, like PythonRun.run, it can be handed
    to pytest-benchmark); finish checks the result.  measure does the three
    and takes the time the C program measured itself (c_seconds in the
    figures either way).  Without a *server* the run starts, and closes,
    its own.
    """

    label = "c"

    def __init__(self, stores: int, coalesced: bool, server: CvmmServer | None = None) -> None:
        super().__init__(stores, coalesced)
        self._own_server = server is None
        self.server = server or CvmmServer()
        self._result: dict[str, Any] | None = None

    def prepare(self) -> None:
        self._result = None
        self.server.prepare(self.iterations, self.coalesced)

    def run(self) -> float:
        """The timed part: let the prepared VMM go and read its result."""
        self._result, seconds = self.server.go()
        self._seconds = seconds
        return seconds

    def finish(self) -> dict[str, Any]:
        result, seconds = self._result, self._seconds
        if result is None or seconds is None:
            raise RuntimeError("run() first")
        self._result = None
        if result.get("ok") is not True:
            raise AssertionError(f"cvmm: not every store arrived once, in order ({result})")
        if result["stores"] != self.stores or result["coalesced"] != self.coalesced:
            raise AssertionError(f"cvmm ran another guest than asked for ({result})")
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


# ---------------------------------------------------------------------------
# The measurement

LABELS = {
    "python_coalesced": "Python VMM (run_loop), coalesced",
    "python_uncoalesced": "Python VMM (run_loop), uncoalesced",
    "python_batch_coalesced": "Python VMM, batch device, coalesced",
    "python_bus_coalesced": "Python VMM (Bus.run), coalesced",
    "python_bus_batch_coalesced": "Python VMM (Bus.run), batch device, coalesced",
    "c_coalesced": "C VMM (cvmm.c), coalesced",
    "c_uncoalesced": "C VMM (cvmm.c), uncoalesced",
}

RATIOS: list[tuple[str, str, str | None, float | None]] = [
    # numerator, denominator, op, target
    ("python_coalesced", "python_uncoalesced", ">=", 2.5),
    ("python_coalesced", "c_coalesced", ">=", 0.9),
    ("python_batch_coalesced", "c_coalesced", ">=", 0.9),
    ("python_bus_coalesced", "c_coalesced", ">=", 0.9),
    ("python_bus_batch_coalesced", "c_coalesced", ">=", 0.98),
    ("c_coalesced", "c_uncoalesced", None, None),
    ("python_uncoalesced", "c_uncoalesced", None, None),
]

SHORT = {"python_coalesced": "python coalesced", "python_uncoalesced": "python uncoalesced",
         "python_batch_coalesced": "python batch coalesced",
         "python_bus_coalesced": "Bus.run coalesced",
         "python_bus_batch_coalesced": "Bus.run batch coalesced",
         "c_coalesced": "C coalesced", "c_uncoalesced": "C uncoalesced"}


def measure(stores: int, blocks: int, progress: Progress | None = None) -> Section:
    """Time the five runs of *stores* stores in *blocks* interleaved blocks.

    After one untimed warm-up run of each, each block runs the five once,
    the order rotated from block to block.  Where the C VMM cannot be
    built (no gcc), the Python runs are measured alone, and the C runs and
    the ratios against them say "missing", why.
    """
    say = progress or noop
    c_missing: str | None = None
    with contextlib.ExitStack() as stack:
        pending: list[GuestRun] = [PythonRun(stores, True), PythonRun(stores, False),
                                   PythonRun(stores, True, batch=True), BusRun(stores, True),
                                   BusRun(stores, True, batch=True)]
        try:
            server = stack.enter_context(CvmmServer())  # closing it checks cvmm's exit status
        except CvmmUnavailable as exc:
            c_missing = str(exc)
        else:
            pending += [CRun(stores, True, server), CRun(stores, False, server)]
        runs = [stack.enter_context(r) for r in pending]
        say("real KVM: warm-up runs")
        for r in runs:            # warm-up, untimed
            r.measure()
        samples: dict[str, list[dict[str, Any]]] = {r.key: [] for r in runs}
        for b in range(blocks):
            say(f"real KVM: block {b + 1} of {blocks}")
            for r in rotated(runs, b):
                samples[r.key].append(r.measure())  # raises unless every store arrived in order

    methods: dict[str, Method] = {}
    for key, label in LABELS.items():       # in LABELS order, measured or missing
        if key not in samples:
            methods[key] = {"label": label, "missing": c_missing}
            continue
        got = samples[key]
        rates = [s["stores_per_s"] for s in got]
        exits = sorted({s["exits"] for s in got})
        methods[key] = {
            "label": label,
            "runs": len(got),
            "median_stores_per_s": statistics.median(rates),
            "best_stores_per_s": max(rates),
            "median_ns_per_store": statistics.median(s["ns_per_store"] for s in got),
            "exits": exits[0] if len(exits) == 1 else exits,
            "stores_per_s": rates,
        }
        if "stats" in got[-1]:       # the last run's VM, vCPU and Bus statistics
            methods[key]["stats"] = got[-1]["stats"]
    per_block = {key: m.get("stores_per_s", []) for key, m in methods.items()}
    ratios: list[Ratio] = [
        ratio(f"stores/s: {SHORT[num]} / {SHORT[den]}", methods, num, den, per_block, op, target,
              pooled={"pooled": "median_stores_per_s"})
        for num, den, op, target in RATIOS]
    overhead = (None if c_missing else methods["python_coalesced"]["median_ns_per_store"]
                - methods["c_coalesced"]["median_ns_per_store"])
    return {
        "caption": [
            f"store_loop guest on /dev/kvm: {runs[0].stores:,} stores per run "
            f"({runs[0].iterations:,} iterations: 4-byte and 2-byte MMIO stores, 1-byte out),",
            f"a fresh VM per run, ring of {kvmcoal.RING_MAX - 1} entries; {blocks} blocks of "
            "the runs, interleaved; timed: first KVM_RUN to HLT;",
            "every run checked (each store delivered once, in order); stores/s, ns/store: "
            "median; exits: KVM_RUN returns per run",
            ("Python VMM - C VMM, coalesced: the C VMM is missing" if overhead is None else
             f"Python VMM - C VMM, coalesced: {overhead:+.0f} ns/store"),
        ],
        "meta": {
            "ring_capacity": kvmcoal.RING_MAX - 1,
            "timing": ("the run only, first KVM_RUN to HLT: Python perf_counter around "
                       "run_loop, C CLOCK_MONOTONIC inside cvmm; a fresh VM per run"),
            "statistic": ("per method: median and best stores/s over blocks; per ratio: "
                          "pooled (median/median) and blocks (median over blocks of the "
                          "within-block ratio), which the verdict uses"),
        },
        "stores": runs[0].stores,          # rounded to whole iterations
        "iterations": runs[0].iterations,
        "blocks": blocks,
        "methods": methods,
        "python_minus_c_ns_per_store_coalesced": overhead,
        "ratios": ratios,
    }
