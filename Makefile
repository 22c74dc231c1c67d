# Every target sets up what it needs: a virtual environment cached outside the clone, keyed by a
# hash of its requirements file and the Python version, made only here.
PYTHON    ?= python3
# Resolved now, before the venv's bin/ is put first on PATH below, and exported so that the makes
# `make test` starts (their PATH starts with the venv's bin/) make venvs with this python too.
PYTHON    := $(shell command -v $(PYTHON))
export PYTHON
CACHE_DIR ?= $(HOME)/.cache/torch_mp
JOBS      ?= $(shell nproc)

venv_dir = $(CACHE_DIR)/venv-$(1)-$(shell { cat requirements/$(1).txt; $(PYTHON) --version; } | sha256sum | cut -c1-16)
VENV     := $(call venv_dir,cuda)
CPU_VENV := $(call venv_dir,cpu)
PY       := $(VENV)/bin/python
CPU_PY   := $(CPU_VENV)/bin/python
# The venv's tools (ninja among them) come first for the CMake builds.
export PATH := $(VENV)/bin:$(PATH)

.PHONY: all venv cpu-venv sysdeps install demo docs test test-python test-full test-cpp test-cpu-smoke test-multinode test-zoo test-mesh3d test-planner \
        gpu-check bench clean

all: install

# A venv counts only once its marker exists, so an interrupted install is redone from scratch. The
# hash in its name already tracks the requirements: no file-time prerequisite (a fresh clone is newer).
# A lock keeps two builds (two clones, two make runs) from making the same venv at once.
define make_venv
	mkdir -p $(CACHE_DIR)
	flock $(1).lock sh -c 'test -f $(1)/.ready || { rm -rf $(1) && $(PYTHON) -m venv $(1) && \
	    $(1)/bin/pip install --quiet -r $(2) && touch $(1)/.ready; }'
endef

$(VENV)/.ready:
	$(call make_venv,$(VENV),requirements/cuda.txt)

$(CPU_VENV)/.ready:
	$(call make_venv,$(CPU_VENV),requirements/cpu.txt)

venv: $(VENV)/.ready

# From Debian's packages: Gloo's headers for the build (the torch wheel lacks them), nlohmann/json
# for reading checkpoints (the CUDA venv has no PyPI copy; the fuzz target finds it with CMake's
# find_package), GoogleTest for the C++ tests.
sysdeps:
	@test -f /usr/include/gloo/context.h -a -f /usr/include/gtest/gtest.h -a -f /usr/include/nlohmann/json.hpp || \
	    { apt-get update -qq && apt-get install -y -qq libgloo-dev libgtest-dev nlohmann-json3-dev; }
cpu-venv: $(CPU_VENV)/.ready

# The editable install runs again only when its inputs changed: the sources and build files, the
# venv, or the built module (gone after `make clean`). Its stamp lives in the venv, one per venv and
# clone, and an install removes the other clones' stamps there: the venv's package is then this clone's.
CLONE_ID      := $(shell echo $(CURDIR) | sha256sum | cut -c1-16)
INSTALL_STAMP := $(VENV)/.installed-$(CLONE_ID)
INSTALL_INPUTS = $(shell find csrc cmake) setup.py CMakeLists.txt pyproject.toml
install: $(INSTALL_STAMP)
$(INSTALL_STAMP): $(VENV)/.ready $(INSTALL_INPUTS) $(if $(wildcard torch_mp/_C*.so),,FORCE) | sysdeps
	MAX_JOBS=$(JOBS) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@
.PHONY: FORCE
FORCE:

demo: install
	$(PY) examples/python/split_demo.py

# The API reference (Sphinx, furo theme) from the installed package's docstrings, into
# build/docs/html; a warning (a broken docstring, a missing name) fails it.
docs: install
	$(PY) -m sphinx -W --keep-going -q -b html docs build/docs/html
	@echo "API reference: build/docs/html/index.html"

# The parts of `make test`; a suite of its own adds itself with `TEST_PARTS += test-<name>`.
TEST_PARTS := test-python test-cpp test-cpu-smoke docs

# Every part runs, even after one fails, and `make test` fails at the end if any did, naming them.
# The set-up (install) runs once, first; when it fails no part can run.
test:
	@rm -f build/test-failed; mkdir -p build
	@$(MAKE) --keep-going $(addprefix test-part/,$(TEST_PARTS)) || echo "install (no part ran)" >> build/test-failed
	@if [ -s build/test-failed ]; then echo "make test: FAILED: $$(paste -sd ' ' build/test-failed)"; exit 1; fi
	@echo "make test: passed: $(TEST_PARTS)"

# One part of `make test`, in a make of its own (install already done): a failure is recorded, not fatal.
test-part/%: install
	@$(MAKE) -o install $* || { echo $* >> build/test-failed; echo "make test: $* failed; going on"; }

# The representative part of the Python tests (the slowest 20 named at the end).
test-python: install
	$(PY) -m pytest -q --durations=20 tests/python

# Every Python test: the representative part, the cases marked full, the whole zoo and the 8-rank mesh.
test-full: install
	$(PY) -m pytest -q --durations=50 tests/python -m ""

# The whole model zoo (tensor_parallel and split against the dense models); `make test` runs the part
# that covers every kind of failure. `tests/python/zoo_table.py` prints the README's table.
test-zoo: install
	$(PY) -m pytest -q tests/python/test_zoo.py -m "zoo_full or not zoo_full"

# Pipeline x tensor x data parallel: every test of tests/python/test_mesh3d.py, the 8-rank ones
# included (`make test` runs the 4-rank part).
test-mesh3d: install
	$(PY) -m pytest -q tests/python/test_mesh3d.py -m "mesh3d_full or not mesh3d_full"

# The planner: every test of tests/python/test_planner.py, the applied plans on 4 ranks included
# (`make test` runs the cost model and the search, a few seconds).
test-planner: install
	$(PY) -m pytest -q tests/python/test_planner.py -m "planner_full or not planner_full"

# The C++ tests build against the installed package, as a LibTorch user's project would.
test-cpp: install
	cmake -S tests/cpp -B build/tests-cpp -G Ninja \
	    -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch, torch_mp; print(torch_mp.cmake_prefix_path + ";" + torch.utils.cmake_prefix_path)')"
	cmake --build build/tests-cpp -j $(JOBS)
	cd build/tests-cpp && ctest --output-on-failure

# A CPU-only torch must build the project and pass a smoke test too, built as on a machine with
# nothing but the venv's packages: CMake ignores /usr/include, so nlohmann/json comes from PyPI and
# Gloo's headers (libgloo-dev) are missing: Python's Gloo groups (torch.distributed's) work all the
# same, which the tensor-parallel layers on 2 Gloo ranks check. (A CUDA torch without the CUDA
# toolkit: tests/python/test_build.py.) It installs a regular (not editable) package and runs from
# outside the clone, so it never touches the in-place CUDA build.
test-cpu-smoke: cpu-venv
	CMAKE_ARGS="-DCMAKE_IGNORE_PATH=/usr/include -UTORCH_MP_JSON_INCLUDE_DIR -UTORCH_MP_GLOO_INCLUDE_DIR" \
	    MAX_JOBS=$(JOBS) $(CPU_PY) -m pip install --quiet --no-build-isolation --no-deps .
	cd $$(mktemp -d) && $(CPU_PY) -m pytest -q -p no:cacheprovider $(CURDIR)/tests/python/test_smoke.py \
	    $(CURDIR)/tests/python/test_tensor_parallel.py::test_linear_layers_match_dense

# Two nodes on this machine (network namespaces joined by a veth pair, root and iproute2 needed),
# torchrun across them: see tests/multinode/run.py.
test-multinode: install
	@command -v ip >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2; }
	$(PY) tests/multinode/run.py

# On a machine with a GPU: build, then the CUDA tests and the GPU benchmarks in under 8 minutes, and
# one table of figures and pass/fail (scripts/gpu_check.py). Without a GPU: says so, exits 0.
gpu-check:
	@if ! nvidia-smi -L >/dev/null 2>&1; then \
	    echo "gpu-check: this machine has no GPU (nvidia-smi lists none): nothing to check"; exit 0; fi; \
	$(MAKE) install && $(PY) scripts/gpu_check.py

bench: install
	$(PY) bench/bench_to_device.py
	$(PY) bench/bench_tensor_parallel.py
	$(PY) bench/bench_sharded_loading.py
	$(PY) bench/bench_compile.py
	$(PY) bench/bench_pipeline.py

clean:
	rm -rf build torch_mp/lib torch_mp/include torch_mp/share torch_mp/_C*.so *.egg-info $(INSTALL_STAMP)

# The libFuzzer target of the C++ checkpoint reader (tests/fuzz: safetensors headers and checkpoint
# indexes), built with clang and run for FUZZ_SECONDS from the seeds and the corpus found so far.
# A single allocation over 1 MiB (the inputs are at most 4 KiB) counts as a finding.
FUZZ_SECONDS ?= 30
.PHONY: test-fuzz
TEST_PARTS += test-fuzz
test-fuzz: venv sysdeps
	@command -v clang++ >/dev/null || { apt-get update -qq && apt-get install -y -qq clang; }
	cmake -S tests/fuzz -B build/fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ \
	    -DTORCH_DIR="$$($(PY) -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
	cmake --build build/fuzz
	mkdir -p build/fuzz/corpus
	build/fuzz/fuzz_checkpoint_reader -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -malloc_limit_mb=1 \
	    -timeout=10 -print_final_stats=1 -dict=tests/fuzz/checkpoint.dict build/fuzz/corpus tests/fuzz/seeds
