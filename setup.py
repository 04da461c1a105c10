"""Build fastmargin._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

The kernels are compiled against the torch of the environment they install into
(fastmargin/_build_torch.py finds it, also from pip's isolated build environment), and the build
writes what it was compiled against to fastmargin/_build_info.py, which `python -m fastmargin
info` prints and the import checks when the extension fails to load.

Environment knobs:
  FASTMARGIN_CUDA=0        force a CPU-only build even where nvcc is available
  TORCH_CUDA_ARCH_LIST     CUDA architectures; defaults to "9.0" when no GPU is visible
  CUDA_HOME                CUDA toolkit; defaults to /usr/local/cuda when nvcc lives there
  MAX_JOBS                 parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import setup

ROOT = Path(__file__).resolve().parent
MIN_SETUPTOOLS = (77, 0)  # the SPDX `license` string in pyproject.toml (PEP 639)


def _stop(message: str) -> None:
    """End the build with `message` (pip shows a failed build's output)."""
    print(message, file=sys.stderr)
    sys.exit(1)


def _load_build_torch():
    """fastmargin/_build_torch.py by path: importing the package would try to load _C."""
    spec = importlib.util.spec_from_file_location(
        "_fastmargin_build_torch", ROOT / "fastmargin" / "_build_torch.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


if tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2]) < MIN_SETUPTOOLS:
    _stop(
        f"fastmargin needs setuptools>=77 to build; this environment has "
        f'{setuptools.__version__}:\n    pip install "setuptools>=77" ninja'
    )


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

_build_torch = _load_build_torch()
try:
    _build_torch.resolve()  # the target environment's torch, importable from here on
except _build_torch.BuildTorchError as exc:
    _stop(str(exc))

import torch  # noqa: E402  (after CUDA_HOME is settled and the right torch is on sys.path)
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
    is_ninja_available,
)

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
    sources = (
        ["csrc/ops.cpp", "csrc/python/module.cpp"]
        + _sources("csrc/autograd/*.cpp")
        + _sources("csrc/composite/*.cpp")
        + _sources("csrc/cpu/*.cpp")
    )
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


def _first_line(command: list) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _nvcc_version() -> str:
    try:
        out = subprocess.run(
            [_find_nvcc() or "nvcc", "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    found = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return found.group(2) if found else "unknown"


def _cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST as compiled; torch uses the visible GPUs' when it is unset."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return " ".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _build_record(extension_file: str) -> dict:
    return {
        "fastmargin": _project_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": WITH_CUDA,
        "nvcc": _nvcc_version() if WITH_CUDA else None,
        "cuda_arch_list": _cuda_arch_list() if WITH_CUDA else None,
        "compiler": _first_line([os.environ.get("CXX", "c++"), "--version"]),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "extension": extension_file,
    }


def _project_version() -> str:
    found = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return found.group(1) if found else "unknown"


def _record_source(record: dict) -> str:
    lines = [
        '"""What fastmargin._C was compiled against (written by setup.py, not versioned)."""',
        "",
        "BUILD = {",
        *(f"    {key!r}: {value!r}," for key, value in record.items()),
        "}",
        "",
    ]
    return "\n".join(lines)


class BuildExtensionWithRecord(BuildExtension):
    """Builds _C, then writes fastmargin/_build_info.py beside it (wheel and in-place copies)."""

    def run(self):
        super().run()
        extension_file = os.path.basename(self.get_ext_fullpath("fastmargin._C"))
        source = _record_source(_build_record(extension_file))
        targets = [Path(self.build_lib) / "fastmargin"]
        if self.inplace:  # `setup.py build_ext --inplace` and editable installs
            targets.append(ROOT / "fastmargin")
        for directory in targets:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "_build_info.py").write_text(source, encoding="utf-8")


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionWithRecord.with_options(use_ninja=is_ninja_available())},
)
