"""atheris harness: arbitrary call sequences against EmulatedVm and CoalescedBuffer.

Zones are registered and unregistered, buffers created, bound, closed and
corrupted, writes and consumer calls interleaved at random.  The outcome must
always be a valid result or one of the documented exceptions (ValueError,
TypeError, KvmcoalError); every entry drained must be a write that was
coalesced, and no more entries can come out than went in (until a peer has
scribbled on a ring: from then on garbage may drain as valid-looking entries,
which is all a consumer can promise).

    python tests/fuzz/fuzz_vm.py -atheris_runs=5000        # the CI run
    python tests/fuzz/fuzz_vm.py -max_total_time=3600      # a long run
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import atheris

with atheris.instrument_imports():
    from kvmcoal import EmulatedVm, KvmcoalError, Zone

ALLOWED = (ValueError, TypeError, KvmcoalError)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    accepted: Counter = Counter()
    drained: Counter = Counter()
    tainted = False   # after a peer scribbled, garbage may drain as valid-looking entries
    with EmulatedVm(page_size=fdp.PickValueInList([56, 80, 4096])) as vm:
        buffers = []
        for _ in range(fdp.ConsumeIntInRange(0, 48)):
            op = fdp.ConsumeIntInRange(0, 9)
            addr = fdp.ConsumeIntInRange(0, 0x40)
            pio = fdp.ConsumeBool()
            try:
                if op == 0:
                    vm.register_coalesced_mmio(Zone(addr, fdp.ConsumeIntInRange(0, 0x40), pio=pio))
                elif op == 1:
                    vm.unregister_coalesced_mmio(Zone(addr, fdp.ConsumeIntInRange(0, 0x40), pio=pio))
                elif op == 2:
                    buffers.append(vm.create_coalesced_buffer(nbytes=fdp.ConsumeIntInRange(56, 600)))
                elif op == 3 and buffers:
                    buf = fdp.PickValueInList(buffers)
                    zone = Zone(addr, fdp.ConsumeIntInRange(0, 0x40), pio=pio)
                    if fdp.ConsumeBool():
                        vm.register_coalesced_mmio2(zone, buf)
                    else:
                        vm.unregister_coalesced_mmio2(zone, buf)
                elif op == 4 and buffers:
                    fdp.PickValueInList(buffers).close()
                elif op in (5, 6):
                    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8)) or b"\0"
                    if vm.write(addr, payload, pio=pio):
                        accepted[(addr, payload, pio)] += 1
                elif op == 7:
                    rings = [vm.ring] + [b.ring for b in buffers if not b.closed]
                    ring = fdp.PickValueInList(rings)
                    for e in ring.drain(fdp.ConsumeIntInRange(0, 50)):
                        drained[(e.phys_addr, e.data, e.pio)] += 1
                elif op == 8 and buffers:
                    buf = fdp.PickValueInList(buffers)
                    if not buf.closed:
                        memfd, _ = buf.fds()   # a peer scribbles on the shared memory
                        os.pwrite(memfd, fdp.ConsumeBytes(4).ljust(4, b"\0"),
                                  fdp.ConsumeIntInRange(0, 8) * 4)
                        tainted = True
                elif op == 9 and buffers:
                    fdp.PickValueInList(buffers).wait(0)
            except ALLOWED:
                pass
            if not tainted and drained - accepted:
                raise AssertionError(f"drained entries that were never written: "
                                     f"{drained - accepted}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
