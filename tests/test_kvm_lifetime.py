"""kvmcoal.kvm under misuse: lifetimes, threads, handlers that raise, objects dropped.

Each test here is a defect an audit found: the guest writing into memory the
caller had closed, two Rings over one VM's ring page, two threads in one
vCPU, an exit lost when a handler raised, fds leaked by objects never closed.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import warnings

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


def _make_and_drop_a_vm() -> None:
    """A Kvm, a Vm with memory, a vCPU and the ring, none closed, then collected."""
    k = kvm.Kvm()
    vm = k.create_vm()
    vm.add_memory(0, 0x10000)
    vm.create_vcpu()
    vm.ring
    del k, vm
    gc.collect()


def test_objects_never_closed_are_closed_when_collected():
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm is not usable here: {reason}")
    before = _open_fds()
    with pytest.warns(ResourceWarning):
        for _ in range(5):
            _make_and_drop_a_vm()
    assert _open_fds() == before


def test_a_failed_vcpu_creation_does_not_block_the_next(kvm_vm, monkeypatch):
    """KVM_CREATE_VCPU took the id before the mapping failed: the next vCPU gets the
    next id rather than EEXIST forever."""
    def fail(_map):
        raise OSError(12, "simulated: cannot map kvm_run")

    monkeypatch.setattr(kvm.vcpu, "KvmRunView", fail)
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


# Real mode: mov cx, 3; [in ax, 0x80; out 0x81, ax; loop]; hlt: echoes three reads.
IN_ECHO = bytes([0xB9, 3, 0, 0xE5, 0x80, 0xE7, 0x81, 0xE2, 0xFA, 0xF4])


def _in_echo(vm: kvm.Vm) -> kvm.Vcpu:
    vm.add_memory(0, 0x10000)[CODE:CODE + len(IN_ECHO)] = IN_ECHO
    vcpu = vm.create_vcpu()
    vcpu.setup_real_mode(CODE)
    return vcpu


def test_an_exception_right_after_kvm_run_returns_loses_no_exit(kvm_vm, monkeypatch):
    """An exception from a signal handler can land after KVM_RUN returned and before
    the exit is dispatched (simulated: decoding the exit raises once).  The exit is
    pending in C from KVM_RUN's return on, so the next run_loop delivers it."""
    vcpu = _read_then_out(kvm_vm)
    decode = kvm.Vcpu._decode_exit
    calls = []

    def interrupted_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return decode(self)

    monkeypatch.setattr(kvm.Vcpu, "_decode_exit", interrupted_once)
    reads: list[int] = []
    writes: list[tuple[int, bytes, bool]] = []

    def read(addr: int, size: int, pio: bool) -> int:
        reads.append(addr)
        return 0x41

    with pytest.raises(KeyboardInterrupt):
        vcpu.run_loop(lambda *w: writes.append(w), read)
    assert vcpu.run_loop(lambda *w: writes.append(w), read) == kvm.HltExit()
    assert reads == [MMIO.addr] and writes == [(PORT, b"\x41", True)]
    assert vcpu.exit_count == 3                # the read, the out, the hlt: none twice


def test_run_returns_an_exit_run_loop_left_without_entering_the_guest(kvm_vm):
    vcpu = _read_then_out(kvm_vm)

    def busy(addr: int, size: int, pio: bool) -> int:
        raise KeyError("busy")

    with pytest.raises(KeyError):
        vcpu.run_loop(lambda *w: None, busy)
    exit_ = vcpu.run()                          # the read, still unanswered
    assert isinstance(exit_, kvm.MmioExit) and not exit_.is_write
    assert vcpu.exit_count == 1
    vcpu.complete_mmio_read(b"\x42")
    exit_ = vcpu.run()
    assert isinstance(exit_, kvm.IoExit) and exit_.data == b"\x42"


def test_run_from_a_run_loop_handler_is_refused(kvm_vm):
    vcpu = _read_then_out(kvm_vm)
    caught = []

    def read(addr: int, size: int, pio: bool) -> int:
        for call in (vcpu.run, lambda: vcpu.run_loop(print, read)):
            with pytest.raises(RuntimeError, match="handler"):
                call()
            caught.append(call)
        return 0x41

    assert vcpu.run_loop(lambda *w: None, read) == kvm.HltExit()
    assert len(caught) == 2


def test_string_in_keeps_the_values_read_before_a_read_raised(kvm_vm):
    """A read that raises, or returns no int, is asked again; earlier values of the
    same exit are not read twice.  numpy integers are ints."""
    np = pytest.importorskip("numpy")
    vcpu = _in_echo(kvm_vm)
    answers = iter([np.uint16(1), None, KeyError("busy"), 2, 3])
    reads = []

    def read(addr: int, size: int, pio: bool) -> int:
        reads.append(addr)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    echoes: list[bytes] = []
    for expected in (TypeError, KeyError):
        with pytest.raises(expected):
            vcpu.run_loop(lambda a, d, p: echoes.append(d), read)
    assert vcpu.run_loop(lambda a, d, p: echoes.append(d), read) == kvm.HltExit()
    assert echoes == [b"\x01\x00", b"\x02\x00", b"\x03\x00"] and len(reads) == 5


def test_closing_the_vm_from_a_drain_handler_is_refused_and_closes_nothing(kvm_vm):
    load_guest(kvm_vm, "ordering", CODE)
    kvm_vm.register_coalesced_mmio(Zone(DATA, 4))
    vcpu = kvm_vm.create_vcpu()
    vcpu.setup_real_mode(CODE, segments={"es": MMIO.addr >> 4}, rax=0, rcx=10, rsi=1,
                         rdi=DATA - MMIO.addr, rbx=RESULTS)
    refused = []

    def write(addr: int, data: bytes, pio: bool) -> None:
        if not refused:
            with pytest.raises(RuntimeError, match="after the drain returns"):
                kvm_vm.close()
            refused.append(data)

    assert vcpu.run_loop(write, lambda *r: 10) == kvm.HltExit()
    assert refused and kvm_vm.fileno() >= 0 and vcpu.fileno() >= 0


def test_closing_a_vcpu_while_another_thread_maps_the_ring_through_it():
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm cannot be used here: {reason}")
    for _ in range(100):
        with kvm.Kvm() as k, k.create_vm() as vm:
            a, b = vm.create_vcpu(), vm.create_vcpu()
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []

            def get_ring() -> None:
                barrier.wait()
                try:
                    assert vm.ring.max > 1
                except BaseException as exc:   # noqa: BLE001 - reported below
                    errors.append(exc)

            t = threading.Thread(target=get_ring)
            t.start()
            barrier.wait()
            a.close()
            t.join()
            assert not errors, errors
            assert b.fileno() >= 0


def test_objects_dropped_with_warnings_as_errors_still_close(monkeypatch):
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm cannot be used here: {reason}")
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    before = _open_fds()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _make_and_drop_a_vm()
    assert _open_fds() == before
    assert unraisable and all(isinstance(u.exc_value, ResourceWarning) for u in unraisable)


def test_the_pending_exit_progress_cannot_go_negative(kvm_vm):
    """kvm.py writes string-IN values at offset + progress * size: a negative progress
    would aim them at kvm_run itself."""
    vcpu = kvm_vm.create_vcpu()
    with pytest.raises(ValueError, match="progress must be >= 0"):
        vcpu._run.progress = -1
