# The two commands of the README: `make demo` (main job) and `make test` (whole test suite).
# Both create .venv and install everything on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench convergence clean

CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

# torch first (pinned: an unpinned one pulls a CUDA build), then gradsparse and its C++
# extension, built against that torch (hence --no-build-isolation).
$(VENV)/.installed: setup.py $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0 setuptools wheel
	MAX_JOBS=2 $(VENV)/bin/pip install --quiet --no-build-isolation --use-pep517 -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 benchmarks/ddp_demo.py

test: setup
	$(PY) -m pytest -q --doctest-modules gradsparse tests

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,max,rounds

# Convergence matrix on real data (docs/convergence.md): about an hour on 2 shared cores; resumable.
convergence: setup
	nice -n 10 $(PY) -m benchmarks.convergence run
	$(PY) -m benchmarks.convergence report

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks benchmarks/results gradsparse/_C*.so
