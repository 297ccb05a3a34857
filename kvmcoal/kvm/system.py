"""The system fd, /dev/kvm: availability, capabilities, VM creation, and the backend."""

from __future__ import annotations

import grp
import os
import stat

from ..errors import KvmUnavailableError
from . import _abi
from .fd import OwnsFd
from .vm import Vm

__all__ = ["DEVICE", "Kvm", "available", "backend", "why_unavailable"]

DEVICE = "/dev/kvm"


def _open_kvm(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailableError(
            f"{path} does not exist: this host has no KVM (load the kvm_intel or "
            f"kvm_amd module, or kvm_pvm where the kernel has PVM; in a virtual machine, "
            f"enable nested virtualisation)") from None
    except PermissionError:
        raise KvmUnavailableError(f"permission denied opening {path}: "
                                  f"{_how_to_get_access(path)}") from None
    except OSError as exc:
        raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None


def _how_to_get_access(path: str) -> str:
    """What a user who may not open *path* can do about it, from its owner and mode."""
    try:
        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        group = None
    if group is not None and group != "root" and st.st_mode & stat.S_IRWXG:
        return (f"add this user to its group {group!r} (sudo usermod -aG {group} $USER, "
                f"then log in again)")
    mode = f"{stat.S_IMODE(st.st_mode):o}" if group is not None else "?"
    return (f"it is owned by group {group or '?'} with mode {mode}, so only root may open it; "
            f"run as root, or give it a kvm group (sudo groupadd -f kvm; sudo chgrp kvm "
            f"{path}; sudo chmod 660 {path}; sudo usermod -aG kvm $USER, then log in again)")


def why_unavailable(path: str = DEVICE) -> str | None:
    """None if *path* is a usable KVM device, else the reason it is not."""
    try:
        Kvm(path).close()
    except KvmUnavailableError as exc:
        return str(exc)
    return None


def available(path: str = DEVICE) -> bool:
    """True if /dev/kvm can be opened and speaks the expected API."""
    return why_unavailable(path) is None


class Kvm(OwnsFd):
    """An open /dev/kvm: capabilities and VM creation."""

    def __init__(self, path: str = DEVICE) -> None:
        self.path = path
        self._fd = _open_kvm(path)
        try:
            try:
                version = _abi.kvm_ioctl(self._fd, "KVM_GET_API_VERSION", 0)
            except OSError as exc:   # ENOTTY: a file or another device at that path
                raise KvmUnavailableError(
                    f"{path} is not a KVM device ({exc.strerror})") \
                    from None
            if version != _abi.KVM_ABI["KVM_API_VERSION"]:
                raise KvmUnavailableError(
                    f"{path} speaks KVM API version {version}, "
                    f"kvmcoal needs {_abi.KVM_ABI['KVM_API_VERSION']}")
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self.api_version: int = version

    def fileno(self) -> int:
        """The /dev/kvm fd; ValueError once closed."""
        if self._fd < 0:
            raise ValueError("operation on a closed Kvm")
        return self._fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if *cap* is absent, else a cap-specific value."""
        return _abi.kvm_ioctl(self.fileno(), "KVM_CHECK_EXTENSION", cap)

    @property
    def coalesced_mmio_page_offset(self) -> int:
        """Page of the vCPU mapping that holds the ring (0: no coalesced MMIO)."""
        return self.check_extension(_abi.KVM_ABI["KVM_CAP_COALESCED_MMIO"])

    @property
    def has_coalesced_pio(self) -> bool:
        """Whether zones may be port I/O ranges (KVM_CAP_COALESCED_PIO)."""
        return self.check_extension(_abi.KVM_ABI["KVM_CAP_COALESCED_PIO"]) > 0

    @property
    def vcpu_mmap_size(self) -> int:
        """Bytes of a vCPU mapping: kvm_run, the PIO data page, the ring page, ..."""
        return _abi.kvm_ioctl(self.fileno(), "KVM_GET_VCPU_MMAP_SIZE", 0)

    def create_vm(self) -> Vm:
        """A new, empty VM.  It needs nothing more from this Kvm: closing it is fine."""
        return Vm(self)

    def close(self) -> None:
        """Close /dev/kvm.  Idempotent; VMs made from it live on."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"<Kvm {self.path} {'closed' if self._fd < 0 else f'fd={self._fd}'}>"


# The vendor modules that can serve /dev/kvm, and whether they use hardware
# virtualisation extensions (PVM runs guests with shadow paging and no VMX/SVM).
_BACKENDS = {"kvm_intel": True, "kvm_amd": True, "kvm_pvm": False}


def backend(sys_module: str = "/sys/module", cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
    """Which KVM backend serves /dev/kvm on this host, from the modules the kernel has loaded.

    A dict of plain values:

    - ``backend``: ``"kvm_intel"``, ``"kvm_amd"``, ``"kvm_pvm"``, or ``"unknown"``
      (none of them loaded, or more than one);
    - ``hardware_assisted``: True for kvm_intel and kvm_amd (VMX/SVM), False
      for kvm_pvm (shadow paging, guest code largely run by KVM's instruction
      emulator), None if unknown;
    - ``offers_nested``: the backend's ``nested`` parameter (whether its
      guests may run KVM themselves), None where it has none or it cannot be read;
    - ``host_is_guest``: whether this host is itself a virtual machine (the
      ``hypervisor`` CPU flag), None if /proc/cpuinfo cannot be read;
    - ``modules``: the backend modules found.

    Figures measured on one backend say little about another: a coalesced
    store is an emulated instruction on kvm_pvm, a cheap trap on hardware.
    """
    modules = sorted(name for name in _BACKENDS if os.path.isdir(os.path.join(sys_module, name)))
    name = modules[0] if len(modules) == 1 else "unknown"
    nested = None
    if name != "unknown":
        try:
            with open(os.path.join(sys_module, name, "parameters", "nested")) as f:
                nested = f.read().strip() in ("Y", "y", "1")
        except OSError:
            pass
    host_is_guest = None
    try:
        with open(cpuinfo) as f:
            host_is_guest = any(line.startswith("flags") and "hypervisor" in line.split()
                                for line in f)
    except OSError:
        pass
    return {"backend": name, "hardware_assisted": _BACKENDS.get(name), "offers_nested": nested,
            "host_is_guest": host_is_guest, "modules": modules}
