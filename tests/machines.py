"""One guest, two kernels: the same writes through EmulatedVm and through a real guest.

A :class:`Machine` runs a list of :class:`Write` s and returns the ones that
exited (in order); what was coalesced is in the rings.  On real KVM the
writes are made by the ``script`` guest program, one vCPU per call of
:meth:`KvmMachine.vcpu`; on EmulatedVm by ``vm.write``.  The v2 scenarios
and the differential test run on both.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from kvmcoal import EmulatedVm, Entry, kvm

CODE = 0x1000
RAM = 0x40000             # guest RAM [0, RAM); zones live above it
RECORDS = 0x10000         # where each vCPU's records start (a 0x8000 slice per vCPU)
SLICE = 0x8000           # 1365 records
_RECORD = struct.Struct("<QQII")
SPIN = 2                  # the script guest's busy-loop record kind


class Write(NamedTuple):
    addr: int
    size: int
    value: int
    pio: bool = False

    @classmethod
    def of(cls, entry: Entry) -> Write:
        return cls(entry.phys_addr, len(entry.data), int.from_bytes(entry.data, "little"),
                   entry.pio)


def entries(ring) -> list[Write]:
    """Drain *ring* into Writes."""
    return [Write.of(e) for e in ring.drain()]


class EmulatedMachine:
    name = "emulated"

    def __init__(self) -> None:
        self.vm = EmulatedVm()

    def run(self, writes: list[Write], cpu: int = 0) -> list[Write]:
        exits = []
        for w in writes:
            if w.size == 0:       # a busy loop: nothing happens in the model
                continue
            if not self.vm.write(w.addr, w.value.to_bytes(w.size, "little"), pio=w.pio):
                exits.append(w)
        return exits

    def close(self) -> None:
        self.vm.close()


class KvmMachine:
    name = "kvm"

    def __init__(self, vm: kvm.Vm) -> None:
        from kvmcoal import guests
        self.vm = vm
        self.memory = vm.add_memory(0, RAM)
        code = guests.load("script")
        self.memory[CODE:CODE + len(code)] = code
        self.vcpus: list[kvm.Vcpu] = []

    def vcpu(self, cpu: int) -> kvm.Vcpu:
        while len(self.vcpus) <= cpu:
            self.vcpus.append(self.vm.create_vcpu())
        return self.vcpus[cpu]

    def load(self, writes: list[Write], cpu: int = 0) -> kvm.Vcpu:
        """vCPU *cpu*, set up to make *writes* when it runs next."""
        assert writes and len(writes) * _RECORD.size <= SLICE
        base = RECORDS + cpu * SLICE
        for i, w in enumerate(writes):
            kind = SPIN if w.size == 0 else int(w.pio)
            _RECORD.pack_into(self.memory, base + i * _RECORD.size, w.addr, w.value, w.size, kind)
        vcpu = self.vcpu(cpu)
        # Each vCPU its own page tables (they are rewritten on every set-up).
        vcpu.setup_long_mode(CODE, page_tables=0x4000 + cpu * 0x3000, rsi=base, rcx=len(writes))
        return vcpu

    def run(self, writes: list[Write], cpu: int = 0) -> list[Write]:
        vcpu = self.load(writes, cpu)
        exits = []
        while True:
            exit_ = vcpu.run()
            if isinstance(exit_, kvm.HltExit):
                return exits
            if isinstance(exit_, kvm.MmioExit) and exit_.is_write:
                exits.append(Write(exit_.phys_addr, len(exit_.data),
                                   int.from_bytes(exit_.data, "little")))
            elif isinstance(exit_, kvm.IoExit) and exit_.is_out:
                for i in range(exit_.count):
                    data = exit_.data[i * exit_.size:(i + 1) * exit_.size]
                    exits.append(Write(exit_.port, exit_.size, int.from_bytes(data, "little"),
                                       True))
            else:
                raise AssertionError(f"unexpected exit {exit_}")

    def close(self) -> None:
        self.vm.close()


@contextlib.contextmanager
def kvm_machine() -> Iterator[KvmMachine]:
    """A KvmMachine on a fresh VM; skips the test, with the reason, without /dev/kvm."""
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm is not usable here: {reason}")
    with kvm.Kvm() as k:
        m = KvmMachine(k.create_vm())
        try:
            yield m
        finally:
            m.close()


def spin(iterations: int) -> Write:
    """A record that keeps the guest busy without an access (nothing on EmulatedVm)."""
    return Write(0, 0, iterations)
