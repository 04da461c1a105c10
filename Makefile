# fastmargin developer commands. Each target does its own set-up on a fresh machine:
# a virtual environment in .venv with torch, the test/demo/lint extras, and the extension.
#
#   make demo    build and run the demo (digits: CE vs MaxUp vs AMO vs robust objectives)
#   make test    build (CPU + CUDA kernels where nvcc exists) and run the test suite
#   make bench   build and print the benchmark table (fastmargin vs eager vs torch.compile)
#   make lint    ruff (lint + format check) and clang-format on csrc/
#   make build   only build fastmargin._C in place
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

.PHONY: venv build test test-cuda bench demo lint format clean gpu-check

venv: $(VENV_STAMP)
$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" numpy ninja setuptools wheel
	$(PY) -m pip install -q pytest pytest-benchmark hypothesis expecttest scikit-learn tqdm \
		matplotlib ruff clang-format
	touch $@

build: $(BUILD_STAMP)
$(BUILD_STAMP): $(VENV_STAMP) setup.py $(CSRC)
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

test: $(BUILD_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-cuda: $(BUILD_STAMP)
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS)

demo: $(BUILD_STAMP)
	$(PY) -m fastmargin demo $(DEMO_ARGS)

bench: $(BUILD_STAMP)
	$(PY) -m fastmargin bench

gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh $(OUT)

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check fastmargin tests bench scripts setup.py
	$(VENV)/bin/ruff format --check fastmargin tests bench scripts setup.py
	$(VENV)/bin/clang-format --dry-run -Werror $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

format: $(VENV_STAMP)
	$(VENV)/bin/ruff check --fix fastmargin tests bench scripts setup.py
	$(VENV)/bin/ruff format fastmargin tests bench scripts setup.py
	$(VENV)/bin/clang-format -i $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

clean:
	rm -rf build fastmargin/_C*.so
