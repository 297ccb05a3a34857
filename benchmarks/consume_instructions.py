"""Instructions per entry of Ring.consume against a plain Python loop, by callgrind.

Timings on a shared VM drift by tens of percent between runs; callgrind's
instruction counts do not.  For each ring content ("mixed": the benchmark
workload of distinct addresses and widths 1/2/4/8; "same": 169 identical
4-byte writes, the ring-side twin of the baseline's constant arguments) this
runs consume and the plain loop for 0 and R rounds under valgrind and divides
the difference by R x entries.  PYTHONHASHSEED is fixed: string hashing
changes dict probe counts, and with them the totals, from run to run.

    python benchmarks/consume_instructions.py [--rounds 200]

The workload is kvmcoal bench's consumer workload (kvmcoal.bench.consumer).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r'''
import sys
import kvmcoal
from kvmcoal.bench.consumer import empty_handler, make_entries
mode, rounds, contents = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n = kvmcoal.RING_MAX - 1
buf = bytearray(kvmcoal.PAGE_SIZE)
ring = kvmcoal.Ring(buf)
entries = make_entries(n) if contents == "mixed" else [(0xFE000000, b"\x2a\0\0\0", False)] * n
for addr, data, pio in entries:
    assert ring.push(addr, data, pio=pio)
image = bytes(buf)
handler = empty_handler

def plain_loop():
    a, d, p = 0xFE000000, b"\x2a\0\0\0", False
    for _ in range(n):
        handler(a, d, p)

consume = ring.consume
for _ in range(rounds):
    buf[:] = image                      # refill: the same cost in both modes
    if mode == "consume":
        assert consume(handler) == n
    else:
        plain_loop()
'''


def instructions(worker: Path, *args: str) -> int:
    with tempfile.NamedTemporaryFile() as out:
        run = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out.name}",
                              sys.executable, str(worker), *args],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": "0"})
    return int(re.search(r"Collected : (\d+)", run.stderr).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 1
    import kvmcoal
    entries = kvmcoal.RING_MAX - 1
    with tempfile.TemporaryDirectory() as tmp:
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        print(f"{'contents':<8}{'consume Ir/entry':>18}{'loop Ir/entry':>15}{'ratio':>8}")
        for contents in ("mixed", "same"):
            per_entry = {}
            for mode in ("consume", "loop"):
                base = instructions(worker, mode, "0", contents)
                total = instructions(worker, mode, str(args.rounds), contents)
                per_entry[mode] = (total - base) / (args.rounds * entries)
            print(f"{contents:<8}{per_entry['consume']:>18.0f}{per_entry['loop']:>15.0f}"
                  f"{per_entry['consume'] / per_entry['loop']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
