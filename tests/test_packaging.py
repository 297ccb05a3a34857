"""What a newcomer meets: the source tree, the type checker, Cython cimports, the guests tool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvmcoal
from kvmcoal import guests

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_a_source_tree_without_its_extension_says_what_to_do(tmp_path):
    # A copy of the package with no compiled extension, as a fresh clone is
    # before it is built, and as the source tree is when kvmcoal was installed
    # with a plain (non-editable) pip install and Python runs inside the tree.
    shutil.copytree(ROOT / "kvmcoal", tmp_path / "kvmcoal",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # -S: no site-packages, so no installed kvmcoal can be found before this one.
    result = run("-S", "-c", "import kvmcoal", cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: kvmcoal's C extension is not built in")
    assert "pip install -e ." in last and "from another directory" in last
    assert "circular import" not in result.stderr


def test_cython_code_can_cimport_the_ring(tmp_path):
    pytest.importorskip("Cython")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    shutil.copy(ROOT / "tests" / "cython" / "ring_user.pyx", tmp_path)
    package_parent = Path(kvmcoal.__file__).resolve().parent.parent
    (tmp_path / "setup.py").write_text(
        "from Cython.Build import cythonize\n"
        "from setuptools import Extension, setup\n"
        f"ext = Extension('ring_user', ['ring_user.pyx'], include_dirs=[{kvmcoal.get_include()!r}])\n"
        # The .pxd is found on sys.path in a normal install; an editable
        # install's import hook hides it from Cython, so name its folder.
        f"setup(ext_modules=cythonize([ext], include_path=[{str(package_parent)!r}]))\n")
    build = run("setup.py", "-q", "build_ext", "--inplace", cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    check = run("-c", "import ring_user, kvmcoal\n"
                "with kvmcoal.CoalescedBuffer() as buf:\n"
                "    assert ring_user.slots(buf.ring) == kvmcoal.RING_MAX\n"
                "    assert ring_user.push(buf.ring, 0xfe000000, b'\\x2a\\x00')\n"
                "    assert buf.wait(0)              # the C push signalled the buffer\n"
                "    [e] = buf.ring.drain()\n"
                "    assert (e.phys_addr, e.value, e.len) == (0xfe000000, 42, 2)\n"
                "print('ok')", cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr


def test_mypy_finds_kvmcoal_as_the_guide_says(tmp_path):
    # An editable install's import hook is invisible to mypy; the guide says
    # to point MYPYPATH at the checkout (or install in editable_mode=strict).
    pytest.importorskip("mypy")
    code = ("import kvmcoal\nimport kvmcoal.kvm\n"
            "reveal_type(kvmcoal.CoalescedBuffer(nbytes=4096).nbytes)\n"
            "reveal_type(kvmcoal.kvm.Kvm().create_vm())\n")
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    result = run("-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "-c", code,
                 cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'Revealed type is "int"' in result.stdout
    assert 'Revealed type is "kvmcoal.kvm.vm.Vm"' in result.stdout


def test_guests_help_builds_nothing():
    before = {name: (guests.source_dir() / f"{name}.bin").stat().st_mtime_ns
              for name in guests.NAMES}
    result = run("-m", "kvmcoal.guests", "--help")
    assert result.returncode == 0 and "build" in result.stdout and "check" in result.stdout
    assert {name: (guests.source_dir() / f"{name}.bin").stat().st_mtime_ns
            for name in guests.NAMES} == before


def test_guests_never_rewrite_an_installed_package(tmp_path):
    # The guests package outside a source checkout, as pip installs it.
    site = tmp_path / "site"
    shutil.copytree(guests.source_dir(), site / "kvmcoal" / "guests",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (site / "kvmcoal" / "__init__.py").write_text("")
    installed = site / "kvmcoal" / "guests"
    before = {p.name: p.read_bytes() for p in installed.glob("*.bin")}
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = run("-m", "kvmcoal.guests", "build", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "installed package" in result.stderr and "--out DIR" in result.stderr
    assert {p.name: p.read_bytes() for p in installed.glob("*.bin")} == before
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("binutils not installed: cannot build into --out")
    out = tmp_path / "out"
    out.mkdir()
    result = run("-m", "kvmcoal.guests", "build", "--out", str(out), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.bin")} == before


@pytest.mark.parametrize("command", [[], ["demo"], ["probe"], ["bench"]])
def test_command_line_help_is_plain_text(command):
    result = run("-m", "kvmcoal", *command, "--help")
    assert result.returncode == 0, result.stderr
    for markup in ("``", ":func:", ":class:", ":meth:", ":mod:", ":attr:"):
        assert markup not in result.stdout
