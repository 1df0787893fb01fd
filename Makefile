# Two commands on a fresh machine: `make run` (the main job on an embedded default) and
# `make test` (the whole suite). Both create .venv and install everything themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test check bench-cpu gpu-wheels lint clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	# torch first and pinned: the CPU build on this machine's disk. An unpinned torch would pull a
	# multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/fused-dpo train

check: $(STAMP)
	$(BIN)/fused-dpo check

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-cpu: $(STAMP)
	$(BIN)/python -m pytest bench/test_cpu_bench.py -q -s --benchmark-only -p no:cacheprovider \
		--benchmark-columns=median,min,max 2>&1 | grep -v USDT

# Competitors for the GPU tables travel as wheels (the GPU machine has no network; all three are
# pure Python and their needs, torch, triton and transformers, are on its image). TRL alone, no
# dependencies: `trl.kernels` imports with those three; bench/providers.py stands in for the one
# accelerate-bound helper its chunked backward imports. pytest-xdist and execnet (pure Python) spread
# gpu_check.sh's kernel-facing suite over processes. bitsandbytes (43 MB, its CUDA kernels inside) runs
# the fit group's QLoRA and 8-bit AdamW. Carry `.whl` with the device call (about 47 MB of the 64 MiB).
gpu-wheels: $(STAMP)
	$(BIN)/pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
		liger-kernel cut-cross-entropy trl==1.16.0 pytest-xdist execnet bitsandbytes==0.50.2

# The declared minimum versions (read from pyproject.toml) and the newest releases, each in its own
# venv under build/compat/: import fused_dpo and a subset of the tests; the newest set also compiles
# every kernel with ptxas. Not part of `make test`: the floor's torch is PyPI's CUDA build, a ~3 GB
# download the first time. `bash .ci/compat floor` or `newest` runs one set.
compat:
	bash .ci/compat

lint: $(STAMP)
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache .benchmarks
