"""Compile a C yardstick of kvmcoal bench with gcc, once, into a per-user cache.

The C baselines (c/cvmm.c, a small C VMM; c/cconsumer.c, a C consumer as a
CPython extension) are yardsticks, not part of kvmcoal, so setup.py does not
build them: they ship as source (package data) and are built here on first
use, into $XDG_CACHE_HOME/kvmcoal/bench/ (~/.cache/kvmcoal/bench/ without
it), never into site-packages or the source tree.  The output is named by a
hash of the source, of every flag given to gcc and, for an extension, of
the Python it is built for, so an edit, a change of flags or another Python
builds a new file and a stale one is never used.  A build goes to a
temporary name first and is moved into place atomically, so a concurrent
run never loads half a file.

Where a C baseline cannot be built here at all (no gcc, no Python headers
for an extension, a header it includes not installed, a cache directory
that cannot be written) the error is CBuildUnavailable, which the
benchmarks report as the baseline being missing, with the reason.  Any
other compiler error is a bug in the source and raises RuntimeError with
gcc's output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Literal

from ..errors import CBuildUnavailable

SOURCE_DIR = Path(__file__).resolve().parent / "c"
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")

Kind = Literal["executable", "extension"]

# gcc's words for an #include it cannot find.
_MISSING_HEADER = re.compile(r"fatal error: (\S+): No such file or directory")


def cache_dir() -> Path:
    """Where the builds go: $XDG_CACHE_HOME/kvmcoal/bench, else ~/.cache/kvmcoal/bench."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # as the XDG spec says
    return root / "kvmcoal" / "bench"


def build(name: str, kind: Kind, flags: Sequence[str] = CFLAGS) -> Path:
    """The cached build of c/*name*, compiled with gcc unless it is there already.

    *kind* is "executable" (gcc FLAGS -o OUT SOURCE) or "extension", a
    CPython extension module for this interpreter (-shared -fPIC and
    Python's include directory are added, and the name ends in
    EXT_SUFFIX).
    """
    source = SOURCE_DIR / name
    args = list(flags)
    suffix = ""
    python_h: Path | None = None
    key = source.read_bytes()
    if kind == "extension":
        include = sysconfig.get_paths()["include"]
        python_h = Path(include) / "Python.h"
        args += ["-shared", "-fPIC", f"-I{include}"]
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        key += f"\0{sys.version}\0{sys.executable}\0{suffix}".encode()
    elif kind != "executable":
        raise ValueError(f"kind must be 'executable' or 'extension', not {kind!r}")
    tag = hashlib.sha256(key + "\0".join(args).encode()).hexdigest()[:16]
    where = cache_dir()
    target = where / f"{source.stem}-{tag}{suffix}"
    if target.exists():
        return target

    # Only compiling needs gcc and the headers: a build made earlier is used without them.
    gcc = shutil.which("gcc")
    if gcc is None:
        raise CBuildUnavailable(f"gcc is not installed, so {source.name} cannot be built; "
                                "install gcc to compare against it")
    if python_h is not None and not python_h.exists():
        raise CBuildUnavailable(
            f"Python's C headers are not installed ({python_h} is missing), so "
            f"{source.name} cannot be built; install this Python's development headers")
    try:
        where.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=where)
    except OSError as exc:
        raise CBuildUnavailable(f"{source.name} cannot be built: its cache directory {where} "
                                f"cannot be written ({exc}); set XDG_CACHE_HOME") from None
    try:
        out = Path(tmp) / target.name
        proc = subprocess.run([gcc, *args, "-o", str(out), str(source)],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            missing = _MISSING_HEADER.search(proc.stderr)
            if missing:
                raise CBuildUnavailable(
                    f"{source.name} cannot be built: the header {missing.group(1)} is not "
                    "installed (for <linux/...> headers: the kernel's uapi headers, "
                    "linux-libc-dev on Debian and Ubuntu)")
            raise RuntimeError(f"gcc failed to build {source}:\n{proc.stderr}")
        os.replace(out, target)   # atomic: a concurrent build never loads half a file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def import_extension(name: str, flags: Sequence[str] = CFLAGS) -> ModuleType:
    """Build c/*name* as an extension module (see build) and import it.

    The module is named after the source's stem (its PyInit_<stem>) and is
    not put in sys.modules: it is a private yardstick.
    """
    path = build(name, "extension", flags)
    stem = Path(name).stem
    spec = importlib.util.spec_from_file_location(stem, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{path} cannot be imported as an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
