"""Build fastmargin._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment knobs:
  FASTMARGIN_CUDA=0        force a CPU-only build even where nvcc is available
  TORCH_CUDA_ARCH_LIST     CUDA architectures; defaults to "9.0" when no GPU is visible
  CUDA_HOME                CUDA toolkit; defaults to /usr/local/cuda when nvcc lives there
  MAX_JOBS                 parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    if os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        return str(candidate) if candidate.exists() else None
    if Path("/usr/local/cuda/bin/nvcc").exists():
        # torch.utils.cpp_extension reads CUDA_HOME at import time, so set it first.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


def _want_cuda() -> bool:
    if os.environ.get("FASTMARGIN_CUDA", "1") == "0":
        return False
    return _find_nvcc() is not None


WANT_CUDA = _want_cuda()
os.chdir(ROOT)  # relative source paths below

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = WANT_CUDA and torch.version.cuda is not None


def _cuda_library_includes() -> list[str]:
    """Headers shipped by the torch wheel's nvidia-* packages (cusparse.h and friends).

    torch's CUDA headers include them, and a bare toolkit (as on the build machine) may lack
    them, so add every nvidia/*/include directory found next to torch.
    """
    site = Path(torch.__file__).resolve().parent.parent
    return sorted(str(p) for p in site.glob("nvidia/*/include") if p.is_dir()) + sorted(
        str(p) for p in site.glob("nvidia/include") if p.is_dir()
    )


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))


def _extension():
    include_dirs = [str(ROOT / "csrc" / "include")]
    # Sources relative to this file: setuptools refuses absolute paths when building wheels
    # (pip install, editable or not).
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    # torch adds the C++ standard it was built with. -fno-trapping-math lets gcc if-convert the
    # branch-free lane loops of cpu_vec_math.h into SIMD (it changes no NaN/inf semantics);
    # -fno-math-errno lets it vectorise sqrtf (the noise of cpu_noise.h: 3x faster), which
    # otherwise keeps a scalar call per lane for errno. No code here reads errno.
    cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"]
    if not WITH_CUDA:
        return CppExtension(
            "fastmargin._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    sources += _sources("csrc/cuda/*.cu")
    return CUDAExtension(
        "fastmargin._C",
        sources,
        include_dirs=include_dirs + _cuda_library_includes(),
        define_macros=[("FASTMARGIN_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
