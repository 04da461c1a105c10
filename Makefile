# fastmargin developer commands. Each target does its own set-up on a fresh machine:
# a virtual environment in .venv with torch, the test/demo/lint extras, and the extension.
#
#   make demo    build and run the demo (digits: CE vs MaxUp vs AMO vs robust objectives)
#   make test    build (CPU + CUDA kernels where nvcc exists), run the test suite, then test-emu
#   make test-cpu  the test suite alone
#   make bench   build and print the benchmark table (fastmargin vs eager vs torch.compile)
#   make lint    ruff (lint + format check) and clang-format on csrc/
#   make build   only build fastmargin._C in place
#   make test-emu  run the CUDA kernels on the CPU: the .cu files built for the host against an
#                emulation of the CUDA model, under AddressSanitizer + UBSan alignment, compared
#                with the CPU kernels (docs/cuda_emulation.md)
#   make gpu-check  on a GPU machine: build (or reuse a carried build), self-check, CUDA tests,
#                compute-sanitizer, benchmarks, within 8 minutes; uses $(PYTHON) as it is (no
#                virtualenv, no downloads); results under $(OUT) (docs/gpu_check.md)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
MAX_JOBS ?= 2
PYTEST_ARGS ?=
DEMO_ARGS ?=

# nvcc's usual location; setup.py also finds it on PATH or via CUDA_HOME.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

VENV_STAMP := $(VENV)/.fastmargin-deps
BUILD_STAMP := build/.fastmargin-built
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: venv build test test-cpu test-cuda test-emu bench demo lint format clean gpu-check

venv: $(VENV_STAMP)
$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" numpy ninja "setuptools>=77"
	$(PY) -m pip install -q pytest pytest-benchmark hypothesis expecttest scikit-learn tqdm \
		matplotlib ruff clang-format
	touch $@

# The compiler's output goes to build/build.log and is printed only when the build fails.
build: $(BUILD_STAMP)
$(BUILD_STAMP): $(VENV_STAMP) setup.py $(CSRC)
	@mkdir -p build
	@echo "building fastmargin._C (MAX_JOBS=$(MAX_JOBS); log: build/build.log)"
	@MAX_JOBS=$(MAX_JOBS) $(PY) setup.py build_ext --inplace > build/build.log 2>&1 \
		|| { cat build/build.log; echo "fastmargin._C: build failed (log above)"; exit 1; }
	@touch $@

# make test: the CPU suite, then the CUDA kernels run on the CPU under the emulation harness.
test: test-cpu test-emu

test-cpu: $(BUILD_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-cuda: $(BUILD_STAMP)
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS)

# The sanitizer runtime must be loaded first (Python itself is not instrumented), and libstdc++
# with it: ASan's exception interceptor needs it at start-up. Leak checking is off: the
# interpreter keeps its allocations to the end on purpose.
EMU_ENV = LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:alloc_dealloc_mismatch=0 \
	UBSAN_OPTIONS=print_stacktrace=1

test-emu: $(BUILD_STAMP)
	MAX_JOBS=$(MAX_JOBS) $(PY) tests/emu/build_emu.py > build/emu-lib-path
	$(EMU_ENV) FASTMARGIN_EMU_LIB="$$(tail -n 1 build/emu-lib-path)" \
		$(PY) -m pytest -q tests/emu $(PYTEST_ARGS)

demo: $(BUILD_STAMP)
	$(PY) -m fastmargin demo $(DEMO_ARGS)

bench: $(BUILD_STAMP)
	$(PY) -m fastmargin bench

gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh $(OUT)

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check fastmargin tests bench examples scripts setup.py
	$(VENV)/bin/ruff format --check fastmargin tests bench examples scripts setup.py
	$(VENV)/bin/clang-format --dry-run -Werror $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

format: $(VENV_STAMP)
	$(VENV)/bin/ruff check --fix fastmargin tests bench examples scripts setup.py
	$(VENV)/bin/ruff format fastmargin tests bench examples scripts setup.py
	$(VENV)/bin/clang-format -i $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

clean:
	rm -rf build fastmargin/_C*.so
