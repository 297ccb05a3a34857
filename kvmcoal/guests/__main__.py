"""python -m kvmcoal.guests: list, check or build the guest programs.

  python -m kvmcoal.guests                 list the programs and their sizes
  python -m kvmcoal.guests check           do the binaries match what their sources build to?
  python -m kvmcoal.guests build           rebuild the binaries in place (source checkout only)
  python -m kvmcoal.guests build --out DIR build them into DIR

Building needs binutils (as, objcopy).  In place means the package's own
folder, which is allowed only in a source checkout: an installed package is
never rewritten.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import NAMES, assemble, in_source_checkout, load, source_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmcoal.guests",
                                     description="List, check or build kvmcoal's guest programs.",
                                     epilog="Building needs binutils (as, objcopy).")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("check", help="check that each binary is what its source builds to")
    build = sub.add_parser("build", help="rebuild the binaries from their sources")
    build.add_argument("--out", metavar="DIR", type=Path,
                       help="write NAME.bin files into DIR instead of the package folder "
                            "(which only a source checkout allows)")
    args = parser.parse_args(argv)
    if args.command is None:
        for name in NAMES:
            print(f"{name:<12} {len(load(name)):>6} bytes  {source_dir() / f'{name}.S'}")
        return 0
    try:
        if args.command == "check":
            stale = [name for name in NAMES if assemble(source_dir() / f"{name}.S") != load(name)]
            for name in stale:
                print(f"{name}.bin differs from what {name}.S builds to", file=sys.stderr)
            if not stale:
                print(f"all {len(NAMES)} guest binaries match their sources")
            return 1 if stale else 0
        out = args.out
        if out is None:
            if not in_source_checkout():
                parser.error(f"{source_dir()} is an installed package, not a source checkout: "
                             f"it is never rewritten; pass --out DIR")
            out = source_dir()
        if not out.is_dir():
            parser.error(f"--out {out}: not a directory")
        for name in NAMES:
            code = assemble(source_dir() / f"{name}.S")
            (out / f"{name}.bin").write_bytes(code)
            print(f"{out / f'{name}.bin'}: {len(code)} bytes")
        return 0
    except (FileNotFoundError, OSError) as exc:
        print(f"python -m kvmcoal.guests {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
