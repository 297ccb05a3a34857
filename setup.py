"""Build kvmcoal's five C extensions, one per concept:

- kvmcoal._ring       the ring (src/ring.pyx, src/ring_impl.c; its C header
                      kvmcoal/include/ring_impl.h and Cython interface
                      kvmcoal/_ring.pxd ship with the package for cimporters);
- kvmcoal._zone_bus   the emulated kernel's zone bus (src/zone_bus.pyx, src/grace.h),
                      which cimports the ring;
- kvmcoal._dispatch    the Bus's delivery from rings to devices (src/dispatch.pyx),
                      which cimports the ring;
- kvmcoal.kvm._router the v2 API's router on real KVM (src/router.pyx), which
                      cimports the ring and the zone tables (src/io_bus.h, the
                      kernel's bus walk, shared with the zone bus);
- kvmcoal.kvm._abi    the /dev/kvm ABI (src/kvm_abi.pyx, src/linux_kvm.pxd),
                      which routes after every KVM_RUN.

The metadata lives in pyproject.toml.  <linux/kvm.h> comes from the system's
kernel headers (Debian: linux-libc-dev).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

extra_compile_args = ["-O2", "-Wall", "-Wno-unused-function"]
extra_link_args = []
# KVMCOAL_SANITIZE=address,undefined builds instrumented extensions for CI.
sanitize = os.environ.get("KVMCOAL_SANITIZE")
if sanitize:
    flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
             "-g"]
    extra_compile_args += flags
    extra_link_args += flags


def extension(name, sources, depends):
    return Extension(name, sources=sources, include_dirs=["kvmcoal/include", "src"],
                     depends=["kvmcoal/include/ring_impl.h", "kvmcoal/_ring.pxd", *depends],
                     extra_compile_args=extra_compile_args, extra_link_args=extra_link_args)


setup(
    ext_modules=cythonize(
        [extension("kvmcoal._ring", ["src/ring.pyx", "src/ring_impl.c"], []),
         extension("kvmcoal._zone_bus", ["src/zone_bus.pyx"],
                   ["src/grace.h", "src/io_bus.h", "kvmcoal/_zone_bus.pxd"]),
         extension("kvmcoal._dispatch", ["src/dispatch.pyx"], ["kvmcoal/_dispatch.pxd"]),
         extension("kvmcoal.kvm._router", ["src/router.pyx"],
                   ["src/io_bus.h", "kvmcoal/_zone_bus.pxd", "kvmcoal/kvm/_router.pxd"]),
         extension("kvmcoal.kvm._abi", ["src/kvm_abi.pyx"],
                   ["src/linux_kvm.pxd", "kvmcoal/kvm/_router.pxd"])],
        include_path=["src", "."],
        compiler_directives={"language_level": 3, "embedsignature": True},
    ),
)
