"""The committed guest binaries are exactly what their assembly sources build to."""

from __future__ import annotations

import shutil

import pytest

from kvmcoal import guests


@pytest.mark.parametrize("name", guests.NAMES)
def test_binary_matches_source(name):
    missing = [tool for tool in ("as", "objcopy") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"binutils ({', '.join(missing)}) not installed; cannot rebuild {name}")
    assert guests.assemble(guests.source_dir() / f"{name}.S") == guests.load(name)


def test_unknown_guest():
    with pytest.raises(ValueError, match="nope"):
        guests.load("nope")
