"""Loads the compiled kernels (fastmargin._C) and, when that fails, says why and what fixes it.

A compiled torch extension loads only into the torch it was compiled against. The build writes
what it was compiled against to fastmargin/_build_info.py (setup.py); when loading fails, the
error compares that record with the running torch and names the cause: a build for another
torch, a CUDA build whose CUDA libraries are missing here, a build for another Python, or no
build at all. Each comes with the command that fixes it and keeps the loader's own message.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import platform
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import List, Optional

PACKAGE_DIR = Path(__file__).resolve().parent

# Libraries a CUDA build of fastmargin._C needs beyond torch's CPU libraries.
_CUDA_LIBRARY = re.compile(
    r"lib(?:c10_cuda|torch_cuda|cudart|cuda|nvrtc|cublas\w*|cusparse\w*|cufft\w*|curand|"
    r"cusolver\w*|nvToolsExt|nvJitLink|cupti)\b[\w.]*"
)


@dataclass(frozen=True)
class RunningTorch:
    version: str  # torch.__version__
    cuda: Optional[str]  # torch.version.cuda: None for a CPU build of torch
    python: str


def running_torch() -> RunningTorch:
    import torch

    return RunningTorch(torch.__version__, torch.version.cuda, platform.python_version())


def build_record() -> Optional[dict]:
    """What _C was compiled against, or None where the build wrote no record."""
    try:
        module = importlib.import_module(f"{__package__}._build_info")
    except ImportError:
        return None
    return dict(getattr(module, "BUILD", {})) or None


def describe_torch(version: str, cuda: Optional[str]) -> str:
    return f"torch {version} ({f'CUDA {cuda}' if cuda else 'CPU build'})"


def built_for(record: dict, running: RunningTorch) -> bool:
    """True when the record names the running torch (version and CUDA flavour)."""
    return (record.get("torch"), record.get("torch_cuda")) == (running.version, running.cuda)


def rebuild_command(package_dir: Path = PACKAGE_DIR, python: str = sys.executable) -> str:
    """The command that rebuilds _C against the torch of `python`'s environment."""
    root = package_dir.parent
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():  # a source checkout
        if Path(sys.prefix).resolve() == (root / ".venv").resolve():
            return f"make -C {root} clean build"
        return f"{python} -m pip install --no-build-isolation -e {root}"
    return (
        f"{python} -m pip install --no-build-isolation --force-reinstall --no-deps "
        "<fastmargin source directory>"
    )


def _torch_install_command(version: str, cuda: Optional[str]) -> str:
    release = version.split("+")[0]
    if not cuda:
        return f"pip install torch=={release} --index-url https://download.pytorch.org/whl/cpu"
    tag = "cu" + cuda.replace(".", "")
    return f"pip install torch=={release} --index-url https://download.pytorch.org/whl/{tag}"


def extension_files(package_dir: Path = PACKAGE_DIR) -> List[str]:
    """Compiled `_C` files in the package directory, for any Python version."""
    return sorted(p.name for p in package_dir.glob("_C.*") if p.suffix in (".so", ".pyd"))


def explain_load_failure(
    loader_message: str,
    record: Optional[dict],
    running: RunningTorch,
    files: List[str],
    rebuild: str,
) -> str:
    """The text of the ImportError raised when _C does not load."""
    cuda_library = _CUDA_LIBRARY.search(loader_message)
    here = describe_torch(running.version, running.cuda)
    fixes: List[str]
    if not files:
        cause = "fastmargin._C is not built: the package holds no compiled extension."
        fixes = [f"build it against this torch: {rebuild}"]
    elif not any("_C" + suffix in files for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        cause = (
            f"fastmargin._C was built for another Python ({', '.join(files)}); this is "
            f"Python {running.python}."
        )
        fixes = [f"rebuild it for this Python and torch: {rebuild}"]
    elif record is not None and not built_for(record, running):
        built = describe_torch(record.get("torch", "?"), record.get("torch_cuda"))
        cause = (
            f"fastmargin._C was built against {built}, but this Python runs {here}; "
            "an extension loads only into the torch it was compiled against."
        )
        if cuda_library and not running.cuda:
            cause += (
                f" (It needs {cuda_library.group(0)}, which a CPU build of torch does not have.)"
            )
        fixes = [
            f"rebuild it against this torch: {rebuild}",
            "or install the torch it was built for: "
            + _torch_install_command(record.get("torch", "?"), record.get("torch_cuda")),
        ]
    elif cuda_library and not running.cuda:
        cause = (
            f"fastmargin._C was built with CUDA kernels against a CUDA build of torch and needs "
            f"{cuda_library.group(0)}, but this Python runs {here}, which has no CUDA libraries."
        )
        fixes = [f"rebuild it against this torch (CPU kernels only): {rebuild}"]
        if record is not None:
            fixes.append(
                "or install the torch it was built for: "
                + _torch_install_command(record.get("torch", "?"), record.get("torch_cuda"))
            )
    elif cuda_library:
        cause = (
            f"the CUDA runtime library {cuda_library.group(0)} that fastmargin._C needs was not "
            f"found: {here} is a CUDA build, but its CUDA libraries are missing or not on the "
            "loader's path."
        )
        fixes = [
            "reinstall torch with its CUDA libraries: "
            + _torch_install_command(running.version, running.cuda),
            f"or build fastmargin without CUDA kernels: FASTMARGIN_CUDA=0 {rebuild}",
        ]
    elif record is None:
        cause = (
            "fastmargin._C could not be loaded, and no build record says which torch it was "
            f"compiled against; most often it was built against another torch than {here}."
        )
        fixes = [f"rebuild it against this torch: {rebuild}"]
    else:
        cause = f"fastmargin._C failed to load although it was built against this torch ({here})."
        fixes = [f"rebuild it: {rebuild}"]
    lines = [cause, "To fix:", *(f"  {fix}" for fix in fixes), f"Loader: {loader_message}"]
    return "\n".join(lines)


def load_extension() -> ModuleType:
    """Import _C (which registers the ops) and return it, or raise ImportError naming the cause
    and the fix."""
    import torch  # noqa: F401  (torch's libraries must be loaded before _C links against them)

    try:
        module = importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        message = explain_load_failure(
            str(exc), build_record(), running_torch(), extension_files(), rebuild_command()
        )
        raise ImportError(message) from exc
    record = build_record()
    running = running_torch()
    loaded = os.path.basename(getattr(module, "__file__", "") or "")
    if record is not None and record.get("extension", loaded) != loaded:
        # The record describes another build beside this one (another Python's extension, built
        # in place in the same checkout): it says nothing about the one that loaded.
        record = None
    if record is not None and not built_for(record, running):
        built = describe_torch(record.get("torch", "?"), record.get("torch_cuda"))
        warnings.warn(
            f"fastmargin._C was built against {built} but this Python runs "
            f"{describe_torch(running.version, running.cuda)}; it loaded, but an extension "
            f"compiled against another torch may fail at any call. Rebuild: {rebuild_command()}",
            RuntimeWarning,
            stacklevel=2,
        )
    return module
