# `make test` and `make demo` set everything up on a fresh clone: a local .venv, the pinned
# packages, the built extension, and (for the C++ tests) Debian's catch2 and cmake.
SHELL := /bin/bash
# The PATH before the .venv is put in front of it, for gpu-check (which must not use the .venv).
SYSTEM_PATH := $(PATH)
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MAX_JOBS ?= 2
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)

.PHONY: all install test test-cpp test-py demo bench gpu-check clean

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
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
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

# On a GPU machine that already has a CUDA build of torch (no network, no .venv): build the
# extension against that torch, run the CUDA tests and the compute-sanitizer subset, measure
# ResNet-50 and VGG16; results in $$OUT or results/gpu/. GPU_PYTHON picks the interpreter.
GPU_PYTHON ?= python3
gpu-check:
	PATH="$(SYSTEM_PATH)" $(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf build *.egg-info srd_ext/_C*.so
