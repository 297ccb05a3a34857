"""x86 mode set-up for a vCPU: real, 32-bit protected and 64-bit long mode.

The register values are x86 architecture (Intel SDM vol. 3), not KVM ABI;
:class:`kvmcoal.kvm.Vcpu` gets these methods from :class:`ModeSetup`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["ModeSetup"]

_CR0_PE = 1 << 0
_CR0_PG = 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME = 1 << 8
_EFER_LMA = 1 << 10
_PTE_PRESENT_RW = 0x3
_PTE_LARGE = 1 << 7
_FLAT_SEGMENT = {"base": 0, "limit": 0xFFFFFFFF, "present": 1, "dpl": 0, "db": 1, "s": 1,
                 "l": 0, "g": 1, "avl": 0, "unusable": 0}
_REAL_MODE_SEGMENT = {"limit": 0xFFFF, "present": 1, "dpl": 0, "db": 0, "s": 1, "l": 0, "g": 0,
                      "avl": 0, "unusable": 0}


class ModeSetup:
    """Methods that put a vCPU in a mode from scratch, whatever mode it was in."""

    if TYPE_CHECKING:   # what the methods use of the Vcpu they are mixed into
        vm: Vm

        def get_sregs(self) -> dict[str, Any]: ...

        def set_sregs(self, changes: dict[str, Any]) -> None: ...

        def set_regs(self, **regs: int) -> None: ...

    def _mode_registers(self, segments: dict[str, dict[str, int]], *, cr0_set: int = 0,
                        cr4_set: int = 0, efer: int = 0, **more: int) -> None:
        """Set every segment, and CR0/CR4/EFER from scratch for the mode, whatever it was."""
        sregs = self.get_sregs()
        self.set_sregs({**segments,
                        "cr0": (sregs["cr0"] & ~(_CR0_PE | _CR0_PG)) | cr0_set,
                        "cr4": (sregs["cr4"] & ~_CR4_PAE) | cr4_set,
                        "efer": efer, **more})

    def setup_real_mode(self, ip: int, *, segments: dict[str, int] | None = None,
                        **regs: int) -> None:
        """Start in 16-bit real mode at cs=0, ip=*ip*, from whatever mode it was in.

        *segments* maps segment names ("ds", "es", ...) to selectors (base =
        selector * 16); *regs* sets general-purpose registers.
        """
        selectors = {"cs": 0, "ds": 0, "es": 0, "fs": 0, "gs": 0, "ss": 0}
        for name, selector in (segments or {}).items():
            if name not in selectors:
                raise ValueError(f"segments: unknown segment {name!r}; "
                                 f"known: {', '.join(selectors)}")
            if isinstance(selector, bool) or not isinstance(selector, int):
                raise TypeError(f"segments[{name!r}] must be an int selector, "
                                f"not {type(selector).__name__!r}")
            if not 0 <= selector <= 0xFFFF:
                raise ValueError(f"segments[{name!r}]={selector:#x} is not a 16-bit selector")
            selectors[name] = selector
        self._mode_registers({name: dict(_REAL_MODE_SEGMENT, selector=sel, base=sel * 16,
                                         type=0xB if name == "cs" else 0x3)
                              for name, sel in selectors.items()})
        self.set_regs(rip=ip, rflags=0x2, **regs)

    def setup_protected_mode(self, ip: int, **regs: int) -> None:
        """Start in 32-bit flat protected mode at eip=*ip*: 4 GiB segments, no paging."""
        code = dict(_FLAT_SEGMENT, selector=0x08, type=0xB)
        data = dict(_FLAT_SEGMENT, selector=0x10, type=0x3)
        self._mode_registers({"cs": code, "ds": data, "es": data, "fs": data, "gs": data,
                              "ss": data}, cr0_set=_CR0_PE)
        self.set_regs(rip=ip, rflags=0x2, **regs)

    def setup_long_mode(self, ip: int, *, page_tables: int = 0x8000, **regs: int) -> None:
        """Start in 64-bit mode at rip=*ip*, the first 1 GiB identity-mapped.

        Writes three pages of page tables into guest memory at *page_tables*
        (2 MiB pages).  Needed for 8-byte stores: KVM's emulator does not
        emulate MMX/SSE stores to MMIO, so a plain ``mov %rax, (%rdi)`` is
        the only 8-byte MMIO write, and it needs long mode.
        """
        pml4, pdpt, pd = page_tables, page_tables + 0x1000, page_tables + 0x2000
        tables = self.vm.memory(page_tables, 0x3000).cast("Q")
        tables[0] = pdpt | _PTE_PRESENT_RW
        tables[512] = pd | _PTE_PRESENT_RW
        for i in range(512):
            tables[1024 + i] = (i << 21) | _PTE_PRESENT_RW | _PTE_LARGE
        tables.release()
        code = dict(_FLAT_SEGMENT, selector=0x08, type=0xB, db=0, l=1)
        data = dict(_FLAT_SEGMENT, selector=0x10, type=0x3)
        self._mode_registers({"cs": code, "ds": data, "es": data, "fs": data, "gs": data,
                              "ss": data}, cr0_set=_CR0_PE | _CR0_PG, cr4_set=_CR4_PAE,
                             efer=_EFER_LME | _EFER_LMA, cr3=pml4)
        self.set_regs(rip=ip, rflags=0x2, **regs)
