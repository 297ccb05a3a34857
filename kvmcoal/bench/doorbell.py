"""The doorbell section: a real guest's doorbell write to its poller, on /dev/kvm.

The doorbell guest (kvmcoal/guests/doorbell.S) spins on a counter in its
RAM and, each time the host raises it, writes the new value to a doorbell
register in a zone bound to a buffer, then spins on: it makes no exit
between doorbells.  The kernel ring signals nothing, so only the router's
watcher thread (Vm.start_watcher) can move the entry into the buffer, whose
eventfd then wakes the poller.  One round: the host takes t0, raises the
counter and sleeps in CoalescedBuffer.wait(); t1 when it returns with the
entry (checked: the round's value, alone).  The rounds are paced (a pause
of 2-4 ms before each), so each doorbell finds the watcher in its sleeping
phase (unless it spins), as a real doorbell would.

The baseline, interleaved round by round in the same run: a Python thread
takes t0 and writes a bare eventfd while the host sleeps in select() on it.
Also measured: the watcher thread's own CPU time over the rounds (a
doorbell every 2-4 ms), and that without the watcher the poller is not
woken at all (routing then waits for the vCPU's next exit).  The tracepoint
wake-up (Vm.start_watcher(wake="tracepoint")) runs where perf and tracefs
allow it, else its row says why it is missing.

Every figure here is a kvm_pvm figure on this project's machines (see the
report's environment).
"""

from __future__ import annotations

import os
import random
import select
import threading
import time
from typing import Any

from kvmcoal import Bus, Zone, guests, kvm

from .reporting import TIMEOUT_S, Progress, Section, noop, percentile

DOORBELL = 0xD0000                     # real-mode MMIO, above the guest's 64 KiB of RAM
COUNTER = 0x3000
CODE = 0x1000
# (interval_us, spin_us, wake) of the watchers compared; (100, 0, "timer")
# is the default; the spinning one never sleeps after the first doorbell;
# the tracepoint one sleeps until a doorbell write (where perf allows it).
WATCHERS = ((20, 0, "timer"), (100, 0, "timer"), (500, 0, "timer"), (100, 10**7, "timer"),
            (100, 0, "tracepoint"))
DEFAULT = (100, 0, "timer")
PAUSE_S = (2e-3, 4e-3)                # before each round


def _summary(latencies_ns: list[int]) -> dict[str, Any]:
    s = sorted(latencies_ns)
    return {"round_trips": len(s), "p50_us": percentile(s, 50) / 1e3,
            "p99_us": percentile(s, 99) / 1e3, "min_us": s[0] / 1e3}


class DoorbellGuest:
    """A real VM running the doorbell guest, its doorbell zone bound to a buffer.

    With *device* (a Doorbell), the zone is a Bus mapping of it with its own
    buffer instead, served by the bus's poller thread; see ring_device().
    """

    def __init__(self, k: kvm.Kvm, rounds: int, device: Any = None) -> None:
        self.vm = k.create_vm()
        self.memory = self.vm.add_memory(0, 0x10000)
        code = guests.load("doorbell")
        self.memory[CODE:CODE + len(code)] = code
        self.counter = memoryview(self.memory)[COUNTER:COUNTER + 4].cast("I")
        self.device = device
        self.bus: Bus | None = None
        if device is None:
            self.buf = self.vm.create_coalesced_buffer()
            self.vm.register_coalesced_mmio2(Zone(DOORBELL, 4), self.buf)
        else:
            self.bus = Bus(self.vm)
            buf = self.bus.map(device, DOORBELL, 4, coalesced=True, own_buffer=True).buffer
            assert buf is not None
            self.buf = buf
        self.vcpu = self.vm.create_vcpu()
        self.vcpu.setup_real_mode(CODE, segments={"es": DOORBELL >> 4}, rdi=DOORBELL & 0xF,
                                  rbx=COUNTER, rcx=rounds)
        if self.bus is not None:
            self.bus.start_pollers()
        self.round = 0
        self.exit: Any = None
        self.thread = threading.Thread(target=self._run, name="doorbell vCPU", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.exit = self.vcpu.run()

    def ring(self) -> int:
        """One round: the latency (ns) from raising the counter to the poller's return."""
        self.round += 1
        t0 = time.perf_counter_ns()
        self.counter[0] = self.round
        if not self.buf.wait(TIMEOUT_S):
            raise AssertionError(f"round {self.round}: the poller was not woken")
        t1 = time.perf_counter_ns()
        got = [int.from_bytes(e.data, "little") for e in self.buf.ring.drain()]
        if got != [self.round]:
            raise AssertionError(f"round {self.round}: the buffer held {got}")
        return t1 - t0

    def ring_device(self) -> int:
        """One round through the Bus: from raising the counter to the device's write()."""
        device = self.device
        self.round += 1
        device.event.clear()
        t0 = time.perf_counter_ns()
        self.counter[0] = self.round
        if not device.event.wait(TIMEOUT_S):
            raise AssertionError(f"round {self.round}: the device got no request")
        if device.requests[-1:] != [self.round]:
            raise AssertionError(f"round {self.round}: the device got {device.requests[-1:]}")
        return device.times[-1] - t0

    def finish(self) -> None:
        self.thread.join(TIMEOUT_S)
        if not isinstance(self.exit, kvm.HltExit) or self.vcpu.exit_count != 1:
            raise AssertionError(f"the guest ended with {self.exit} after "
                                 f"{self.vcpu.exit_count} exits, not one HLT")

    def close(self) -> None:
        self.counter.release()
        if self.bus is not None:
            self.bus.close()
        self.vm.close()


class EventfdRound:
    """The baseline: a paced thread writes a bare eventfd while this one sleeps in select."""

    def __init__(self) -> None:
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def ring(self, pause: float) -> int:
        t0: list[int] = []

        def producer() -> None:
            time.sleep(pause)
            t0.append(time.perf_counter_ns())
            os.eventfd_write(self.efd, 1)
        t = threading.Thread(target=producer)
        t.start()
        ready, _, _ = select.select([self.efd], [], [], TIMEOUT_S)
        t1 = time.perf_counter_ns()
        t.join()
        if not ready or os.eventfd_read(self.efd) != 1:
            raise AssertionError("the eventfd round trip lost its write")
        return t1 - t0[0]

    def close(self) -> None:
        os.close(self.efd)


def measure(rounds: int, blocks: int, progress: Progress | None = None) -> Section:
    """Doorbell latency with the watcher at each interval, the eventfd baseline, CPU use."""
    say = progress or noop
    rng = random.Random(1)
    out: Section = {"caption": [
        f"guest doorbell write -> CoalescedBuffer.wait() return, the guest running on without "
        f"an exit; {rounds} paced rounds per interval in {blocks} blocks, against a bare "
        "eventfd -> select() between threads, interleaved",
        "watcher CPU: the watcher thread's CPU time per second of the rounds"],
        "rounds": rounds, "blocks": blocks, "methods": {}, "ratios": []}
    eventfd = EventfdRound()
    baseline: list[int] = []
    per_block: dict[tuple[int, int, str], list[tuple[float, float]]] = {w: [] for w in WATCHERS}
    try:
        with kvm.Kvm() as k:
            for watcher in WATCHERS:
                interval, spin, wake = watcher
                if wake == "tracepoint":
                    why = _tracepoint_unavailable(k)
                    if why:
                        out["methods"][_key(watcher)] = {"label": f"watcher {_name(watcher)}",
                                                         "missing": why}
                        continue
                say(f"doorbell: {rounds} rounds, watcher {_name(watcher)}")
                per_round = max(1, rounds // blocks)
                # The rounds, the probe without the watcher, and a last one
                # (after which the guest halts: that exit would route too).
                g = DoorbellGuest(k, per_round * blocks + 2)
                try:
                    g.vm.start_watcher(interval_us=interval, spin_us=spin, wake=wake)
                    latencies: list[int] = []
                    base: list[int] = []
                    started = time.perf_counter()
                    for b in range(blocks):
                        lat_b, base_b = [], []
                        for _ in range(per_round):
                            time.sleep(rng.uniform(*PAUSE_S))
                            lat_b.append(g.ring())
                            base_b.append(eventfd.ring(rng.uniform(*PAUSE_S)))
                        latencies += lat_b
                        base += base_b
                        per_block[watcher].append((percentile(sorted(lat_b), 50),
                                                   percentile(sorted(base_b), 50)))
                    # Without the watcher nothing routes while the guest runs.
                    g.vm.stop_watcher()
                    cpu_ns = g.vm._router.watcher_cpu_ns if g.vm._router else 0
                    g.round += 1
                    g.counter[0] = g.round
                    woken = g.buf.wait(0.05)
                    if watcher == DEFAULT:
                        out["without_watcher"] = {
                            "woken_within_50ms": woken,
                            "note": "no wake-up: routing waits for the vCPU's next exit"
                                    if not woken else "woken (unexpected)"}
                    g.vm.route()             # let the probe's doorbell through
                    g.buf.ring.drain()
                    g.vm.start_watcher(interval_us=interval, spin_us=spin, wake=wake)
                    g.ring()
                    g.finish()
                    # The watcher thread's own CPU time over the rounds (it
                    # is stopped and started again once, for the probe).
                    g.vm.stop_watcher()
                    router = g.vm._router
                    assert router is not None
                    cpu = (cpu_ns + router.watcher_cpu_ns) / 1e9 / (time.perf_counter() - started)
                finally:
                    g.close()
                baseline += base
                out["methods"][_key(watcher)] = {
                    "label": f"watcher {_name(watcher)}",
                    **_summary(latencies), "watcher_cpu_share": cpu}
    finally:
        eventfd.close()
    out["methods"]["eventfd"] = {"label": "bare eventfd -> select (threads)",
                                 **_summary(baseline)}
    for watcher in WATCHERS:
        if not per_block[watcher]:
            continue
        ratios = sorted(a / b for a, b in per_block[watcher])
        out["ratios"].append({
            "name": f"doorbell p50, watcher {_name(watcher)} / eventfd",
            "op": None, "target": None, "blocks": percentile(ratios, 50),
            "blocks_min": ratios[0], "blocks_max": ratios[-1], "met": None,
            "pooled": out["methods"][_key(watcher)]["p50_us"]
                      / out["methods"]["eventfd"]["p50_us"]})
    return out


def _key(watcher: tuple[int, int, str]) -> str:
    interval, spin, wake = watcher
    return f"watcher_{interval}us" + ("_spinning" if spin else "") + (
        "_tracepoint" if wake == "tracepoint" else "")


def _name(watcher: tuple[int, int, str]) -> str:
    interval, spin, wake = watcher
    if wake == "tracepoint":
        return f"woken by the kvm_mmio tracepoint (safety pass every {max(1, interval // 1000)} ms)"
    if spin:
        return f"spinning (interval {interval} µs, spin {spin / 1e6:g} s)"
    return f"every {interval} µs" + (" (the default)" if watcher == DEFAULT else "")


def _tracepoint_unavailable(k: kvm.Kvm) -> str | None:
    """Why the tracepoint wake-up cannot run here, or None."""
    try:
        with k.create_vm() as vm:
            vm.create_vcpu()
            vm.start_watcher(wake="tracepoint")
            vm.stop_watcher()
    except (kvm.KvmUnavailableError, OSError) as exc:
        return str(exc)
    return None
