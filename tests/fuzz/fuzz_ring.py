"""atheris harness: arbitrary ring contents and call sequences against Ring and its twin.

Every input builds a ring of an arbitrary size over arbitrary bytes, then runs
an arbitrary sequence of producer (push, push_many of arbitrary records),
consumer and corruption steps on the C ring and on the pure-Python twin over
identical copies.  Any crash, any exception other than RingCorruptedError
(and push_many's ValueError for a bad record), or any disagreement between
the two (results or memory) is a finding.

    python tests/fuzz/fuzz_ring.py -atheris_runs=20000      # the CI run
    python tests/fuzz/fuzz_ring.py -max_total_time=3600     # a long run
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from kvmcoal import RingCorruptedError, _ring, _ring_py


def outcome(call):
    try:
        result = call()
    except RingCorruptedError as exc:
        return ("corrupt", exc.field, exc.value, exc.index)
    if isinstance(result, list):
        return [(e.phys_addr, e.data, e.pio) for e in result]
    if hasattr(result, "phys_addr"):
        return (result.phys_addr, result.data, result.pio)
    return result


def _bad_input_too(call):
    """*call*'s result, or its ValueError's message (push_many refuses bad records)."""
    try:
        return call()
    except ValueError as exc:
        return ("bad-input", str(exc))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    nbytes = fdp.ConsumeIntInRange(56, 2048) & ~3
    image = fdp.ConsumeBytes(nbytes).ljust(nbytes, b"\0")
    legacy = fdp.ConsumeBool()
    bufs = [bytearray(image), bytearray(image)]
    rings = [_ring.Ring(bufs[0], legacy_full_check=legacy),
             _ring_py.Ring(bufs[1], legacy_full_check=legacy)]
    for _ in range(fdp.ConsumeIntInRange(0, 64)):
        op = fdp.ConsumeIntInRange(0, 8)
        if op == 0:
            addr, size = fdp.ConsumeIntInRange(0, 2**64 - 1), fdp.ConsumeIntInRange(1, 8)
            payload, pio = fdp.ConsumeBytes(size).ljust(size, b"\0"), fdp.ConsumeBool()
            action = lambda r: r.push(addr, payload, pio=pio)  # noqa: E731
        elif op == 1:
            action = lambda r: r.pop()  # noqa: E731
        elif op == 2:
            limit = fdp.ConsumeIntInRange(0, 200)
            action = lambda r: r.drain(limit)  # noqa: E731
        elif op == 3:
            records = fdp.ConsumeIntInRange(0, 100)
            action = lambda r: (r.drain_into(out := bytearray(24 * records)), bytes(out))  # noqa: E731
        elif op == 4:
            limit = fdp.ConsumeIntInRange(0, 200)
            action = lambda r: (lambda seen: (r.consume(  # noqa: E731
                lambda a, d, p: seen.append((a, d, p)), limit), seen))([])
        elif op == 5:
            action = lambda r: r.reset()  # noqa: E731
        elif op == 6:   # arbitrary raw records, bad ones included: the same count or error
            raw = fdp.ConsumeBytes(24 * fdp.ConsumeIntInRange(0, 40))
            action = lambda r: _bad_input_too(lambda: r.push_many(raw))  # noqa: E731
        else:   # a peer scribbles on the shared memory
            offset = fdp.ConsumeIntInRange(0, nbytes - 4) & ~3
            value = fdp.ConsumeIntInRange(0, 2**32 - 1) if op == 7 else fdp.ConsumeIntInRange(0, 12)
            for buf in bufs:
                buf[offset:offset + 4] = value.to_bytes(4, "little")
            continue
        results = [outcome(lambda r=r: action(r)) for r in rings]
        if results[0] != results[1]:
            raise AssertionError(f"C and twin disagree: {results[0]!r} != {results[1]!r}")
        if bufs[0] != bufs[1]:
            raise AssertionError("C and twin left different memory")
    for ring in rings:
        ring.release()


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
