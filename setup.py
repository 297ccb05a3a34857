"""Build the C core, kvmcoal._ring, from src/ring.pyx and src/ring_impl.c.

The metadata lives in pyproject.toml; this file only describes the extension.
<linux/kvm.h> comes from the system's kernel headers (Debian: linux-libc-dev).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

extra_compile_args = ["-O2", "-Wall", "-Wno-unused-function"]
extra_link_args = []
# KVMCOAL_SANITIZE=address,undefined builds an instrumented extension for CI.
sanitize = os.environ.get("KVMCOAL_SANITIZE")
if sanitize:
    flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
             "-g"]
    extra_compile_args += flags
    extra_link_args += flags

ring = Extension(
    "kvmcoal._ring",
    sources=["src/ring.pyx", "src/ring_impl.c"],
    include_dirs=["src"],
    depends=["src/ring_impl.h", "src/ring_impl.pxd", "src/kvm_abi.pxd", "src/kvm.pxi", "src/zone_bus.pxi"],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

setup(
    ext_modules=cythonize(
        [ring],
        include_path=["src"],
        compiler_directives={"language_level": 3, "embedsignature": True},
    ),
)
