"""A load failure of fastmargin._C names its cause and the fix, keeping the loader's message.

The causes are simulated: a build record against another torch, a CUDA build on a CPU torch, a
CUDA torch without its runtime, a build for another Python, no build. Two subprocess tests run
the real import of a copy of the package whose record or binary is made wrong on purpose.
"""

from __future__ import annotations

import importlib.machinery
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmargin
from fastmargin import _loader
from fastmargin.__main__ import main

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
THIS_BUILD = ["_C" + SUFFIX]
REBUILD = "python -m pip install --no-build-isolation -e /src/fastmargin"
CUDA_RECORD = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "cuda_kernels": True}
CPU_TORCH = _loader.RunningTorch("2.13.0+cpu", None, "3.11.7")
CUDA_TORCH = _loader.RunningTorch("2.14.1+cu130", "13.0", "3.11.7")
NO_CUDA_LIB = "libc10_cuda.so: cannot open shared object file: No such file or directory"


def explain(message, record, running, files=THIS_BUILD):
    return _loader.explain_load_failure(message, record, running, files, REBUILD)


def test_other_torch_names_both_and_the_fixes():
    text = explain(NO_CUDA_LIB, CUDA_RECORD, CPU_TORCH)
    assert "built against torch 2.14.1+cu130 (CUDA 13.0)" in text
    assert "runs torch 2.13.0+cpu (CPU build)" in text
    assert "libc10_cuda.so" in text.splitlines()[0]  # the CUDA library is part of the cause
    assert f"rebuild it against this torch: {REBUILD}" in text
    assert "torch==2.14.1 --index-url https://download.pytorch.org/whl/cu130" in text
    assert text.endswith(f"Loader: {NO_CUDA_LIB}")


def test_other_torch_version_same_flavour():
    record = {"torch": "2.11.0+cpu", "torch_cuda": None, "cuda_kernels": False}
    message = "_C.so: undefined symbol: _ZN3c106detail14torchCheckFail"
    text = explain(message, record, CPU_TORCH)
    assert "built against torch 2.11.0+cpu (CPU build)" in text
    assert "runs torch 2.13.0+cpu" in text
    assert "whl/cpu" in text and text.endswith(message)


def test_cuda_build_on_cpu_torch_without_record():
    text = explain(NO_CUDA_LIB, None, CPU_TORCH)
    assert "built with CUDA kernels" in text and "no CUDA libraries" in text
    assert "libc10_cuda.so" in text and REBUILD in text
    assert text.endswith(NO_CUDA_LIB)


def test_cuda_runtime_missing_under_a_cuda_torch():
    message = "libcudart.so.13: cannot open shared object file: No such file or directory"
    text = explain(message, CUDA_RECORD, CUDA_TORCH)
    assert "CUDA runtime library libcudart.so.13" in text
    assert "whl/cu130" in text  # reinstall torch's CUDA build
    assert f"FASTMARGIN_CUDA=0 {REBUILD}" in text  # or build without CUDA kernels
    assert text.endswith(message)


def test_not_built():
    message = "cannot import name '_C' from partially initialized module 'fastmargin'"
    text = explain(message, None, CPU_TORCH, files=[])
    assert text.startswith("fastmargin._C is not built")
    assert REBUILD in text and text.endswith(message)


def test_built_for_another_python():
    other = "_C.cpython-399-x86_64-linux-gnu.so"
    text = explain("No module named 'fastmargin._C'", CUDA_RECORD, CUDA_TORCH, files=[other])
    assert "another Python" in text and other in text and "3.11.7" in text
    assert REBUILD in text


def test_unknown_cause_without_record_suggests_a_rebuild():
    message = "_C.so: undefined symbol: _ZN2at4_ops"
    text = explain(message, None, CPU_TORCH)
    assert "no build record" in text and REBUILD in text and text.endswith(message)


def test_matching_record_other_failure():
    message = "_C.so: invalid ELF header"
    text = explain(message, CUDA_RECORD, CUDA_TORCH)
    assert "although it was built against this torch" in text
    assert REBUILD in text and text.endswith(message)


def test_rebuild_command_for_a_checkout_and_for_an_install(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "fastmargin").mkdir(parents=True)
    (checkout / "csrc").mkdir()
    (checkout / "setup.py").write_text("")
    command = _loader.rebuild_command(checkout / "fastmargin", "/env/bin/python")
    assert command == f"/env/bin/python -m pip install --no-build-isolation -e {checkout}"
    installed = tmp_path / "site-packages" / "fastmargin"
    installed.mkdir(parents=True)
    command = _loader.rebuild_command(installed, "/env/bin/python")
    assert command.startswith("/env/bin/python -m pip install --no-build-isolation --force-")
    assert "<fastmargin source directory>" in command


def test_info_prints_the_record_beside_the_running_torch(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    here = _loader.describe_torch(torch.__version__, torch.version.cuda)
    assert f"running:        {here}" in out
    record = _loader.build_record()
    if record is None:
        assert "built against:  unknown" in out
    else:
        built = _loader.describe_torch(record["torch"], record["torch_cuda"])
        assert f"built against:  {built}" in out
        assert ("CPU + CUDA" if record["cuda_kernels"] else "CPU only") in out
        assert ("MISMATCH" in out) != _loader.built_for(record, _loader.running_torch())


def _package_copy(
    tmp_path: Path, record_torch: str, binary: bytes | None, extension: str | None = None
) -> Path:
    """fastmargin's Python files in tmp_path, a record naming `record_torch`, and either the
    real compiled extension (binary None) or a file holding `binary` in its place."""
    package_dir = Path(fastmargin.__file__).parent
    copy = tmp_path / "fastmargin"
    shutil.copytree(
        package_dir, copy, ignore=shutil.ignore_patterns("_C.*", "_build_info.py", "__pycache__")
    )
    extra = f", 'extension': {extension!r}" if extension else ""
    (copy / "_build_info.py").write_text(
        f"BUILD = {{'torch': {record_torch!r}, 'torch_cuda': None, 'cuda_kernels': False{extra}}}\n"
    )
    if binary is None:
        (copy / ("_C" + SUFFIX)).symlink_to(package_dir / ("_C" + SUFFIX))
    else:
        (copy / ("_C" + SUFFIX)).write_bytes(binary)
    return tmp_path


IMPORT_PRINTING_RUNTIME_WARNINGS = (
    "import warnings\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    warnings.simplefilter('always')\n"
    "    import fastmargin\n"
    "print([str(w.message) for w in caught if w.category is RuntimeWarning])\n"
)


def _run(cwd: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_import_of_a_broken_build_explains_itself(tmp_path):
    root = _package_copy(tmp_path, "1.0.0+elsewhere", b"not an ELF file")
    result = _run(root, "import fastmargin")
    assert result.returncode != 0
    assert "ImportError: fastmargin._C was built against torch 1.0.0+elsewhere" in result.stderr
    assert f"this Python runs torch {torch.__version__}" in result.stderr
    assert "--no-build-isolation" in result.stderr
    loader_line = result.stderr.strip().splitlines()[-1]  # dlopen's own words are kept
    assert loader_line.startswith("Loader: ") and "_C" + SUFFIX in loader_line


@pytest.mark.skipif(
    not (Path(fastmargin.__file__).parent / ("_C" + SUFFIX)).exists(),
    reason="needs the in-place build",
)
def test_loading_a_build_recorded_for_another_torch_warns(tmp_path):
    root = _package_copy(tmp_path, "1.0.0+elsewhere", None)
    result = _run(root, IMPORT_PRINTING_RUNTIME_WARNINGS)
    assert result.returncode == 0, result.stderr
    assert "built against torch 1.0.0+elsewhere" in result.stdout
    assert "may fail at any call" in result.stdout


@pytest.mark.skipif(
    not (Path(fastmargin.__file__).parent / ("_C" + SUFFIX)).exists(),
    reason="needs the in-place build",
)
def test_a_record_of_another_pythons_build_beside_it_is_not_applied(tmp_path):
    # Two in-place builds in one checkout (e.g. one for the GPU machine's Python): the record
    # last written describes the other extension file, not the one that loads here.
    root = _package_copy(tmp_path, "1.0.0+elsewhere", None, extension="_C.cpython-399-other.so")
    result = _run(root, IMPORT_PRINTING_RUNTIME_WARNINGS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
