"""Evaluate a doorbell wake-up without polling: the kvm:kvm_mmio tracepoint.

Every emulated MMIO write fires the kvm:kvm_mmio tracepoint (PIO writes
fire kvm:kvm_pio), coalesced or not.  perf_event_open() turns it into a
pollable fd per vCPU thread; a waker thread that sleeps in poll() on it and
routes when woken could replace the watcher's periodic passes.  This script
measures that prototype (in Python, on the doorbell guest of
``kvmcoal bench --only doorbell``) against the watcher at its default
interval, interleaved round by round, and the waker's idle CPU use.

Needs root (perf_event_paranoid is 2 here: CAP_PERFMON or CAP_SYS_ADMIN),
tracefs (mounted on /sys/kernel/tracing if it is not) and /dev/kvm.

    python benchmarks/tracepoint_wake.py [rounds]
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import select
import struct
import subprocess
import sys
import threading
import time

from kvmcoal import kvm
from kvmcoal.bench.doorbell import DoorbellGuest
from kvmcoal.bench.reporting import percentile

TRACEFS = "/sys/kernel/tracing"
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
PERF_EVENT_IOC_SET_FILTER = 0x40082406
SYS_perf_event_open = 298          # x86-64
SAFETY_MS = 10                     # a routing pass at least this often regardless
_libc = ctypes.CDLL(None, use_errno=True)


def tracepoint_id(name: str) -> int:
    path = f"{TRACEFS}/events/kvm/{name}/id"
    if not os.path.exists(path):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
    with open(path) as f:
        return int(f.read())


def perf_open(tid: int, config: int, filter_: str) -> int:
    """A sampling event on tracepoint *config* for thread *tid*: readable on every hit."""
    attr = bytearray(128)
    # type, size, config, sample_period, sample_type, read_format, flags, wakeup_events
    struct.pack_into("<IIQQQQQI", attr, 0, PERF_TYPE_TRACEPOINT, len(attr), config, 1, 0, 0, 0, 1)
    fd = _libc.syscall(SYS_perf_event_open, (ctypes.c_char * len(attr)).from_buffer(attr),
                       tid, -1, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "perf_event_open")
    arg = ctypes.create_string_buffer(filter_.encode())
    if _libc.ioctl(fd, PERF_EVENT_IOC_SET_FILTER, arg) < 0:
        raise OSError(ctypes.get_errno(), "PERF_EVENT_IOC_SET_FILTER")
    return fd


class TracepointWaker:
    """Sleeps in poll() on the perf fd; when woken, routes until the entry lands."""

    def __init__(self, vm: kvm.Vm, fd: int) -> None:
        self.vm, self.fd = vm, fd
        self.map = mmap.mmap(fd, 9 * mmap.PAGESIZE)
        self.stop = False
        self.cpu_s = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        router = self.vm._router
        start = time.thread_time()
        while not self.stop:
            if not poller.poll(SAFETY_MS):
                self.vm.route()     # the safety pass: a doorbell the spin below missed
                continue
            head = struct.unpack_from("<Q", self.map, 1024)[0]     # data_head
            struct.pack_into("<Q", self.map, 1032, head)            # data_tail
            # The tracepoint fires before the write reaches the ring, and the
            # wake-up may have preempted the vCPU thread that is to write it.
            before, end = router.routed, time.perf_counter() + 200e-6
            while router.routed == before and time.perf_counter() < end:
                os.sched_yield()
                self.vm.route()
        self.cpu_s = time.thread_time() - start

    def close(self) -> float:
        """Stop; the CPU time (s) the waker used."""
        self.stop = True
        self.thread.join(5)
        self.map.close()
        return self.cpu_s


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    block = 20
    rng = random.Random(1)
    lat: dict[str, list[int]] = {"tracepoint": [], "watcher": []}
    cpu = {"tracepoint": 0.0, "watcher": 0.0}
    wall = {"tracepoint": 0.0, "watcher": 0.0}
    with kvm.Kvm() as k:
        print(f"kvm backend: {kvm.backend()['backend']}")
        blocks = max(1, rounds // block)
        g = DoorbellGuest(k, 2 * blocks * block + 1)
        time.sleep(0.05)
        from kvmcoal.bench.doorbell import DOORBELL
        fd = perf_open(g.thread.native_id, tracepoint_id("kvm_mmio"),
                       f"type == 2 && gpa >= {DOORBELL} && gpa < {DOORBELL + 4}")
        try:
            for b in range(2 * blocks):
                mode = ("tracepoint", "watcher")[b % 2]
                started = time.perf_counter()
                waker = TracepointWaker(g.vm, fd) if mode == "tracepoint" else None
                if waker is None:
                    g.vm.start_watcher()
                for _ in range(block):
                    time.sleep(rng.uniform(2e-3, 4e-3))
                    lat[mode].append(g.ring())
                if waker is not None:
                    cpu[mode] += waker.close()
                else:
                    g.vm.stop_watcher()
                    cpu[mode] += g.vm._router.watcher_cpu_ns / 1e9
                wall[mode] += time.perf_counter() - started
            g.vm.start_watcher()
            g.ring()
            g.finish()
        finally:
            os.close(fd)
            g.close()
    for mode, values in lat.items():
        s = sorted(v / 1e3 for v in values)
        print(f"{mode:>10}: p50 {percentile(s, 50):7.1f} µs  p99 {percentile(s, 99):8.1f} µs  "
              f"min {s[0]:6.1f} µs  ({len(s)} rounds); waker CPU "
              f"{cpu[mode] / wall[mode]:.1%} of a core")


if __name__ == "__main__":
    main()
