"""Rebuild every guest binary from its assembly source: python -m kvmcoal.guests"""

from . import NAMES, assemble, source_dir

for name in NAMES:
    code = assemble(source_dir() / f"{name}.S")
    (source_dir() / f"{name}.bin").write_bytes(code)
    print(f"{name}.bin: {len(code)} bytes")
