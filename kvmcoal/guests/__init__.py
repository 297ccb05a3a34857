"""Guest programs for tests, benchmarks and the demo.

Each program is assembly source in this folder (``NAME.S``, GNU as syntax,
documented at its top) next to the flat binary built from it (``NAME.bin``).
``python -m kvmcoal.guests build`` rebuilds every binary from its source with
binutils (``as --32``, or ``--64`` for 64-bit code, and ``objcopy -O binary``),
in place only in a source checkout; ``check`` and a test check that the
committed binaries are exactly what their sources build to.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

__all__ = ["NAMES", "assemble", "in_source_checkout", "load", "source_dir"]

NAMES = ("store_loop", "selftest", "ordering", "flat32", "demo", "script", "doorbell")


def source_dir() -> Path:
    """The folder that holds the guest sources and binaries."""
    return Path(__file__).resolve().parent


def in_source_checkout() -> bool:
    """Whether these guests are a source checkout's (which may be rebuilt in place)."""
    pyproject = source_dir().parent.parent / "pyproject.toml"
    try:
        return 'name = "kvmcoal"' in pyproject.read_text()
    except OSError:
        return False


def load(name: str) -> bytes:
    """The flat binary of guest program *name*, ready to copy into guest memory."""
    if name not in NAMES:
        raise ValueError(f"unknown guest program {name!r}; known: {', '.join(NAMES)}")
    return resources.files(__name__).joinpath(f"{name}.bin").read_bytes()


def assemble(source: Path) -> bytes:
    """Assemble one source file to a flat binary (needs binutils' as and objcopy)."""
    for tool in ("as", "objcopy"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} (binutils) is needed to build guest programs")
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "guest.o"
        binary = Path(tmp) / "guest.bin"
        # Sources that switch to 64-bit code need a 64-bit object.
        bits = "--64" if ".code64" in source.read_text() else "--32"
        subprocess.run(["as", bits, "-o", str(obj), str(source)], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)],
                       check=True)
        return binary.read_bytes()
