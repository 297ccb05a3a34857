"""The sandbox section: a device model in another process, on /dev/kvm.

VMMs that sandbox their device models (one process per device) pay a
message per guest access.  With kvmcoal the device process receives its
buffer once (CoalescedBuffer.send / receive) and the router fills it
straight from the kernel ring (after every KVM_RUN and on the watcher):
nothing of the VMM's runs per entry in Python.

Both designs run the same guest (kvm bench's store_loop: per iteration a
4-byte and a 2-byte MMIO store and a 1-byte OUT) making the same writes:

- router: the guest's zones are bound to the device's buffer (1 MiB: the
  size is the VMM's to choose); the device process sleeps in wait() and
  takes batches with drain_into; a write that exits (the rings full) is
  sent to it as a message;
- messages: no zone, every write exits and the VMM sends it, one 24-byte
  record per datagram over a Unix socket (the kindest form of the design:
  no reply is awaited).

The device checks what it received: the count and a checksum of the raw
records (the sum of their 64-bit words) must be those of the guest's
writes, each exactly once.  The figure: writes per second from the guest's
start to the device's "done".

The target: the router design at least 10x the messages design.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

from kvmcoal import Zone, guests, kvm

from .baselines import ENTRY
from .reporting import TIMEOUT_S, Progress, Section, noop
from .vmm import (CODE_ADDR, MEMORY_SIZE, MMIO_BASE, MMIO_REG, PORT, STORES_PER_ITERATION,
                  expected_writes, iterations_for)

_MASK = (1 << 64) - 1
BUFFER_NBYTES = 1 << 20               # 43,690 entries

DEVICE = textwrap.dedent("""
    import socket, sys
    from kvmcoal import CoalescedBuffer
    sock = socket.socket(fileno=int(sys.argv[1]))
    mode, expected = sys.argv[2], int(sys.argv[3])
    count = checksum = 0
    def take(records):
        global count, checksum
        count += len(records) // 24
        checksum = (checksum + sum(memoryview(records).cast("Q"))) & ((1 << 64) - 1)
    if mode == "router":
        buf = CoalescedBuffer.receive(sock)
        sock.setblocking(False)
        out = bytearray(24 * buf.ring.capacity)
        view = memoryview(out)
        while count < expected:
            if buf.wait(0.001):
                take(view[:24 * buf.ring.drain_into(out)])
            while True:            # writes that exited come as messages
                try:
                    msg = sock.recv(64)
                except BlockingIOError:
                    break
                if not msg:        # the VMM is gone
                    sys.exit(1)
                take(msg)
    else:
        sock.send(b"ready")
        while count < expected:
            msg = sock.recv(64)
            if not msg:            # the VMM is gone
                sys.exit(1)
            take(msg)
    sock.setblocking(True)
    sock.send(f"done {count} {checksum}".encode())
""")


def checksum(writes: list[tuple[int, bytes, bool]]) -> int:
    total = 0
    for addr, data, pio in writes:
        total += sum(memoryview(ENTRY.pack(addr, len(data), int(pio), data)).cast("Q"))
    return total & _MASK


class SandboxRun:
    """One guest run with its device model in a child process."""

    def __init__(self, k: kvm.Kvm, stores: int, mode: str) -> None:
        self.iterations = iterations_for(stores)
        self.writes = STORES_PER_ITERATION * self.iterations
        self.mode = mode
        self.vm = k.create_vm()
        memory = self.vm.add_memory(0, MEMORY_SIZE)
        code = guests.load("store_loop")
        memory[CODE_ADDR:CODE_ADDR + len(code)] = code
        self.vcpu = self.vm.create_vcpu()
        self.vcpu.setup_real_mode(CODE_ADDR, segments={"es": MMIO_BASE >> 4}, rax=0,
                                  rcx=self.iterations, rdi=MMIO_REG - MMIO_BASE, rdx=PORT)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DEVICE, str(theirs.fileno()), mode, str(self.writes)],
            pass_fds=[theirs.fileno()])
        theirs.close()
        if mode == "router":
            # A buffer of its own size (the VMM's to choose): the device takes
            # big batches, and a slow wake-up of its process does not fill it.
            buf = self.vm.create_coalesced_buffer(nbytes=BUFFER_NBYTES)
            self.vm.register_coalesced_mmio2(Zone(MMIO_BASE, 0x1000), buf)
            self.vm.register_coalesced_mmio2(Zone(PORT, 1, pio=True), buf)
            # Kept open: closing it would unregister its zones.  The router
            # feeds it, the device process drains its own attachment.
            buf.send(self.sock)
            self.vm.start_watcher()
        else:
            self.sock.settimeout(TIMEOUT_S)
            if self.sock.recv(16) != b"ready":
                raise AssertionError("the device process did not start")

    def run(self) -> dict[str, Any]:
        vcpu, send, pack = self.vcpu, self.sock.send, ENTRY.pack
        start = time.perf_counter()
        while True:
            exit_ = vcpu.run()
            if isinstance(exit_, kvm.HltExit):
                break
            if isinstance(exit_, kvm.MmioExit) and exit_.is_write:
                send(pack(exit_.phys_addr, len(exit_.data), 0, exit_.data))
            elif isinstance(exit_, kvm.IoExit) and exit_.is_out:
                send(pack(exit_.port, exit_.size, 1, exit_.data))
            else:
                raise AssertionError(f"unexpected exit {exit_}")
        halted = time.perf_counter()
        self.sock.settimeout(TIMEOUT_S)
        reply = self.sock.recv(64).decode().split()
        seconds = time.perf_counter() - start
        want = checksum(expected_writes(self.iterations))
        if reply != ["done", str(self.writes), str(want)]:
            raise AssertionError(f"the device process got {reply}, not {self.writes} writes "
                                 f"with checksum {want}")
        return {"writes": self.writes, "exits": vcpu.exit_count, "seconds": seconds,
                "writes_per_s": self.writes / seconds,
                "guest_writes_per_s": self.writes / (halted - start)}

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.vm.close()


def measure(stores: int, blocks: int, progress: Progress | None = None) -> Section:
    """Writes/s of each design, the designs alternating; figures and the ratio."""
    say = progress or noop
    runs: dict[str, list[dict[str, Any]]] = {"router": [], "messages": []}
    with kvm.Kvm() as k:
        for b in range(blocks):
            for mode in (("router", "messages") if b % 2 == 0 else ("messages", "router")):
                say(f"sandbox: {stores} writes, {mode}, block {b + 1} of {blocks}")
                run = SandboxRun(k, stores, mode)
                try:
                    runs[mode].append(run.run())
                finally:
                    run.close()
    methods = {}
    labels = {"router": "device process fed by the router (its own buffer)",
              "messages": "one message per access over a Unix socket"}
    for mode, rs in runs.items():
        best = max(r["writes_per_s"] for r in rs)
        methods[mode] = {"label": labels[mode], "writes": rs[0]["writes"],
                         "median_guest_writes_per_s": sorted(
                             r["guest_writes_per_s"] for r in rs)[len(rs) // 2],
                         "exits": [r["exits"] for r in rs], "best_writes_per_s": best,
                         "median_writes_per_s": sorted(r["writes_per_s"] for r in rs)[len(rs) // 2]}
    per_block = sorted(a["writes_per_s"] / b["writes_per_s"]
                       for a, b in zip(runs["router"], runs["messages"]))
    got = per_block[len(per_block) // 2]
    return {
        "caption": [f"{stores} guest writes per run on /dev/kvm, the device model in a child "
                    f"process; {blocks} runs per design, alternating; writes/s from the "
                    "guest's start to the device's check"],
        "stores": stores, "blocks": blocks, "methods": methods,
        "ratios": [{"name": "sandboxed device: router / one message per access", "op": ">=",
                    "target": 10.0, "blocks": got, "blocks_min": per_block[0],
                    "blocks_max": per_block[-1], "met": got >= 10.0,
                    "pooled": methods["router"]["median_writes_per_s"]
                              / methods["messages"]["median_writes_per_s"]}],
    }
