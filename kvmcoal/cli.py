"""The ``kvmcoal`` command: ``demo`` and ``probe``.

``kvmcoal demo`` boots a small real-mode guest on /dev/kvm that writes a
counting sequence to two MMIO registers and an I/O port, once with those
registers coalesced and once without, drains the kernel's ring after every
exit, checks that every write arrived once and in order, and prints what it
measured.  Where /dev/kvm cannot be used it says why and runs the same write
stream through a software ring instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from . import PAGE_SIZE, RING_MAX, Ring, Zone, guests, kvm

MMIO_BASE = 0xD0000
MMIO_REG = MMIO_BASE + 0x10
PORT = 0x400
CODE_ADDR = 0x1000


def expected_writes(iterations: int, first_value: int = 0) -> Iterator[tuple[int, int, bool, int]]:
    """The (addr, len, pio, value) stream of the store_loop guest, in order."""
    for v in range(first_value, first_value + iterations):
        yield (MMIO_REG, 4, False, v & 0xFFFFFFFF)
        yield (MMIO_REG + 8, 2, False, v & 0xFFFF)
        yield (PORT, 1, True, v & 0xFF)


class _StreamChecker:
    """An IoHandler that checks each write is the next one the guest makes."""

    def __init__(self, iterations: int) -> None:
        self._expected = expected_writes(iterations)
        self.count = 0
        self.sample: list[str] = []

    def write(self, addr: int, data: bytes, pio: bool) -> None:
        value = int.from_bytes(data, "little")
        if next(self._expected, None) != (addr, len(data), pio, value):
            raise RuntimeError(f"write out of order: {len(data)} bytes {value:#x} to "
                               f"{'port' if pio else 'MMIO'} {addr:#x}")
        if len(self.sample) < 6:
            self.sample.append(f"{'port' if pio else 'MMIO'} {addr:#x} <- {value:#0{2 + 2 * len(data)}x}")
        self.count += 1

    def read(self, addr: int, size: int, pio: bool) -> int:
        raise RuntimeError(f"the demo guest does not read, but read {addr:#x}")

    def check_complete(self) -> None:
        if next(self._expected, None) is not None:
            raise RuntimeError("writes went missing: the stream ended early")


def run_guest(iterations: int, coalesced: bool) -> dict[str, Any]:
    """Run store_loop on real KVM through Vcpu.run_loop; return counts and timing."""
    with kvm.Kvm() as k, k.create_vm() as vm:
        memory = vm.add_memory(0, 0x10000)
        code = guests.load("store_loop")
        memory[CODE_ADDR:CODE_ADDR + len(code)] = code
        vcpu = vm.create_vcpu()
        if coalesced:
            vm.register_coalesced_mmio(Zone(MMIO_BASE, 0x1000))
            if k.has_coalesced_pio:
                vm.register_coalesced_mmio(Zone(PORT, 1, pio=True))
        vcpu.setup_real_mode(CODE_ADDR, segments={"es": MMIO_BASE >> 4}, rax=0,
                             rcx=iterations, rdi=MMIO_REG - MMIO_BASE, rdx=PORT)
        checker = _StreamChecker(iterations)
        start = time.perf_counter()
        vcpu.run_loop(checker.write, checker.read)
        elapsed = time.perf_counter() - start
        checker.check_complete()
        exits = vcpu.exit_count
    writes = 3 * iterations
    # Every write but those that exited (all exits except the final HLT) came from the ring.
    return {"coalesced": coalesced, "writes": writes, "exits": exits,
            "from_ring": writes - (exits - 1), "seconds": elapsed,
            "ns_per_write": elapsed / writes * 1e9, "sample": checker.sample}


def run_software(iterations: int) -> dict[str, Any]:
    """The same write stream through a software ring: push, then drain when full."""
    ring = Ring(bytearray(PAGE_SIZE))
    checker = _StreamChecker(iterations)
    drains = 0
    start = time.perf_counter()
    for addr, length, pio, value in expected_writes(iterations):
        data = value.to_bytes(length, "little")
        while not ring.push(addr, data, pio=pio):
            drains += 1
            ring.consume(checker.write)
    ring.consume(checker.write)
    elapsed = time.perf_counter() - start
    checker.check_complete()
    writes = 3 * iterations
    return {"coalesced": True, "writes": writes, "exits": drains, "from_ring": checker.count,
            "seconds": elapsed, "ns_per_write": elapsed / writes * 1e9, "sample": checker.sample}


def _progress(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    reason = kvm.why_unavailable()
    report: dict[str, Any] = {"backend": "kvm" if reason is None else "software",
                              "iterations": args.iterations}
    if reason is not None:
        print(f"/dev/kvm unavailable ({reason}); running the software ring instead")
        report["runs"] = [run_software(args.iterations)]
    else:
        runs = []
        for coalesced in (True, False):
            _progress(f"running the guest: {3 * args.iterations} writes, coalescing "
                      f"{'on' if coalesced else 'off'} ...", args.json)
            runs.append(run_guest(args.iterations, coalesced))
        report["runs"] = runs
        report["speedup"] = runs[1]["seconds"] / runs[0]["seconds"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    first = report["runs"][0]
    print(f"kvmcoal demo: {first['writes']} guest writes to MMIO {MMIO_REG:#x}, "
          f"{MMIO_REG + 8:#x} and port {PORT:#x}; ring of {RING_MAX} slots")
    print("first writes delivered, in guest order:")
    for line in first["sample"]:
        print(f"  {line}")
    print()
    print(f"{'coalescing':<12}{'writes':>10}{'exits':>10}{'coalesced':>11}"
          f"{'ns/write':>10}{'seconds':>10}")
    for run in report["runs"]:
        share = run["from_ring"] / run["writes"]
        print(f"{'on' if run['coalesced'] else 'off':<12}{run['writes']:>10}{run['exits']:>10}"
              f"{share:>10.1%}{run['ns_per_write']:>10.0f}{run['seconds']:>10.3f}")
    if "speedup" in report:
        print(f"speed-up from coalescing: {report['speedup']:.1f}x "
              f"(every write checked: delivered once, in order)")
    return 0


def probe() -> dict[str, Any]:
    """What this host offers kvmcoal."""
    info: dict[str, Any] = {"page_size": PAGE_SIZE, "ring_max": RING_MAX,
                            "ring_capacity": RING_MAX - 1}
    reason = kvm.why_unavailable()
    info["kvm"] = reason is None
    if reason is not None:
        info["kvm_unavailable_reason"] = reason
        return info
    with kvm.Kvm() as k:
        info["kvm_api_version"] = k.api_version
        info["coalesced_mmio_page_offset"] = k.coalesced_mmio_page_offset
        info["coalesced_pio"] = k.has_coalesced_pio
        info["vcpu_mmap_size"] = k.vcpu_mmap_size
    return info


def cmd_probe(args: argparse.Namespace) -> int:
    info = probe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmcoal", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="boot a guest on /dev/kvm and compare coalescing on/off",
                          description=__doc__.split("\n\n")[1])
    demo.add_argument("--iterations", type=int, default=20000,
                      help="guest loop iterations, three writes each (default: 20000)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.set_defaults(func=cmd_demo)
    probe_cmd = sub.add_parser("probe", help="show what this host offers (KVM, ring size)",
                               description="Show the KVM API version, coalesced MMIO/PIO "
                                           "support, page size and ring size of this host.")
    probe_cmd.add_argument("--json", action="store_true", help="print as JSON")
    probe_cmd.set_defaults(func=cmd_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "iterations", 1) < 1:
        build_parser().error("--iterations must be at least 1")
    try:
        return args.func(args)
    except (kvm.KvmUnavailableError, RuntimeError, OSError) as exc:
        print(f"kvmcoal {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
