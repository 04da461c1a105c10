"""Build the host emulation of the CUDA kernels (``make test-emu`` runs this, then the tests).

The four ``csrc/cuda/*.cu`` files are compiled as C++ for the host against the emulation
header ``csrc/emu/cuda_emu.h`` (each CUDA thread an OS thread, checked collectives) with
AddressSanitizer and UBSan's alignment check, into one shared library that registers the CUDA
host code as ``torch.ops.fastmargin_emu.*`` on the CPU key, plus the seeded defects of the
self-test (``torch.ops.fastmargin_emu_selftest.*``). The library is not a Python module: the
tests load it with ``torch.ops.load_library`` in a process that has libasan preloaded.

Prints the library's path. Incremental (ninja) under ``build/emu``.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "emu"

# -O1 keeps the emulated run fast enough with the sanitizers while compiling in a few minutes on
# 2 cores; -fno-sanitize-recover turns a misaligned access into a failure, not a warning.
SANITIZE = ["-fsanitize=address", "-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
CXX_FLAGS = ["-O1", "-g1", "-fno-omit-frame-pointer", "-Wno-unknown-pragmas", *SANITIZE]


def library_path() -> Path:
    libs = sorted(BUILD.glob("fastmargin_emu*.so"))
    if not libs:
        raise FileNotFoundError(f"no emulation library under {BUILD}: run tests/emu/build_emu.py")
    return libs[0]


def build() -> Path:
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    os.chdir(ROOT)
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "csrc/emu/*.cpp")))
    ext = CppExtension(
        "fastmargin_emu",
        sources,
        # The emulation's stand-ins for cuda_runtime.h and c10/cuda/*.h come before torch's.
        include_dirs=[str(ROOT / "csrc/emu/include"), str(ROOT / "csrc/include")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=SANITIZE,
    )
    setup(
        name="fastmargin_emu",
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        script_args=[
            "-q",
            "build_ext",
            "--build-lib",
            str(BUILD),
            "--build-temp",
            str(BUILD / "obj"),
        ],
    )
    return library_path()


if __name__ == "__main__":
    print(build(), file=sys.stdout)
