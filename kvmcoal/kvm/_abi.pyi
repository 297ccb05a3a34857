"""Type stubs of the compiled /dev/kvm ABI (kvmcoal.kvm._abi, from src/kvm_abi.pyx);
kvmcoal.kvm is the public layer over it."""

from kvmcoal.kvm._router import Router
from typing import Any, Final, final

from typing_extensions import Buffer


KVM_ABI: Final[dict[str, int]]
"""ioctl numbers, capabilities and exit reasons from <linux/kvm.h>, by name."""

def kvm_ioctl(fd: int, name: str, arg: int = 0) -> int:
    """Issue the argument-by-value ioctl *name* (a key of KVM_ABI); OSError on failure."""
def kvm_coalesced_zone(vmfd: int, register: bool, addr: int, size: int, pio: int) -> None:
    """KVM_(UN)REGISTER_COALESCED_MMIO for the zone (addr, size, pio)."""
def kvm_set_user_memory_region(vmfd: int, slot: int, guest_phys_addr: int, memory: Buffer,
                               flags: int = 0) -> None:
    """Back guest memory with a writable buffer the caller keeps alive."""
def kvm_get_regs(vcpufd: int) -> dict[str, int]: ...
def kvm_set_regs(vcpufd: int, changes: dict[str, int]) -> None: ...
def kvm_get_sregs(vcpufd: int) -> dict[str, Any]: ...
def kvm_set_sregs(vcpufd: int, changes: dict[str, Any]) -> None: ...
@final
class KvmRunView:
    """Typed access to a vCPU's struct kvm_run at the start of its mapping."""

    def __init__(self, mapping: Buffer) -> None: ...
    def release(self) -> None: ...
    def enter(self, vcpufd: int, router: Router | None = None) -> bool:
        """KVM_RUN unless an exit is still pending; True when kvm_run holds an exit."""
    def exits_by_reason(self) -> dict[int, int]:
        """{KVM_EXIT_* number: exits} for every reason seen."""
    def delivered(self) -> None:
        """The pending exit is fully delivered: the next enter() runs the vCPU."""
    @property
    def pending(self) -> bool: ...
    progress: int
    @property
    def exits(self) -> int: ...
    @property
    def exit_reason(self) -> int: ...
    def mmio(self) -> tuple[int, bytes, bool]: ...
    def set_mmio_data(self, data: Buffer) -> None: ...
    def io(self) -> tuple[int, int, int, int, int]: ...
    def fail_entry(self) -> tuple[int, int]: ...
    def internal(self) -> tuple[int, tuple[int, ...]]: ...
