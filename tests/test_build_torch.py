"""A source build compiles against the torch of the environment it installs into, or stops.

Environments are faked on disk (a torch/version.py is all the locator reads); one subprocess
reproduces pip's isolated build, whose sys.path lacks the environment's site-packages.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmargin import _build_torch as bt

VERSION_PY = """from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip']
__version__ = {version!r}
debug = False
cuda: Optional[str] = {cuda!r}
git_version = 'cf30153c4c131c8164ee7798e5022d810682e2cb'
hip: Optional[str] = None
"""


def fake_env(prefix: Path, version: str | None, cuda: str | None = None) -> Path:
    """An environment at `prefix` whose site-packages holds torch `version` (None: no torch)."""
    site_dir = Path(site.getsitepackages([str(prefix)])[0])
    site_dir.mkdir(parents=True)
    if version is not None:
        fake_torch(site_dir, version, cuda)
    return site_dir


def fake_torch(directory: Path, version: str, cuda: str | None) -> None:
    (directory / "torch").mkdir(parents=True)
    (directory / "torch" / "version.py").write_text(VERSION_PY.format(version=version, cuda=cuda))


def test_reads_version_and_cuda_without_importing(tmp_path):
    fake_torch(tmp_path, "2.14.1+cu130", "13.0")
    found = bt.read_torch_version(str(tmp_path))
    assert (found.version, found.cuda, found.site_dir) == ("2.14.1+cu130", "13.0", str(tmp_path))
    fake_torch(tmp_path / "cpu", "2.13.0+cpu", None)
    assert bt.read_torch_version(str(tmp_path / "cpu")).cuda is None
    assert bt.read_torch_version(str(tmp_path / "nothing-here")) is None


def test_the_interpreters_environment_comes_first(tmp_path):
    own = fake_env(tmp_path / "own", "2.13.0+cpu")
    active = fake_env(tmp_path / "active", "2.14.1+cu130", "13.0")
    environ = {"VIRTUAL_ENV": str(tmp_path / "active")}
    dirs = bt.target_site_dirs(prefix=str(tmp_path / "own"), environ=environ)
    assert dirs.index(str(own)) < dirs.index(str(active))
    assert bt.find_torch(dirs).version == "2.13.0+cpu"
    # a frontend building in a venv of its own: the activated environment is the target
    builder = fake_env(tmp_path / "builder", None)
    dirs = bt.target_site_dirs(prefix=str(tmp_path / "builder"), environ=environ)
    assert str(builder) in dirs and bt.find_torch(dirs).version == "2.14.1+cu130"


def test_pth_paths_are_followed_and_import_lines_never_run(tmp_path):
    site_dir = fake_env(tmp_path / "env", None)
    elsewhere = tmp_path / "torch-checkout"
    fake_torch(elsewhere, "2.15.0a0+git1234", "13.0")
    marker = tmp_path / "ran"
    (site_dir / "__editable__.torch.pth").write_text(f"{elsewhere}\n")
    (site_dir / "hook.pth").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    dirs = bt.target_site_dirs(prefix=str(tmp_path / "env"), environ={})
    assert str(elsewhere.resolve()) in dirs
    assert bt.find_torch(dirs).version == "2.15.0a0+git1234"
    assert not marker.exists()


def test_choose():
    a = bt.TorchInstall("/build-env/site-packages", "2.14.1+cu130", "13.0")
    b = bt.TorchInstall("/user-env/site-packages", "2.13.0+cpu", None)
    assert bt.choose(None, b) is b  # isolated build: the target's torch
    assert bt.choose(a, None) is a  # no target found: the importable one
    assert bt.choose(b, b) is b
    same = bt.TorchInstall("/other/site-packages", "2.13.0+cpu", None)
    assert bt.choose(same, b) is same  # same torch in another place: same ABI
    with pytest.raises(bt.BuildTorchError) as mismatch:
        bt.choose(a, b)
    text = str(mismatch.value)
    assert "torch 2.14.1+cu130 (CUDA 13.0) in /build-env" in text
    assert "torch 2.13.0+cpu (CPU build) in /user-env" in text
    assert bt.INSTALL_COMMAND in text
    with pytest.raises(bt.BuildTorchError, match="no torch found") as none:
        bt.choose(None, None)
    assert bt.INSTALL_COMMAND in str(none.value) and bt.BUILD_TOOLS_COMMAND in str(none.value)


def test_a_torch_on_pythonpath_is_kept(tmp_path):
    fake_torch(tmp_path, "2.15.0a0", None)
    install = bt.read_torch_version(str(tmp_path))
    assert bt._on_pythonpath(install, {"PYTHONPATH": f"/elsewhere{os.pathsep}{tmp_path}"})
    assert not bt._on_pythonpath(install, {"PYTHONPATH": "/elsewhere"})


def test_isolated_build_finds_the_environments_torch(tmp_path):
    """As in pip's isolated build: the environment's site-packages are off sys.path."""
    torch_site = str(Path(torch.__file__).resolve().parent.parent)
    code = f"""
import importlib.util, sys
sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]
assert importlib.util.find_spec('torch') is None
spec = importlib.util.spec_from_file_location('bt', {bt.__file__!r})
bt = importlib.util.module_from_spec(spec); sys.modules['bt'] = bt; spec.loader.exec_module(bt)
chosen = bt.resolve(environ={{}})
import torch
print(chosen.version, chosen.site_dir, torch.__file__, sep='\\n')
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    version, site_dir, torch_file = result.stdout.splitlines()[-3:]
    assert version == torch.__version__
    assert Path(site_dir).resolve() == Path(torch_site)
    assert Path(torch_file).resolve() == Path(torch.__file__).resolve()
