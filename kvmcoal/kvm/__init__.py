"""A small VMM on /dev/kvm: the kernel as the ring's producer.

On real KVM the kernel records coalesced writes in one ring per VM, which
userspace maps through a vCPU fd at page ``coalesced_mmio_page_offset``;
:attr:`Vm.ring` is a :class:`kvmcoal.Ring` over that page.  A VMM must drain
the ring after every ``KVM_RUN`` return and *before* it handles the exit, so
that the writes the guest made earlier reach the devices first.

>>> from kvmcoal import Zone
>>> from kvmcoal.kvm import Kvm, available
>>> if available():
...     with Kvm() as kvm, kvm.create_vm() as vm:
...         _ = vm.add_memory(0, 0x10000)
...         vcpu = vm.create_vcpu()
...         vm.register_coalesced_mmio(Zone(0xd0000, 0x1000))
...         type(vm.ring).__name__
... else:
...     'Ring'
'Ring'

The package is split by fd type, as rust-vmm's kvm-ioctls is:
:mod:`~kvmcoal.kvm.system` (the /dev/kvm fd, availability, the backend),
:mod:`~kvmcoal.kvm.vm` (the VM fd: memory, zones, the ring),
:mod:`~kvmcoal.kvm.vcpu` (the vCPU fd: registers, KVM_RUN, the run loop),
:mod:`~kvmcoal.kvm.exits` (what KVM_RUN returns) and :mod:`~kvmcoal.kvm.x86`
(mode set-up).  The ioctl numbers and struct layouts come from
``<linux/kvm.h>`` through the compiled :mod:`kvmcoal.kvm._abi`; none is typed
by hand.
"""

from __future__ import annotations

from ..errors import GuestError, KvmUnavailableError
from .exits import (Exit, FailEntryExit, HltExit, InternalErrorExit, IoExit, MmioExit,
                    OtherExit, ShutdownExit)
from .system import DEVICE, Kvm, available, backend, why_unavailable
from .vcpu import ReadHandler, Vcpu, WriteHandler
from .vm import Vm

__all__ = [
    "DEVICE",
    "Exit",
    "FailEntryExit",
    "GuestError",
    "HltExit",
    "InternalErrorExit",
    "IoExit",
    "Kvm",
    "KvmUnavailableError",
    "MmioExit",
    "OtherExit",
    "ReadHandler",
    "ShutdownExit",
    "Vcpu",
    "Vm",
    "WriteHandler",
    "available",
    "backend",
    "why_unavailable",
]
