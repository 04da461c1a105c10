"""`pip install .` into a fresh environment that already holds torch: it imports and runs.

The README's plain install path, end to end: pip builds in an isolated environment (fetching
only setuptools and ninja), the build compiles against the environment's torch (CPU kernels
only, to keep it short), and the installed package loads, computes F.cross_entropy's numbers
and reports what it was built against. One CPU build: a minute or two on two cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, torch, torch.nn.functional as F
import fastmargin as fm
assert fm.__file__.startswith(sys.prefix), fm.__file__  # the installed copy, not a checkout
torch.manual_seed(0)
logits = torch.randn(6, 3, 11, requires_grad=True)
target = torch.randint(0, 11, (6,))
loss = fm.worst_of_k_cross_entropy(logits, target, dim=1)
rows = F.cross_entropy(logits.reshape(-1, 11), target.repeat_interleave(3), reduction="none")
expected = rows.view(6, 3).max(dim=1).values.mean()
torch.testing.assert_close(loss, expected)
(g,) = torch.autograd.grad(loss, logits)
(g_expected,) = torch.autograd.grad(expected, logits)
torch.testing.assert_close(g, g_expected)
print("op ok")
"""


def _source_copy(destination: Path) -> Path:
    """The tracked sources only: no in-place build, record or caches travel with them."""
    skip = shutil.ignore_patterns("_C.*", "_build_info.py", "__pycache__", "*.egg-info")
    destination.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    for name in ("csrc", "fastmargin"):
        shutil.copytree(ROOT / name, destination / name, ignore=skip)
    return destination


@pytest.mark.slow
def test_pip_install_into_an_environment_with_torch(tmp_path):
    source = _source_copy(tmp_path / "src")
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The environment "already holds torch": this test's torch, linked in rather than copied.
    torch_site = Path(torch.__file__).resolve().parent.parent
    Path(purelib, "torch-under-test.pth").write_text(f"{torch_site}\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FASTMARGIN_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--quiet", str(source)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]

    run = subprocess.run(
        [python, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "op ok" in run.stdout, run.stderr
    info = subprocess.run(
        [python, "-m", "fastmargin", "info"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert info.returncode == 0, info.stderr
    built = f"built against:  torch {torch.__version__}"
    assert built in info.stdout and "CPU only" in info.stdout, info.stdout
    assert "MISMATCH" not in info.stdout
    assert f"Python {sys.version.split()[0]}" in info.stdout
