"""The exits of KVM_RUN, as :meth:`kvmcoal.kvm.Vcpu.run` returns them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Exit", "FailEntryExit", "HltExit", "InternalErrorExit", "IoExit", "MmioExit",
           "OtherExit", "ShutdownExit"]


@dataclass(frozen=True)
class Exit:
    """Base of the typed results of :meth:`Vcpu.run`."""


@dataclass(frozen=True)
class MmioExit(Exit):
    """KVM_EXIT_MMIO: an access to guest-physical memory no slot backs."""

    phys_addr: int
    data: bytes
    is_write: bool

    @property
    def len(self) -> int:
        """Width of the access in bytes."""
        return len(self.data)


@dataclass(frozen=True)
class IoExit(Exit):
    """KVM_EXIT_IO: ``count`` port accesses of ``size`` bytes (data for OUT)."""

    port: int
    size: int
    count: int
    is_out: bool
    data: bytes


@dataclass(frozen=True)
class HltExit(Exit):
    """KVM_EXIT_HLT: the guest executed HLT."""


@dataclass(frozen=True)
class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: triple fault or similar; the vCPU cannot go on."""


@dataclass(frozen=True)
class FailEntryExit(Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True)
class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR, e.g. an instruction KVM could not emulate."""

    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True)
class OtherExit(Exit):
    """Any other exit reason, by number."""

    reason: int
