"""Which torch a source build compiles against (setup.py loads this file; stdlib only).

fastmargin._C links against one torch's C++ ABI, so it has to be compiled against the torch that
will import it. `pip install --no-build-isolation .` builds inside the user's environment, where
that torch is simply importable. A plain `pip install .` builds in an isolated environment that
holds only the build requirements (torch is deliberately not one of them, so pip cannot fetch
another torch for the build) and whose sys.path no longer has the target environment's
site-packages. The target environment is still the interpreter's own (sys.prefix) for pip, or an
activated virtualenv / conda environment for frontends that build in a venv of their own, so its
torch is found on disk and the build compiles against it. Where no torch is found, or the
importable torch differs from the target's, the build stops with the command that works.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import site
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Mapping, Optional

INSTALL_COMMAND = "pip install --no-build-isolation ."
BUILD_TOOLS_COMMAND = 'pip install "setuptools>=77" ninja'


class BuildTorchError(RuntimeError):
    """No usable torch to compile against; the message says what to run instead."""


@dataclass(frozen=True)
class TorchInstall:
    site_dir: str  # the directory that holds the torch package
    version: str  # torch.__version__, e.g. "2.13.0+cpu"
    cuda: Optional[str]  # torch.version.cuda: None for a CPU build of torch

    def describe(self) -> str:
        flavour = f"CUDA {self.cuda}" if self.cuda else "CPU build"
        return f"torch {self.version} ({flavour}) in {self.site_dir}"


def read_torch_version(site_dir: str) -> Optional[TorchInstall]:
    """The torch installed in `site_dir`, read from torch/version.py without importing it."""
    version_py = Path(site_dir, "torch", "version.py")
    if not version_py.is_file():
        return None
    values = {}
    for node in ast.parse(version_py.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("__version__", "cuda"):
            values[target.id] = ast.literal_eval(value)
    if "__version__" not in values:
        return None
    return TorchInstall(str(Path(site_dir)), values["__version__"], values.get("cuda"))


def _pth_paths(site_dir: str) -> List[str]:
    """Directories that the .pth files of `site_dir` add to sys.path (editable installs, links).

    Only plain path lines are read; `import` lines are skipped, never executed: they belong to
    another environment's packages and must not run inside this build.
    """
    paths = []
    for pth in sorted(Path(site_dir).glob("*.pth")):
        try:
            lines = pth.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            line = line.strip()
            if not line or line.startswith(("#", "import ", "import\t")):
                continue
            candidate = Path(site_dir, line)
            if candidate.is_dir():
                paths.append(str(candidate.resolve()))
    return paths


def target_site_dirs(
    prefix: Optional[str] = None, environ: Optional[Mapping[str, str]] = None
) -> List[str]:
    """site-packages of the environments this build may install into, most likely first.

    pip runs the build with the target environment's own interpreter, so that is sys.prefix;
    frontends that build in a venv of their own (uv, `python -m build`) leave the user's
    activated environment in VIRTUAL_ENV or CONDA_PREFIX. Paths are for this interpreter's
    Python version, so an environment of another Python never matches.
    """
    environ = os.environ if environ is None else environ
    prefixes = [prefix or sys.prefix, environ.get("VIRTUAL_ENV"), environ.get("CONDA_PREFIX")]
    dirs: List[str] = []
    for p in prefixes:
        if not p:
            continue
        for d in site.getsitepackages([p]):
            for candidate in [d, *_pth_paths(d)] if os.path.isdir(d) else []:
                if candidate not in dirs:
                    dirs.append(candidate)
    return dirs


def find_torch(site_dirs: Iterable[str]) -> Optional[TorchInstall]:
    """The first torch installed in `site_dirs`."""
    for d in site_dirs:
        found = read_torch_version(d)
        if found is not None:
            return found
    return None


def importable_torch() -> Optional[TorchInstall]:
    """The torch that `import torch` would load here (found without importing it)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    return read_torch_version(str(Path(spec.origin).resolve().parent.parent))


def choose(importable: Optional[TorchInstall], target: Optional[TorchInstall]) -> TorchInstall:
    """The torch to compile against, or BuildTorchError with the command that works."""
    if importable is None and target is None:
        raise BuildTorchError(
            "fastmargin: no torch found to compile against.\n"
            "fastmargin's kernels are compiled against the torch that will import them, so\n"
            "install torch first (the build you train with), then build in that environment:\n"
            f"    {BUILD_TOOLS_COMMAND}\n"
            f"    {INSTALL_COMMAND}"
        )
    if importable is None:
        return target  # an isolated build: compile against the target environment's torch
    if target is None or _same_torch(importable, target):
        return importable
    raise BuildTorchError(
        "fastmargin: this build would compile against\n"
        f"    {importable.describe()}\n"
        "but the environment it installs into has\n"
        f"    {target.describe()}\n"
        "and a build against one torch does not load in another. Build in that environment:\n"
        f"    {BUILD_TOOLS_COMMAND}\n"
        f"    {INSTALL_COMMAND}"
    )


def _same_torch(a: TorchInstall, b: TorchInstall) -> bool:
    return a.site_dir == b.site_dir or (a.version, a.cuda) == (b.version, b.cuda)


def _on_pythonpath(install: TorchInstall, environ: Mapping[str, str]) -> bool:
    """True when the user put this torch on PYTHONPATH: an explicit choice, kept as it is."""
    entries = [e for e in environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    return any(Path(e).resolve() == Path(install.site_dir).resolve() for e in entries)


def resolve(environ: Optional[Mapping[str, str]] = None) -> TorchInstall:
    """Make the torch to compile against importable and return it (called by setup.py)."""
    environ = os.environ if environ is None else environ
    importable = importable_torch()
    if importable is not None and _on_pythonpath(importable, environ):
        return importable
    chosen = choose(importable, find_torch(target_site_dirs(environ=environ)))
    if importable is None:
        # Appended, not prepended: the build's own setuptools and ninja keep precedence.
        sys.path.append(chosen.site_dir)
    return chosen
