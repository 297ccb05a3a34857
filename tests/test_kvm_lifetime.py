"""kvmcoal.kvm under misuse: lifetimes, threads, handlers that raise, objects dropped.

Each test here is a defect an audit found: the guest writing into memory the
caller had closed, two Rings over one VM's ring page, two threads in one
vCPU, an exit lost when a handler raised, fds leaked by objects never closed.
"""

from __future__ import annotations

import gc
import os
import threading

import pytest

from kvmcoal import Zone, kvm

from .conftest import load_guest

pytestmark = pytest.mark.kvm

MMIO = Zone(0xD0000, 0x1000)
DATA = MMIO.addr + 0x10
STATUS = DATA + 8
CODE, RESULTS = 0x1000, 0x4000
PORT = 0x80

# Real mode, ds = 0xd000: mov al, [0] (an MMIO read at 0xd0000); out 0x80, al; hlt.
READ_THEN_OUT = bytes([0xA0, 0x00, 0x00, 0xE6, PORT, 0xF4])


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _read_then_out(vm: kvm.Vm) -> kvm.Vcpu:
    vm.add_memory(0, 0x10000)[CODE:CODE + len(READ_THEN_OUT)] = READ_THEN_OUT
    vcpu = vm.create_vcpu()
    vcpu.setup_real_mode(CODE, segments={"ds": MMIO.addr >> 4})
    return vcpu


def test_guest_memory_cannot_be_closed_under_the_guest(kvm_vm):
    memory = kvm_vm.add_memory(0, 0x10000)
    with pytest.raises(BufferError):
        memory.close()
    with pytest.raises(BufferError):
        memory.resize(0x20000)
    kvm_vm.close()
    assert memory.closed                    # the VM unmapped it once no vCPU could run


def test_close_with_views_of_guest_memory_alive_raises_nothing(kvm_vm):
    memory = kvm_vm.add_memory(0, 0x10000)
    memory[0:4] = b"abcd"
    view = kvm_vm.memory(0, 4)
    kvm_vm.close()                          # no BufferError from the caller's view
    assert bytes(view) == b"abcd" and not memory.closed
    view.release()
    memory.close()
    with pytest.raises(ValueError, match="closed Vm"):
        kvm_vm.memory(0, 4)


def test_every_thread_gets_the_same_ring(kvm_vm):
    """The ring is mapped on first use; two vCPU threads asking at once must share one
    Ring (one consumer lock), or entries are delivered twice or lost."""
    for _ in range(30):
        with kvm.Kvm() as k, k.create_vm() as vm:
            vm.create_vcpu()
            barrier = threading.Barrier(4)
            rings: list[object] = []

            def get() -> None:
                barrier.wait()
                rings.append(vm.ring)

            threads = [threading.Thread(target=get) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(rings) == 4 and all(r is rings[0] for r in rings)


def test_a_running_vcpu_refuses_a_second_runner_and_close():
    """While one thread is inside run_loop (here: its read handler blocks), other
    threads get RuntimeError from run(), run_loop(), Vcpu.close() and Vm.close()."""
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm is not usable here: {reason}")
    with kvm.Kvm() as k, k.create_vm() as vm:
        vcpu = _read_then_out(vm)
        inside, release = threading.Event(), threading.Event()
        writes: list[tuple[int, bytes, bool]] = []

        def read(addr: int, size: int, pio: bool) -> int:
            inside.set()
            assert release.wait(10)
            return 0x41

        runner = threading.Thread(target=vcpu.run_loop, args=(
            lambda *w: writes.append(w), read))
        runner.start()
        try:
            assert inside.wait(10)
            with pytest.raises(RuntimeError, match="running in another thread"):
                vcpu.run()
            with pytest.raises(RuntimeError, match="running in another thread"):
                vcpu.run_loop(lambda *a: None, lambda *a: 0)
            with pytest.raises(RuntimeError, match="cannot close it"):
                vcpu.close()
            with pytest.raises(RuntimeError, match="cannot close its Vm"):
                vm.close()
        finally:
            release.set()
            runner.join(10)
        assert writes == [(PORT, b"\x41", True)]
        vm.close()                           # now it may


def test_a_raising_read_handler_loses_nothing_and_is_asked_again(kvm_vm):
    vcpu = _read_then_out(kvm_vm)
    writes: list[tuple[int, bytes, bool]] = []
    calls = []

    def read(addr: int, size: int, pio: bool) -> int:
        calls.append((addr, size, pio))
        if len(calls) == 1:
            raise KeyError("device busy")
        return 0x41

    with pytest.raises(KeyError):
        vcpu.run_loop(lambda *w: writes.append(w), read)
    assert vcpu.run_loop(lambda *w: writes.append(w), read) == kvm.HltExit()
    assert calls == [(MMIO.addr, 1, False)] * 2
    assert writes == [(PORT, b"\x41", True)]      # the guest got the second answer


def test_a_read_handler_returning_no_int_is_a_clear_error(kvm_vm):
    vcpu = _read_then_out(kvm_vm)
    with pytest.raises(TypeError, match="read handler must return an int, not 'NoneType'"):
        vcpu.run_loop(lambda *w: None, lambda *r: None)


@pytest.mark.parametrize("fail_at", [5, 169, 170, 171, 250, 251])
def test_a_raising_write_handler_loses_and_repeats_nothing(kvm_vm, fail_at):
    """The ordering guest: 250 coalesced writes per round (more than the ring holds,
    so some exit), then a status read.  The write handler raises once, at write
    *fail_at*; run_loop is called again; every write arrives exactly once, in order
    (the one handed to the raising call counts as delivered, as in Ring.consume),
    and every status read still sees every earlier write."""
    load_guest(kvm_vm, "ordering", CODE)
    kvm_vm.register_coalesced_mmio(Zone(DATA, 4))
    vcpu = kvm_vm.create_vcpu()
    per_round, rounds = 250, 3
    vcpu.setup_real_mode(CODE, segments={"es": MMIO.addr >> 4}, rax=0, rcx=per_round,
                         rsi=rounds, rdi=DATA - MMIO.addr, rbx=RESULTS)
    applied: list[int] = []

    def write(addr: int, data: bytes, pio: bool) -> None:
        applied.append(int.from_bytes(data, "little"))
        if len(applied) == fail_at:
            raise KeyError(fail_at)

    def read(addr: int, size: int, pio: bool) -> int:
        return len(applied)

    with pytest.raises(KeyError):
        vcpu.run_loop(write, read)
    assert vcpu.run_loop(write, read) == kvm.HltExit()
    assert applied == list(range(per_round * rounds))
    with kvm_vm.memory(RESULTS, 4 * rounds) as results:
        assert list(results.cast("I")) == [per_round * (r + 1) for r in range(rounds)]


def test_objects_never_closed_are_closed_when_collected():
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm is not usable here: {reason}")
    before = _open_fds()
    with pytest.warns(ResourceWarning):
        for _ in range(5):
            k = kvm.Kvm()
            vm = k.create_vm()
            vm.add_memory(0, 0x10000)
            vm.create_vcpu()
            vm.ring
            del k, vm
            gc.collect()
    assert _open_fds() == before


def test_a_failed_vcpu_creation_does_not_block_the_next(kvm_vm, monkeypatch):
    """KVM_CREATE_VCPU took the id before the mapping failed: the next vCPU gets the
    next id rather than EEXIST forever."""
    def fail(_map):
        raise OSError(12, "simulated: cannot map kvm_run")

    monkeypatch.setattr(kvm, "KvmRunView", fail)
    before = _open_fds()
    with pytest.raises(OSError, match="simulated"):
        kvm_vm.create_vcpu()
    assert _open_fds() == before
    monkeypatch.undo()
    assert kvm_vm.create_vcpu().id == 1


def test_a_vm_outlives_its_kvm_handle(kvm_vm):
    load_guest(kvm_vm, "ordering", CODE)
    kvm_vm.kvm.close()
    vcpu = kvm_vm.create_vcpu()
    kvm_vm.register_coalesced_mmio(Zone(DATA, 4))
    vcpu.setup_real_mode(CODE, segments={"es": MMIO.addr >> 4}, rax=0, rcx=10, rsi=1,
                         rdi=DATA - MMIO.addr, rbx=RESULTS)
    applied: list[bytes] = []
    assert vcpu.run_loop(lambda a, d, p: applied.append(d), lambda *r: 10) == kvm.HltExit()
    assert len(applied) == 10


def test_setup_real_mode_after_another_mode(kvm_vm):
    """setup_real_mode resets CR0, CR4, EFER and every segment, so a vCPU set up for
    protected or long mode before runs a real-mode guest correctly."""
    vcpu = _read_then_out(kvm_vm)
    vcpu.setup_long_mode(0x1000)
    vcpu.setup_protected_mode(0x1000)
    vcpu.setup_real_mode(CODE, segments={"ds": MMIO.addr >> 4})
    exit_ = vcpu.run()
    assert isinstance(exit_, kvm.MmioExit) and exit_.phys_addr == MMIO.addr and not exit_.is_write


def test_clear_messages_for_misuse(kvm_vm):
    vcpu = _read_then_out(kvm_vm)
    exit_ = vcpu.run()
    assert isinstance(exit_, kvm.MmioExit)
    vcpu.complete_mmio_read(b"\x41")
    exit_ = vcpu.run()
    assert isinstance(exit_, kvm.IoExit) and exit_.is_out
    with pytest.raises(ValueError, match="an OUT, not an IN"):
        vcpu.complete_io_in(b"\x00")
    kvm_vm.close()
    with pytest.raises(ValueError, match="closed Vm"):
        kvm_vm.ring
    with pytest.raises(ValueError, match="closed Vcpu"):
        vcpu.complete_mmio_read(b"\x00")


def test_the_ring_maps_through_any_open_vcpu(kvm_vm):
    first = kvm_vm.create_vcpu()
    kvm_vm.create_vcpu()
    first.close()
    assert kvm_vm.ring.max > 1
