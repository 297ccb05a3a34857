"""Shared fixtures: every core test runs against the C ring and its pure-Python twin."""

from __future__ import annotations

import types

import pytest

from kvmcoal import _ring, _ring_py, kvm

IMPLEMENTATIONS = {"c": _ring, "py": _ring_py}

# The atheris harnesses are programs, not test modules (the doctest collector
# would import them, and atheris is only in the fuzz extra).
collect_ignore = ["fuzz"]


@pytest.fixture(params=sorted(IMPLEMENTATIONS), ids=lambda name: name)
def impl(request: pytest.FixtureRequest) -> types.ModuleType:
    """The ring implementation under test: kvmcoal._ring or kvmcoal._ring_py."""
    return IMPLEMENTATIONS[request.param]


def write_u32(buf: bytearray, offset: int, value: int) -> None:
    buf[offset:offset + 4] = value.to_bytes(4, "little")


def set_indices(buf: bytearray, first: int, last: int) -> None:
    """Write the ring header directly, as the kernel or a peer would."""
    write_u32(buf, 0, first)
    write_u32(buf, 4, last)


@pytest.fixture
def kvm_vm():
    """A fresh VM on /dev/kvm; skipped, with the reason, where /dev/kvm is unusable."""
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm is not usable here: {reason}")
    with kvm.Kvm() as k, k.create_vm() as vm:
        yield vm


def load_guest(vm, name: str, addr: int = 0x1000, memory: int = 0x10000) -> None:
    """Back [0, memory) with RAM and copy guest program *name* to *addr*."""
    from kvmcoal import guests
    code = guests.load(name)
    vm.add_memory(0, memory)[addr:addr + len(code)] = code


@pytest.fixture(params=["emulated", "kvm"])
def machine(request):
    """The same writes on both kernels: a tests.machines EmulatedMachine or KvmMachine."""
    from .machines import EmulatedMachine, kvm_machine
    if request.param == "emulated":
        m = EmulatedMachine()
        yield m
        m.close()
    else:
        with kvm_machine() as m:
            yield m
