# mmkernels: the two commands a fresh machine needs.
#   make demo   creates .venv, installs everything (compiling mmkernels._C when nvcc is present), runs the demo
#   make test   creates .venv, installs everything, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmkernels-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cuh csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install demo test bench clean

install: $(STAMP)

# Build requirements first (torch, ninja, CUTLASS headers), then the package with --no-build-isolation so that
# _C compiles against this venv's torch and DeepSpeed's source build sees it too.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch>=2.4" "setuptools>=64" wheel ninja nvidia-cutlass
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: install
	$(PY) -m train.demo --out demo_out

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench --out bench/results/latest.json

clean:
	rm -rf build *.egg-info mmkernels/_C*.so
