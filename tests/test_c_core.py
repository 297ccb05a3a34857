"""The C core on its own: ring_impl.c with two threads under ThreadSanitizer."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_producer_and_consumer_threads_under_tsan(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    binary = tmp_path / "ring_threads"
    # -Wno-tsan: TSan does not model the two standalone fences of the wakeup
    # protocol; it still checks every access around them.
    build = subprocess.run(
        ["gcc", "-O1", "-g", "-fsanitize=thread", "-Wno-tsan", f"-I{ROOT / 'kvmcoal' / 'include'}",
         str(ROOT / "tests" / "c" / "ring_threads.c"), str(ROOT / "src" / "ring_impl.c"),
         "-o", str(binary), "-lpthread"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300,
                         env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING: ThreadSanitizer" not in run.stderr
    assert "2000000 entries in order" in run.stdout
