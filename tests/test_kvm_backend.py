"""kvmcoal.kvm.backend(): which KVM backend serves /dev/kvm, read from /sys/module."""

from __future__ import annotations

import os

import pytest

from kvmcoal import kvm


def fake_host(tmp_path, modules: dict[str, str | None], flags: str = "fpu sse2"):
    """A /sys/module with *modules* (name -> its nested parameter, or None for none)."""
    sys_module = tmp_path / "module"
    for name, nested in modules.items():
        params = sys_module / name / "parameters"
        params.mkdir(parents=True)
        if nested is not None:
            (params / "nested").write_text(nested + "\n")
    (sys_module / "kvm").mkdir(parents=True, exist_ok=True)   # always there beside a backend
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    return str(sys_module), str(cpuinfo)


@pytest.mark.parametrize("modules,expected", [
    ({"kvm_intel": "Y"}, {"backend": "kvm_intel", "hardware_assisted": True, "offers_nested": True}),
    ({"kvm_amd": "0"}, {"backend": "kvm_amd", "hardware_assisted": True, "offers_nested": False}),
    ({"kvm_amd": "1"}, {"backend": "kvm_amd", "hardware_assisted": True, "offers_nested": True}),
    ({"kvm_pvm": None}, {"backend": "kvm_pvm", "hardware_assisted": False, "offers_nested": None}),
    ({}, {"backend": "unknown", "hardware_assisted": None, "offers_nested": None}),
    ({"kvm_intel": "N", "kvm_pvm": None},
     {"backend": "unknown", "hardware_assisted": None, "offers_nested": None}),
])
def test_backend_from_the_loaded_modules(tmp_path, modules, expected):
    sys_module, cpuinfo = fake_host(tmp_path, modules)
    found = kvm.backend(sys_module, cpuinfo)
    assert {key: found[key] for key in expected} == expected
    assert found["modules"] == sorted(modules)
    assert found["host_is_guest"] is False


def test_a_host_that_is_itself_a_guest(tmp_path):
    sys_module, cpuinfo = fake_host(tmp_path, {"kvm_pvm": None}, flags="fpu hypervisor sse2")
    assert kvm.backend(sys_module, cpuinfo)["host_is_guest"] is True
    assert kvm.backend(sys_module, str(tmp_path / "missing"))["host_is_guest"] is None


def test_this_host():
    loaded = [name for name in ("kvm_amd", "kvm_intel", "kvm_pvm")
              if os.path.isdir(f"/sys/module/{name}")]
    found = kvm.backend()
    assert found["modules"] == loaded
    assert found["backend"] == (loaded[0] if len(loaded) == 1 else "unknown")
