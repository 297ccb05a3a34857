"""Compile a C file of ``benchmarks/`` with gcc, once, into ``benchmarks/build/``.

The C baselines (``cvmm.c``, a small C VMM; ``cconsumer.c``, a C consumer
as a CPython extension) are yardsticks, not part of kvmcoal, so setup.py
does not build them: they are built here on first use.  The output is
named by a hash of the source and of every flag given to gcc, so an edit
or a change of flags builds a new file and a stale one is never used.  A
build goes to a temporary name first and is moved into place atomically,
so a concurrent run never loads half a file.  ``benchmarks/build/`` is
git-ignored.

Where the C baseline cannot be built here at all (no gcc, or a header it
includes is not installed) the error is :class:`CBuildUnavailable`, which
the benchmarks report as the baseline being missing (pytest: a skip with
the reason).  Any other compiler error is a bug in the source and raises
``RuntimeError`` with gcc's output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Literal

BUILD_DIR = Path(__file__).resolve().parent / "build"

Kind = Literal["executable", "extension"]

# gcc's words for an #include it cannot find.
_MISSING_HEADER = re.compile(r"fatal error: (\S+): No such file or directory")


class CBuildUnavailable(RuntimeError):
    """A C baseline cannot be built here (no gcc, or a missing header); the message says why."""


def build(source: Path, kind: Kind, flags: Sequence[str]) -> Path:
    """``benchmarks/build/<stem>-<hash>[EXT_SUFFIX]``, compiled from *source* unless it exists.

    *kind* is ``"executable"`` (``gcc FLAGS -o OUT SOURCE``) or
    ``"extension"``, a CPython extension module for this interpreter
    (``-shared -fPIC`` and Python's include directory are added, and the
    name ends in ``EXT_SUFFIX``).  The hash covers the source and every
    flag, so for an executable it is the one ``kvm_workload.build_cvmm``
    has always used.
    """
    args = list(flags)
    suffix = ""
    python_h: Path | None = None
    if kind == "extension":
        include = sysconfig.get_paths()["include"]
        python_h = Path(include) / "Python.h"
        args += ["-shared", "-fPIC", f"-I{include}"]
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    elif kind != "executable":
        raise ValueError(f"kind must be 'executable' or 'extension', not {kind!r}")
    tag = hashlib.sha256(source.read_bytes() + " ".join(args).encode()).hexdigest()[:12]
    target = BUILD_DIR / f"{source.stem}-{tag}{suffix}"
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
    BUILD_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
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
    return target


def import_extension(source: Path, flags: Sequence[str]) -> ModuleType:
    """Build *source* as an extension module (see :func:`build`) and import it.

    The module is named after the source's stem (its ``PyInit_<stem>``)
    and is not put in ``sys.modules``: it is a private yardstick.
    """
    path = build(source, "extension", flags)
    spec = importlib.util.spec_from_file_location(source.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
