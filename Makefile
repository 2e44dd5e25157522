# `make test` and `make demo` set everything up on a fresh clone: a local .venv, the pinned
# packages, the built extension, and (for the C++ tests) Debian's catch2 and cmake.
# `make lint` checks the Python (ruff) and C++ (clang-format) sources; `make format` rewrites them.
# `make check-install` installs srd_ext as a user would, beside the oldest supported torch.
SHELL := /bin/bash
# The PATH before the .venv is put in front of it, for gpu-check (which must not use the .venv).
SYSTEM_PATH := $(PATH)
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MAX_JOBS ?= 2
# The development build compiles the CUDA kernels for one architecture (+PTX, which newer GPUs
# compile at load time), to keep a build on this 2-core machine short; a user's build, and
# `make gpu-check`, target the GPUs torch finds (setup.py).
DEV_CUDA_ARCHS ?= 8.0+PTX
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
# C++ sources under clang-format (.clang-format): the operators and their Catch2 tests.
CXX_FORMAT := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh \
                tests/cpp/*.cpp tests/cpp/*.h)
RUFF_VERSION ?= 0.17.6
CLANG_FORMAT_VERSION ?= 23.1.5

.PHONY: all install test test-cpp test-py demo bench lint format check-install gpu-check clean

all: install

$(VENV)/.deps: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Optional comparison libraries: a failed install only makes their tests skip.
$(VENV)/.extras: $(VENV)/.deps requirements-extras.txt
	$(PY) -m pip install -q -r requirements-extras.txt || echo "optional test extras could not be installed; their tests will skip"
	touch $@

$(VENV)/.ext: $(VENV)/.deps $(CSRC) setup.py pyproject.toml
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-$(DEV_CUDA_ARCHS)}" $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.ext

# Catch2 and cmake come from Debian's packages when missing.
build/cpp/.configured: tests/cpp/CMakeLists.txt $(VENV)/.deps
	@command -v cmake >/dev/null && (dpkg -s catch2 >/dev/null 2>&1) || \
	  { apt-get update -qq && apt-get install -y -qq catch2 cmake >/dev/null; }
	cmake -S tests/cpp -B build/cpp -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(PY)
	touch $@

test-cpp: build/cpp/.configured $(CSRC)
	cmake --build build/cpp -j $(MAX_JOBS)
	ctest --test-dir build/cpp --output-on-failure

test-py: install $(VENV)/.extras
	$(PY) -m pytest -q tests

test: install test-cpp test-py

demo: install
	$(PY) examples/demo.py --out results/demo.png

bench: install
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_explain.py

# Linters: ruff and clang-format from PyPI, pinned, into .venv (no extension build needed).
$(VENV)/.lint:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "ruff==$(RUFF_VERSION)" "clang-format==$(CLANG_FORMAT_VERSION)"
	touch $@

lint: $(VENV)/.lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_FORMAT)

format: $(VENV)/.lint
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_FORMAT)

check-install:
	tests/install/check_install.sh

# On a GPU machine that already has a CUDA build of torch (no network, no .venv): build the
# extension against that torch, run the CUDA tests and the compute-sanitizer subset, measure
# ResNet-50 and VGG16, compare the CUDA kernels with the composite path (maps, time, memory); results
# in $$OUT or results/gpu/, and the record srd_ext/gpu_record.json (commit it: a passing record makes
# SRD_EXT_BACKEND=auto run the CUDA kernels). GPU_PYTHON picks the interpreter.
GPU_PYTHON ?= python3
gpu-check:
	PATH="$(SYSTEM_PATH)" $(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf build *.egg-info srd_ext/_C*.so
