"""Common mistakes get an error that names the argument and says what it takes."""

from __future__ import annotations

import errno

import pytest

from kvmcoal import Bus, CoalescedBuffer, EmulatedVm, Entry, Ring, Zone
from kvmcoal.devices import Doorbell



@pytest.fixture
def bus():
    with EmulatedVm() as vm, Bus(vm) as bus:
        yield bus


@pytest.mark.parametrize("flag", ["pio", "coalesced", "flush_on_access", "own_buffer"])
@pytest.mark.parametrize("value", ["no", 1, 0, None])
def test_bus_map_flags_are_bools(bus, flag, value):
    with pytest.raises(TypeError, match=f"{flag} must be True or False"):
        bus.map(Doorbell(), 0x1000, 4, **{flag: value})
    assert bus.mappings == []


@pytest.mark.parametrize("call", [
    lambda bus: bus.read(0x3F8, 1, pio=1),
    lambda bus: bus.write(0x3F8, 1, 0, pio="yes"),
    lambda bus: bus.find(0x3F8, pio=None),
])
def test_bus_access_flags_are_bools(bus, call):
    with pytest.raises(TypeError, match="pio must be True or False"):
        call(bus)


def test_pio_flags_are_bools_everywhere(impl):
    ring = impl.Ring(bytearray(4096))
    with pytest.raises(TypeError, match="pio must be True or False"):
        ring.push(0x3F8, b"x", pio=1)
    with pytest.raises(TypeError, match="pio must be True or False"):
        impl.Entry(0x3F8, b"x", pio="yes")
    assert len(ring) == 0
    with pytest.raises(TypeError, match="pio must be True or False"):
        Zone(0x3F8, 1, pio="yes")
    with EmulatedVm() as vm:
        vm.register_coalesced_mmio(Zone(0x3F8, 1, pio=True))
        with pytest.raises(TypeError, match="pio must be True or False"):
            vm.write(0x3F8, b"x", pio=1)
        assert len(vm.ring) == 0


def test_bus_write_takes_an_int_and_the_vm_takes_bytes(bus):
    bus.map(Doorbell(), 0x3F8, 1, pio=True)
    with pytest.raises(TypeError, match=r"Bus.write\(\) takes the value written as an int, "
                                        r"not 'bytes' \(EmulatedVm.write and Ring.push take bytes"):
        bus.write(0x3F8, 1, b"x", pio=True)
    with pytest.raises(TypeError, match="data must be a bytes-like object, not 'int' "
                                        r"\(the bytes written; Bus.write takes an int\)"):
        EmulatedVm().write(0x3F8, 5)
    with pytest.raises(ValueError, match="does not fit a 1-byte write"):
        bus.write(0x3F8, 1, 256, pio=True)
    with pytest.raises(ValueError, match="an access is 1 to 8 bytes"):
        bus.write(0x3F8, 9, 1, pio=True)


def test_a_closed_bus_refuses_new_mappings():
    vm = EmulatedVm()
    bus = Bus(vm)
    bus.close()
    with pytest.raises(ValueError, match="closed Bus"):
        bus.map(Doorbell(), 0x1000, 4)
    with pytest.raises(ValueError, match="closed Bus"):
        bus.start_pollers()
    bus.close()            # idempotent
    vm.close()


@pytest.mark.parametrize("producer", [bytearray(10), "vm", 42])
def test_a_bus_needs_a_real_producer(producer):
    with pytest.raises(TypeError, match="producer must be an EmulatedVm or a kvmcoal.kvm.Vm"):
        Bus(producer)


def test_a_ring_that_could_hold_no_entry_is_refused():
    with pytest.raises(ValueError, match="56-byte minimum"):
        Ring(bytearray(32))
    with pytest.raises(ValueError, match="56-byte minimum"):
        CoalescedBuffer(32)
    assert Ring(bytearray(56)).capacity == 1
    assert Entry(0, b"x").pio is False


@pytest.mark.kvm
def test_running_a_vcpu_with_no_guest_memory_says_so(kvm_vm):
    vcpu = kvm_vm.create_vcpu()
    vcpu.setup_real_mode(0x1000)
    with pytest.raises(OSError, match="outside guest memory .*0 memory slots.*add_memory") as info:
        vcpu.run()
    assert info.value.errno == errno.ENOSPC


@pytest.mark.kvm
def test_real_mode_segments_are_checked(kvm_vm):
    vcpu = kvm_vm.create_vcpu()
    with pytest.raises(TypeError, match=r"segments\['es'\] must be an int selector, not 'str'"):
        vcpu.setup_real_mode(0x1000, segments={"es": "x"})
    with pytest.raises(ValueError, match="unknown segment 'xs'"):
        vcpu.setup_real_mode(0x1000, segments={"xs": 0})
    with pytest.raises(ValueError, match="not a 16-bit selector"):
        vcpu.setup_real_mode(0x1000, segments={"ds": 0x10000})


@pytest.mark.kvm
def test_a_kvm_zone_that_could_never_be_unregistered_is_refused(kvm_vm):
    with pytest.raises(ValueError, match="could never be unregistered"):
        kvm_vm.register_coalesced_mmio(Zone(0, 2**31))
    kvm_vm.register_coalesced_mmio(Zone(0, 2**31 - 1))
    kvm_vm.unregister_coalesced_mmio(Zone(0, 2**31 - 1))


@pytest.mark.kvm
def test_the_kernels_zone_limit_is_a_zone_limit_error(kvm_vm):
    from kvmcoal import ZONE_LIMIT, ZoneLimitError

    with pytest.raises(ZoneLimitError, match="MMIO zones") as info:
        for i in range(ZONE_LIMIT + 1):
            kvm_vm.register_coalesced_mmio(Zone(0x100000 + 16 * i, 4))
    assert info.value.errno == errno.ENOSPC
    assert i <= ZONE_LIMIT      # other devices on the kernel's bus may take places too
