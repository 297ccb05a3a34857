"""The run loop on real KVM: drain before every exit, reads see every earlier write."""

from __future__ import annotations

import os
import threading

import pytest

from kvmcoal import Zone, kvm
from kvmcoal.kvm import _abi

from .conftest import load_guest

pytestmark = pytest.mark.kvm

MMIO = Zone(0xD0000, 0x1000)
DATA = MMIO.addr + 0x10
STATUS = DATA + 8
CODE, RESULTS = 0x1000, 0x4000


class Device:
    """A data register whose writes are applied in order, and a status register."""

    def __init__(self) -> None:
        self.applied: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.reads = 0

    def write(self, addr: int, data: bytes, pio: bool) -> None:
        with self.lock:
            self.applied.append((addr, int.from_bytes(data, "little")))

    def read(self, addr: int, size: int, pio: bool) -> int:
        assert (addr, size, pio) == (STATUS, 4, False)
        self.reads += 1
        return len(self.applied)   # how many writes the device has seen


def test_reads_observe_every_earlier_write_in_order(kvm_vm):
    load_guest(kvm_vm, "ordering", CODE)
    kvm_vm.register_coalesced_mmio(Zone(DATA, 4))   # the data register only
    vcpu = kvm_vm.create_vcpu()
    per_round, rounds = 250, 6                        # 250 > capacity: ring-full fallbacks
    vcpu.setup_real_mode(CODE, segments={"es": MMIO.addr >> 4}, rax=0, rcx=per_round,
                         rsi=rounds, rdi=DATA - MMIO.addr, rbx=RESULTS)
    device = Device()
    assert vcpu.run_loop(device.write, device.read) == kvm.HltExit()
    assert device.applied == [(DATA, v) for v in range(per_round * rounds)]
    with kvm_vm.memory(RESULTS, 4 * rounds) as results:
        seen = list(results.cast("I"))
    # Each status read saw every write of its round and the rounds before it.
    assert seen == [per_round * (r + 1) for r in range(rounds)]
    assert device.reads == rounds


def test_two_vcpus_lose_and_duplicate_nothing(kvm_vm):
    load_guest(kvm_vm, "store_loop", CODE)
    kvm_vm.register_coalesced_mmio(MMIO)
    kvm_vm.register_coalesced_mmio(Zone(0x400, 2, pio=True))
    iterations = 20000
    vcpus = []
    for n in range(2):   # each vCPU writes its own registers and port
        vcpu = kvm_vm.create_vcpu()
        vcpu.setup_real_mode(CODE, segments={"es": MMIO.addr >> 4}, rax=0, rcx=iterations,
                             rdi=0x100 * (n + 1), rdx=0x400 + n)
        vcpus.append(vcpu)
    device = Device()
    errors = []

    def run(vcpu):
        try:
            vcpu.run_loop(device.write, device.read)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in vcpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for n in range(2):
        reg, port = MMIO.addr + 0x100 * (n + 1), 0x400 + n
        mine = [(a, v) for a, v in device.applied if a in (reg, reg + 8, port)]
        expected = []
        for v in range(iterations):
            expected += [(reg, v), (reg + 8, v & 0xFFFF), (port, v & 0xFF)]
        assert mine == expected   # every write once, in this vCPU's order
    assert len(device.applied) == 2 * 3 * iterations


def test_guest_error_is_raised(kvm_vm):
    kvm_vm.add_memory(0, 0x10000)[CODE:CODE + 2] = b"\x0f\x0b"   # ud2
    vcpu = kvm_vm.create_vcpu()
    vcpu.setup_long_mode(CODE)   # no IDT: the #UD becomes a triple fault
    with pytest.raises(kvm.GuestError, match="ShutdownExit") as info:
        vcpu.run_loop(Device().write, Device().read)
    assert isinstance(info.value.exit, kvm.ShutdownExit)


def test_closed_vcpu_and_bad_zones(kvm_vm):
    vcpu = kvm_vm.create_vcpu()
    vcpu.close()
    with pytest.raises(ValueError, match="closed Vcpu"):
        vcpu.run()
    with pytest.raises(OSError) as info:   # the kernel refuses a pio flag other than 0/1
        _abi.kvm_coalesced_zone(kvm_vm.fileno(), True, 0x1000, 8, 2)
    assert info.value.errno == 22
    kvm_vm._has_pio = False                # a kernel without KVM_CAP_COALESCED_PIO
    with pytest.raises(kvm.KvmUnavailableError, match="COALESCED_PIO"):
        kvm_vm.register_coalesced_mmio(Zone(0x70, 1, pio=True))


def test_permission_denied_says_how_to_fix_it():
    if kvm.why_unavailable() is not None or os.geteuid() != 0:
        pytest.skip("needs root and a working /dev/kvm to drop privileges from")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child becomes 'nobody', who may not open /dev/kvm (mode 0600)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            message = "opened" if kvm.available() else kvm.why_unavailable() or ""
            os.write(w, message.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    assert "permission denied" in message and "usermod -aG kvm" in message


def test_a_path_that_is_not_kvm_is_reported_not_raised_as_oserror(tmp_path):
    """A bind mount or a typo can put another file where /dev/kvm should be."""
    for path, what in (("/dev/null", "not a KVM device"), (tmp_path, "cannot open"),
                       (tmp_path / "none", "does not exist")):
        with pytest.raises(kvm.KvmUnavailableError, match=what):
            kvm.Kvm(str(path))
        assert what in (kvm.why_unavailable(str(path)) or "")
        assert not kvm.available(str(path))


def test_protected_mode_reaches_mmio_above_1_mib(kvm_vm):
    load_guest(kvm_vm, "flat32", CODE)
    high = Zone(0xE0000000, 0x1000)
    kvm_vm.register_coalesced_mmio(high)
    vcpu = kvm_vm.create_vcpu()
    vcpu.setup_protected_mode(CODE, rax=0x100, rcx=500, rdi=high.addr + 4, rdx=0x3F8)
    device = Device()
    vcpu.run_loop(device.write, device.read)
    expected = []
    for v in range(0x100, 0x100 + 500):
        expected += [(high.addr + 4, v), (0x3F8, v & 0xFF)]
    assert device.applied == expected


def test_nothing_leaks_fds_or_mappings():
    if not kvm.available():
        pytest.skip(f"/dev/kvm is not usable here: {kvm.why_unavailable()}")

    def counts():
        with open("/proc/self/maps") as maps:
            return len(os.listdir("/proc/self/fd")), sum(1 for _ in maps)

    def cycle():
        with kvm.Kvm() as k, k.create_vm() as vm:
            load_guest(vm, "store_loop", CODE)
            vm.register_coalesced_mmio(MMIO)
            vcpu = vm.create_vcpu()
            vcpu.setup_real_mode(CODE, segments={"es": MMIO.addr >> 4}, rcx=10, rdx=0x400)
            device = Device()
            vcpu.run_loop(device.write, device.read)
            assert len(vm.ring) == 0

    cycle()
    before = counts()
    for _ in range(50):
        cycle()
    assert counts() == before


def test_closed_objects_refuse_use():
    if not kvm.available():
        pytest.skip(f"/dev/kvm is not usable here: {kvm.why_unavailable()}")
    k = kvm.Kvm()
    vm = k.create_vm()
    vm.create_vcpu()
    ring = vm.ring
    vm.close()
    k.close()
    with pytest.raises(ValueError, match="closed Kvm"):
        k.check_extension(1)
    with pytest.raises(ValueError, match="closed Vm"):
        vm.register_coalesced_mmio(MMIO)
    with pytest.raises(ValueError, match="released"):
        ring.drain()
