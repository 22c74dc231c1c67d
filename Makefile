# Every target sets up what it needs: a virtual environment cached outside the clone, keyed by a
# hash of its requirements file and the Python version, made only here.
PYTHON    ?= python3
# Resolved now, before the venv's bin/ is put first on PATH below.
PYTHON    := $(shell command -v $(PYTHON))
CACHE_DIR ?= $(HOME)/.cache/torch_mp
JOBS      ?= $(shell nproc)

venv_dir = $(CACHE_DIR)/venv-$(1)-$(shell { cat requirements/$(1).txt; $(PYTHON) --version; } | sha256sum | cut -c1-16)
VENV     := $(call venv_dir,cuda)
CPU_VENV := $(call venv_dir,cpu)
PY       := $(VENV)/bin/python
CPU_PY   := $(CPU_VENV)/bin/python
# The venv's tools (ninja among them) come first for the CMake builds.
export PATH := $(VENV)/bin:$(PATH)

.PHONY: all venv cpu-venv sysdeps install demo test test-python test-zoo test-cpp test-cpu-smoke bench clean

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

# From Debian's packages: Gloo's headers for the build (the torch wheel lacks them), GoogleTest for
# the C++ tests.
sysdeps:
	@test -f /usr/include/gloo/context.h -a -f /usr/include/gtest/gtest.h || \
	    { apt-get update -qq && apt-get install -y -qq libgloo-dev libgtest-dev; }
cpu-venv: $(CPU_VENV)/.ready

install: venv sysdeps
	MAX_JOBS=$(JOBS) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

demo: install
	$(PY) examples/python/split_demo.py

test: test-python test-cpp test-cpu-smoke

test-python: install
	$(PY) -m pytest -q tests/python

# The whole model zoo (tensor_parallel and split against the dense models); `make test` runs the part
# that covers every kind of failure. `tests/python/zoo_table.py` prints the README's table.
test-zoo: install
	$(PY) -m pytest -q tests/python/test_zoo.py -m "zoo_full or not zoo_full"

# The C++ tests build against the installed package, as a LibTorch user's project would.
test-cpp: install
	cmake -S tests/cpp -B build/tests-cpp -G Ninja \
	    -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch, torch_mp; print(torch_mp.cmake_prefix_path + ";" + torch.utils.cmake_prefix_path)')"
	cmake --build build/tests-cpp -j $(JOBS)
	cd build/tests-cpp && ctest --output-on-failure

# A CPU-only torch must build the project and pass a smoke test too. It installs a regular (not
# editable) package and runs from outside the clone, so it never touches the in-place CUDA build.
test-cpu-smoke: cpu-venv sysdeps
	MAX_JOBS=$(JOBS) $(CPU_PY) -m pip install --quiet --no-build-isolation --no-deps .
	cd $$(mktemp -d) && $(CPU_PY) -m pytest -q -p no:cacheprovider $(CURDIR)/tests/python/test_smoke.py

bench: install
	$(PY) bench/bench_to_device.py
	$(PY) bench/bench_tensor_parallel.py
	$(PY) bench/bench_sharded_loading.py
	$(PY) bench/bench_compile.py
	$(PY) bench/bench_pipeline.py

clean:
	rm -rf build torch_mp/lib torch_mp/include torch_mp/share torch_mp/_C*.so *.egg-info
