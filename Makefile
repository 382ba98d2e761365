# Two commands a new user needs:  `make serve`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
PIN    := -c constraints.txt

.PHONY: serve test e2e install-proxy install-all tools system bench lint clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.proxy: $(PY) pyproject.toml constraints.txt
	$(PIP) install -q $(PIN) torch==2.13.0
	$(PIP) install -q $(PIN) -e '.[proxy]'
	touch $@

$(VENV)/.all: $(VENV)/.proxy
	$(PIP) install -q $(PIN) -e '.[proxy,onnx,pii,operator,test]' ruff mypy
	touch $@

install-proxy: $(VENV)/.proxy
install-all: $(VENV)/.all

## Start the proxy in front of http://localhost:11434 with embedded defaults (in-memory cache, no Redis).
serve: install-proxy
	$(VENV)/bin/ollama-guard serve $(ARGS)

## Install everything (Debian services when root, Python packages, helm binaries) and run the whole test suite.
test: install-all tools system
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

## The cluster tests, against the cluster KUBECONFIG names (each skips with its reason where it cannot run).
e2e: install-all tools
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(PY) -m pytest e2e -m cluster $(PYTEST_ARGS)

## The services the tests start themselves: redis-server, prometheus (promtool), wrk. Installed with apt-get
## when run as root and one is missing; otherwise the tests that need them skip (and fail in CI).
system:
	@if command -v redis-server >/dev/null && command -v promtool >/dev/null && command -v wrk >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    redis-server prometheus wrk >/dev/null; \
	else echo "make test: redis-server, prometheus and wrk are missing; as root: apt-get install redis-server prometheus wrk" >&2; fi

tools: install-all
	$(PY) scripts/fetch_tools.py

## The proxy against the minimal pass-through and Ollama direct (bench/proxy_bench.py; wrk from `system`).
bench: install-all system
	$(PY) bench/proxy_bench.py $(ARGS)

lint: install-all
	$(VENV)/bin/ruff check proxy operator tests bench e2e scripts
	$(VENV)/bin/ruff format --check proxy operator tests bench e2e scripts
	$(VENV)/bin/mypy proxy/ollama_guard operator/ollama_guard_operator

clean:
	rm -rf $(VENV) .tools
