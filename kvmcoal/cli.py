"""The kvmcoal command: demo, probe and bench.

"kvmcoal demo" boots a small real-mode guest on /dev/kvm.  The guest prints
a banner through a 16550 UART, then streams writes into a framebuffer and the
UART.  It runs twice in one go, with the UART's data register and the
framebuffer coalesced and then without, through a kvmcoal Bus.  The demo
checks that the devices saw every write, byte for byte, and prints what it
measured.  On real KVM it then rings a doorbell device mapped on its own
buffer, served by the bus's poller thread while a second guest keeps
running without exits, and prints the guest-write-to-device latency.  Where /dev/kvm cannot be used it says why and drives the same
devices through EmulatedVm instead, with a software CPU making the same
writes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import PAGE_SIZE, RING_MAX, Bus, EmulatedVm, bench, guests, kvm
from .devices import Doorbell, Framebuffer, Uart16550

UART = 0x3F8
FRAMEBUFFER = 0xA0000          # real-mode segment 0xa000, a 64 KiB window
FRAMEBUFFER_SIZE = 0x10000
CODE_ADDR, BANNER_ADDR = 0x1000, 0x2000
DOORBELL_ROUNDS = 200
BANNER = b"kvmcoal demo guest: hello through a coalesced UART\n"


def expected_uart(iterations: int) -> bytes:
    """What the demo guest sends to the UART (see guests/demo.S)."""
    out = bytearray(BANNER)
    for i in range(iterations):
        out.append(ord("a") + i % 26)
        if i % 64 == 63:
            out.append(ord("\n"))
    return bytes(out)


def expected_framebuffer(iterations: int) -> bytes:
    """The framebuffer after the stream: slot k holds the last i with 4i = 4k mod 64 KiB."""
    slots = FRAMEBUFFER_SIZE // 4
    words = [0] * slots
    for k in range(min(slots, iterations)):
        words[k] = k + slots * ((iterations - 1 - k) // slots)
    return b"".join(w.to_bytes(4, "little") for w in words)


def guest_writes(iterations: int) -> int:
    """Writes the demo guest makes: one framebuffer store per iteration, plus the UART bytes."""
    return iterations + len(expected_uart(iterations))


def _devices(bus: Bus, coalesced: bool) -> tuple[Uart16550, Framebuffer]:
    uart, fb = Uart16550(), Framebuffer(FRAMEBUFFER_SIZE)
    bus.map(uart, UART, 1, pio=True, coalesced=coalesced)
    bus.map(uart, UART + 1, 7, pio=True, flush_on_access=True, device_offset=1)
    bus.map(fb, FRAMEBUFFER, FRAMEBUFFER_SIZE, coalesced=coalesced)
    return uart, fb


def _check(uart: Uart16550, fb: Framebuffer, iterations: int) -> None:
    if bytes(uart.output) != expected_uart(iterations):
        raise RuntimeError("the UART output differs from what the guest wrote")
    if bytes(fb.memory) != expected_framebuffer(iterations):
        raise RuntimeError("the framebuffer differs from what the guest wrote")


def _result(coalesced: bool, writes: int, exits: int, elapsed: float,
            uart: Uart16550, stats: dict[str, Any]) -> dict[str, Any]:
    return {"coalesced": coalesced, "writes": writes, "exits": exits,
            "from_ring": writes - exits, "seconds": elapsed,
            "ns_per_write": elapsed / writes * 1e9, "uart": bytes(uart.output).decode(),
            "stats": stats}


def run_guest(iterations: int, coalesced: bool) -> dict[str, Any]:
    """Run the demo guest on real KVM with its devices on a Bus."""
    with kvm.Kvm() as k, k.create_vm() as vm:
        memory = vm.add_memory(0, 0x10000)
        code = guests.load("demo")
        memory[CODE_ADDR:CODE_ADDR + len(code)] = code
        memory[BANNER_ADDR:BANNER_ADDR + len(BANNER)] = BANNER
        bus = Bus(vm)
        uart, fb = _devices(bus, coalesced and k.has_coalesced_pio)
        vcpu = vm.create_vcpu()
        vcpu.setup_real_mode(CODE_ADDR, segments={"es": FRAMEBUFFER >> 4}, rsi=BANNER_ADDR,
                             rcx=len(BANNER), rdx=UART, rbp=iterations)
        start = time.perf_counter()
        bus.run(vcpu)
        elapsed = time.perf_counter() - start
        _check(uart, fb, iterations)
        stats = {"vm": vm.stats(), "vcpu": vcpu.stats(), "bus": bus.stats()}
        # Every exit but the final HLT was a write that did not coalesce.
        return _result(coalesced, guest_writes(iterations), vcpu.exit_count - 1, elapsed, uart,
                       stats)


def run_emulated(iterations: int, coalesced: bool) -> dict[str, Any]:
    """The same writes from a software CPU, through EmulatedVm and the same Bus."""
    with EmulatedVm() as vm:
        bus = Bus(vm)
        uart, fb = _devices(bus, coalesced)
        write = bus.write
        start = time.perf_counter()
        for ch in BANNER:
            write(UART, 1, ch, pio=True)
        column = 0
        for i in range(iterations):
            write(FRAMEBUFFER + 4 * i % FRAMEBUFFER_SIZE, 4, i)
            write(UART, 1, ord("a") + i % 26, pio=True)
            column += 1
            if column == 64:
                write(UART, 1, ord("\n"), pio=True)
                column = 0
        bus.flush()
        elapsed = time.perf_counter() - start
        _check(uart, fb, iterations)
        return _result(coalesced, guest_writes(iterations), bus.direct_writes, elapsed, uart,
                       {"vm": vm.stats(), "bus": bus.stats()})


class _TimedDoorbell(Doorbell):
    """A Doorbell that notes when each request reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[int] = []

    def write(self, offset: int, size: int, value: int) -> None:
        self.times.append(time.perf_counter_ns())
        super().write(offset, size, value)


def run_doorbell(rounds: int) -> dict[str, Any]:
    """A doorbell device on its own buffer, served by a poller while the guest runs.

    The doorbell guest rings once per round without exiting; the VM's
    watcher routes each write to the device's buffer and the bus's poller
    thread delivers it.  Returns the latency from the host raising the
    round's counter (the guest then writes) to the device's write().
    """
    from .bench.doorbell import DoorbellGuest
    from .bench.reporting import percentile
    with kvm.Kvm() as k:
        bell = _TimedDoorbell()
        g = DoorbellGuest(k, rounds + 1, device=bell)
        try:
            g.vm.start_watcher()
            latencies = []
            for _ in range(rounds):
                time.sleep(0.002)
                latencies.append(g.ring_device() / 1e3)
            g.ring_device()
            g.finish()
        finally:
            g.close()
    latencies.sort()
    return {"rounds": rounds, "exits_before_hlt": g.vcpu.exit_count - 1,
            "p50_us": percentile(latencies, 50), "p99_us": percentile(latencies, 99),
            "watcher_interval_us": 100}


def _stats_line(stats: dict[str, Any]) -> str:
    """The coalesced run's statistics in a few lines (all of them are in --json)."""
    vm, bus = stats["vm"], stats["bus"]
    exits = ", ".join(f"{n} {reason}" for reason, n in vm["exits"].items() if n)
    devices = "; ".join(
        f"{m['device']} at {'port' if m['pio'] else 'MMIO'} {m['base']:#x}: {m['delivered']} "
        f"from rings (largest flush {m['largest_batch']}, write_many calls {m['batches']}), "
        f"{m['direct']} direct"
        for m in bus["mappings"] if m["delivered"] or m["direct"])
    return (f"statistics, coalescing on: the VM coalesced {vm['coalesced_writes']} writes "
            f"({vm['ring_full_refusals']} refused by a full ring; exits: {exits or 'none'});\n"
            f"  the bus made {bus['flushes_with_entries']} flushes that delivered; {devices}")


def _progress(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    reason = None if args.producer == "emulated" else kvm.why_unavailable()
    if args.producer == "kvm" and reason is not None:
        raise kvm.KvmUnavailableError(reason)
    producer = "emulated" if args.producer == "emulated" or reason is not None else "kvm"
    if reason is not None:
        print(f"/dev/kvm is not usable ({reason}); running the same devices through "
              f"EmulatedVm instead")
    run = run_guest if producer == "kvm" else run_emulated
    writes = guest_writes(args.iterations)
    runs = []
    for coalesced in (True, False):
        _progress(f"running the {'guest' if producer == 'kvm' else 'software CPU'}: {writes} "
                  f"writes, coalescing {'on' if coalesced else 'off'} ...", args.json)
        runs.append(run(args.iterations, coalesced))
    doorbell = None
    if producer == "kvm":
        _progress(f"ringing a doorbell on its own buffer {DOORBELL_ROUNDS} times while the "
                  f"guest runs ...", args.json)
        doorbell = run_doorbell(DOORBELL_ROUNDS)
    # producer: what made the writes (real KVM or EmulatedVm); kvm_backend:
    # which KVM module serves this host's /dev/kvm, whichever ran.
    report: dict[str, Any] = {"producer": producer, "kvm_backend": kvm.backend()["backend"],
                              "iterations": args.iterations, "runs": runs,
                              "speedup": runs[1]["seconds"] / runs[0]["seconds"],
                              "doorbell": doorbell}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    uart = runs[0]["uart"]
    where = f"real KVM ({report['kvm_backend']})" if producer == "kvm" else "EmulatedVm"
    print(f"kvmcoal demo on {where}: "
          f"{writes} writes to a UART (port {UART:#x}) and a framebuffer "
          f"(MMIO {FRAMEBUFFER:#x}); ring of {RING_MAX} slots")
    print("guest output (UART):")
    lines = uart.splitlines()
    for line in lines[:3]:
        print(f"  | {line}")
    print(f"  | ... {len(lines) - 3} more lines, {len(uart)} bytes in all, checked byte for byte")
    print()
    print(f"{'coalescing':<12}{'writes':>10}{'exits':>10}{'coalesced':>11}"
          f"{'ns/write':>10}{'seconds':>10}")
    for result in runs:
        share = result["from_ring"] / result["writes"]
        print(f"{'on' if result['coalesced'] else 'off':<12}{result['writes']:>10}"
              f"{result['exits']:>10}{share:>10.1%}{result['ns_per_write']:>10.0f}"
              f"{result['seconds']:>10.3f}")
    print(f"speed-up from coalescing: {report['speedup']:.1f}x (UART output and framebuffer "
          f"checked against what the guest wrote)")
    print(_stats_line(runs[0]["stats"]))
    if producer == "emulated":
        print("(a software CPU has no VM exit for coalescing to save: on EmulatedVm the "
              "ring is pure overhead; run on /dev/kvm to see the real gain)")
    if doorbell is not None:
        print()
        print(f"doorbell on its own buffer, served by a poller thread while the guest runs "
              f"({doorbell['exits_before_hlt']} exits before its HLT): {doorbell['rounds']} "
              f"rings, guest write to device p50 {doorbell['p50_us']:.0f} µs, "
              f"p99 {doorbell['p99_us']:.0f} µs (the VM's watcher routing every "
              f"{doorbell['watcher_interval_us']} µs)")
    return 0


def probe() -> dict[str, Any]:
    """What this host offers kvmcoal, and which KVM backend serves /dev/kvm."""
    info: dict[str, Any] = {"page_size": PAGE_SIZE, "ring_max": RING_MAX,
                            "ring_capacity": RING_MAX - 1}
    reason = kvm.why_unavailable()
    info["kvm"] = reason is None
    info.update({key if key.startswith("kvm_") else f"kvm_{key}": value
                 for key, value in kvm.backend().items()})
    if info["kvm_hardware_assisted"] is False:
        info["kvm_note"] = ("no hardware virtualisation: guest code runs largely in KVM's "
                            "instruction emulator, so guest-side figures from this host are "
                            "far slower than on kvm_intel or kvm_amd")
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
            if isinstance(value, list):
                value = ", ".join(value) or "none"
            print(f"{key:<{width}}  {'unknown' if value is None else value}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if not 0 < args.scale < math.inf:
        raise ValueError("--scale must be a positive number")
    if args.blocks is not None and args.blocks < 1:
        raise ValueError("--blocks must be at least 1")
    return bench.main(args.only, args.skip, args.scale, args.json, args.plot, args.check,
                      args.quiet, blocks=args.blocks)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmcoal", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="boot a guest on /dev/kvm and compare coalescing on/off",
                          description=__doc__.split("\n\n")[1])
    demo.add_argument("--iterations", type=_at_least_one, default=150000,
                      help="stream iterations: a framebuffer and a UART write each, plus a "
                           "newline every 64 (default: 150000)")
    demo.add_argument("--producer", choices=("auto", "kvm", "emulated"), default="auto",
                      help="what makes the writes: kvm (a guest on /dev/kvm), emulated (a "
                           "software CPU on EmulatedVm), or auto: kvm where /dev/kvm works, "
                           "else emulated (default)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.set_defaults(func=cmd_demo)
    probe_cmd = sub.add_parser("probe", help="show what this host offers (KVM, ring size)",
                               description="Show the KVM API version, coalesced MMIO/PIO "
                                           "support, page size and ring size of this host, "
                                           "and which KVM backend (kvm_intel, kvm_amd, "
                                           "kvm_pvm) serves /dev/kvm.")
    probe_cmd.add_argument("--json", action="store_true", help="print as JSON")
    probe_cmd.set_defaults(func=cmd_probe)
    bench_description = (bench.__doc__ or "").partition("\n\n")[2]
    bench_cmd = sub.add_parser(
        "bench", help="a quick run (under a minute) of the headline benchmarks",
        description=bench_description, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_cmd.add_argument("--only", metavar="SECTION", action="append",
                           choices=bench.SECTIONS,
                           help=f"run only this section (repeatable): {', '.join(bench.SECTIONS)}")
    bench_cmd.add_argument("--skip", metavar="SECTION", action="append", default=[],
                           choices=bench.SECTIONS, help="leave this section out (repeatable)")
    bench_cmd.add_argument("--scale", type=float, default=1.0,
                           help="multiply every repeat and record count (default 1.0: under "
                                "a minute on 2 CPUs; 0.1 for a smoke run)")
    bench_cmd.add_argument("--blocks", type=int, metavar="N",
                           help="interleaved blocks per section (default: consumer 10, "
                                "producer 5, wakeup 5, transfer 3, kvm 5); more blocks give "
                                "a steadier median of the within-block ratios")
    bench_cmd.add_argument("--json", metavar="FILE",
                           help="also write every figure as JSON to FILE ('-': JSON on stdout, "
                                "no table)")
    bench_cmd.add_argument("--plot", metavar="FILE.png",
                           help="draw ns/entry per method and batch size, and guest stores/s "
                                "(needs matplotlib: pip install 'kvmcoal[plot]')")
    bench_cmd.add_argument("--check", action="store_true",
                           help="exit with status 1 if a target is missed or cannot be judged "
                                "(a section skipped, a row missing or unmeasured)")
    bench_cmd.add_argument("--quiet", action="store_true", help="no progress on stderr")
    bench_cmd.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (kvm.KvmUnavailableError, RuntimeError, OSError, ValueError) as exc:
        print(f"kvmcoal {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
