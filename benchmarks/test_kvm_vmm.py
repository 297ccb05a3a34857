"""Real-KVM benchmarks: the store_loop guest on the Python VMM and on a C VMM.

The same guest makes the same stores (``KVMCOAL_BENCH_KVM_STORES``, default
100,000: three per loop iteration, a 4-byte and a 2-byte MMIO store and a
1-byte ``out``) five ways (see ``kvmcoal.bench.vmm``):

* ``python-coalesced``: ``Vcpu.run_loop`` with the MMIO page and the port
  registered as coalesced zones, delivering to a handler that checks each
  write against the expected stream and counts it;
* ``python-uncoalesced``: the same, no zone registered (every store exits);
* ``python-batch-device``: coalesced, the device taking the ring in batches
  (``run_loop(..., drain=device.drain)``, one ``drain_into`` and one bulk
  check per KVM_RUN return);
* ``c-coalesced`` / ``c-uncoalesced``: ``kvmcoal/bench/c/cvmm.c``, a small
  C VMM doing the same (built with gcc -O2 on first use into the per-user
  cache, ``~/.cache/kvmcoal/bench``; skipped, saying so, without gcc), one
  long-lived process per test module, each run in a fresh VM.

Each round runs the guest once in a fresh VM; setting the VM up is
pytest-benchmark's ``setup``, not timed, and checks that the previous round
delivered every store once, in order.  The timed part is the run: first
KVM_RUN to HLT (for C, from telling the prepared C process to go until its
result line arrives, a pipe round trip more).

Targets (judged by ``kvmcoal bench --only kvm``, which interleaves the five): coalesced
at least 2.5x the uncoalesced stores/s; the Python VMM at least 0.9x the C
VMM's rate, both coalescing.

    python -m pytest benchmarks/test_kvm_vmm.py --benchmark-only
    python -m pytest benchmarks/test_kvm_vmm.py --benchmark-disable   # smoke: 3,000 stores

``KVMCOAL_BENCH_KVM_ROUNDS`` (default 5) sets the timed rounds.  Skipped,
with the reason, where /dev/kvm cannot be used.
"""

from __future__ import annotations


import pytest

from kvmcoal import kvm
from kvmcoal.bench.knobs import KVM_ROUNDS as ROUNDS
from kvmcoal.bench.knobs import KVM_STORES as STORES
from kvmcoal.bench.knobs import SMOKE_STORES
from kvmcoal.bench.vmm import (
    CRun, CvmmServer, CvmmUnavailable, PythonRun, build_cvmm, iterations_for, run_cvmm_once)

WARMUP_ROUNDS = 1

_REASON = kvm.why_unavailable()
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(_REASON is not None, reason=f"/dev/kvm unusable: {_REASON}"),
    pytest.mark.benchmark(group="store_loop guest on /dev/kvm: one run"),
]

COALESCING = [pytest.param(True, id="coalesced"), pytest.param(False, id="uncoalesced")]


@pytest.fixture
def stores(benchmark) -> int:
    return SMOKE_STORES if benchmark.disabled else STORES


@pytest.fixture(scope="module")
def cvmm():
    """The C VMM's binary, built on first use (skip, saying why, without gcc)."""
    try:
        return build_cvmm()
    except CvmmUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cvmm_server(cvmm):
    """One long-lived ``cvmm --serve`` for the module; closing it checks its exit status."""
    with CvmmServer(cvmm) as server:
        yield server


def _bench(benchmark, guest_run) -> None:
    """Time *guest_run*'s run, one per round; check every round's stores."""
    rounds = 1 if benchmark.disabled else ROUNDS
    warmup = 0 if benchmark.disabled else WARMUP_ROUNDS
    with guest_run:
        benchmark.pedantic(guest_run.run, setup=guest_run.next_round, rounds=rounds,
                           warmup_rounds=warmup, iterations=1)
        figures = guest_run.finish()          # the last round; next_round checked the others
    assert guest_run.runs == rounds + warmup
    assert figures["stores"] == guest_run.stores
    if guest_run.coalesced:
        assert figures["exits"] < guest_run.stores // 2    # most stores came from the ring
    else:
        assert figures["exits"] == guest_run.stores + 1    # each store exited, then HLT
    benchmark.extra_info.update(stores=guest_run.stores, exits=figures["exits"])
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info["stores_per_s"] = guest_run.stores / median
        benchmark.extra_info["ns_per_store"] = median / guest_run.stores * 1e9


@pytest.mark.parametrize("coalesced", COALESCING)
def test_python_vmm(benchmark, stores, coalesced):
    """kvmcoal.kvm: Vcpu.run_loop, the ring drained into a checking handler after every exit."""
    _bench(benchmark, PythonRun(stores, coalesced))


def test_python_vmm_batch_device(benchmark, stores):
    """kvmcoal.kvm: Vcpu.run_loop with a device taking the ring in batches (drain_into)."""
    _bench(benchmark, PythonRun(stores, True, batch=True))


@pytest.mark.parametrize("coalesced", COALESCING)
def test_c_vmm(benchmark, stores, coalesced, cvmm_server):
    """kvmcoal/bench/c/cvmm.c: the same guest, setup, loop and check, in C."""
    _bench(benchmark, CRun(stores, coalesced, cvmm_server))


@pytest.mark.parametrize("coalesced", COALESCING)
def test_c_vmm_one_shot(cvmm, coalesced):
    """``cvmm GUEST N [--coalesce]`` alone: JSON on stdout, exit status 0, every store."""
    got = run_cvmm_once(SMOKE_STORES, coalesced, cvmm)
    assert got["returncode"] == 0 and got["ok"] is True, got
    assert got["stores"] == 3 * iterations_for(SMOKE_STORES) and got["stderr"] == ""
    assert got["coalesced"] is coalesced
    assert set(got) >= {"stores", "exits", "seconds", "stores_per_s"}
