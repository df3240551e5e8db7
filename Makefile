# The two commands of the README: `make demo` (main job) and `make test` (whole test suite).
# Both create .venv and install everything on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast mutate bench cluster-bench cluster-bench-small scale convergence clean

CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

# Horovod 0.28.1 from the registry, built against the torch above with Gloo (tests run it under
# horovodrun --gloo). Its torch module asks for C++14 and torch 2.13 needs C++17: the cmake wrapper
# in launch/horovod maps the flag, so Horovod's source is not patched. About 2 minutes on 2 cores.
HOROVOD_CMAKE := launch/horovod/cmake-cxx17 launch/horovod/cxx17.cmake
HOROVOD_FLAGS := HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 MAKEFLAGS=-j2

# torch first (pinned: an unpinned one pulls a CUDA build) and the build requirements of
# pyproject.toml, then gradsparse and its C++ extension, built against that torch (hence
# --no-build-isolation) with the venv's ninja on PATH, with mpi4py and Open MPI (extra "mpi"),
# Lightning and Accelerate (extra "integrations"; torch pinned again on that line so that no
# dependency can swap it), then Horovod.
$(VENV)/.installed: pyproject.toml setup.py $(CSRC) $(HOROVOD_CMAKE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0 setuptools wheel ninja
	PATH="$(abspath $(VENV))/bin:$$PATH" MAX_JOBS=2 \
	  $(VENV)/bin/pip install --quiet --no-build-isolation --use-pep517 -e '.[test,mpi,bench,integrations]' torch==2.13.0
	command -v cmake >/dev/null || $(VENV)/bin/pip install --quiet cmake
	PATH="$(abspath $(VENV))/bin:$$PATH" HOROVOD_CMAKE=$(CURDIR)/launch/horovod/cmake-cxx17 $(HOROVOD_FLAGS) \
	  $(VENV)/bin/pip install --quiet --no-build-isolation horovod==0.28.1
	touch $@

setup: $(VENV)/.installed

# Main job: ResNet-50 shapes on 2 emulated nodes at 1 Gbit/s (root + iproute2; else loopback, said so):
# dense, fp16, PowerSGD and gradsparse DGC side by side; 45 s on the 2 cores here (quiet machine, 2026-11-30).
# Table on screen, JSON and PNG in benchmarks/results/demo/.
demo: setup
	$(PY) -m benchmarks.demo

test: setup
	$(PY) -m pytest -q --doctest-modules gradsparse tests

# The unit layer on one process (tests/unit/ without its few world-2/3 runs, marked multiprocess) and the
# package's doctests; docs/testing.md has the layers, the markers and how long each takes.
test-fast: setup
	$(PY) -m pytest -q --doctest-modules gradsparse tests/unit -m "not multiprocess"

# Mutation run, on demand (not in CI): targeted mutants of the algorithm applied one at a time to a copy of the
# package, each followed by its fast tests, on the compiled and the reference kernels (docs/testing.md has the
# score and the survivors). 20-40 minutes on 2 shared cores; results also in benchmarks/results/mutation.json.
mutate: setup
	mkdir -p benchmarks/results
	nice -n 10 $(PY) -m tests.mutation.run --json benchmarks/results/mutation.json

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,max,rounds

# Bandwidth benchmark on an emulated cluster (root + iproute2; else loopback, said so). Full matrix:
# 100 Mbit/s, 1 and 10 Gbit/s x 2 and 4 nodes x ResNet-50 shapes and an LSTM LM (44 min on the shared 2-core VM),
# results in docs/cluster/; the small one (3 min there) writes benchmarks/results/cluster_small/.
cluster-bench: setup
	$(PY) -m benchmarks.cluster_bench --out docs/cluster

cluster-bench-small: setup
	$(PY) -m benchmarks.cluster_bench --rates 1gbit,10gbit --worlds 2 --models lstm --comm-sizes 1000000,5000000 \
		--comm-repeats 3 --steps 3 --out benchmarks/results/cluster_small

# Projection to 8-1,024 nodes and its validation (docs/scale.md): `measure` fits the emulated links (about 1 min,
# root + iproute2), the 4x1/2x2/1x4 run gives the emulated points (about 4 min), the report takes seconds.
scale: setup
	$(PY) -m benchmarks.scale measure
	$(PY) -m benchmarks.cluster_bench --rates 1gbit --shapes 2x2,4x1,1x4 --models resnet50 \
		--methods compute,dense,fp16,dgc0.1 --skip-comm --steps 5 --warmup 2 --out benchmarks/results/shapes
	cp benchmarks/results/shapes/results.json docs/scale/emulated-1gbit-shapes.json
	$(PY) -m benchmarks.scale --emulated docs/scale/emulated-1gbit-shapes.json

# Convergence matrix on real data (docs/convergence.md): about 2.5 hours on 2 shared cores; resumable.
convergence: setup
	nice -n 10 $(PY) -m benchmarks.convergence run
	$(PY) -m benchmarks.convergence report

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks benchmarks/results gradsparse/_C*.so
