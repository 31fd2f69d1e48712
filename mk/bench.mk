# Benchmarks (issue #6): RevenProx next to bare Envoy, ext_authz and jwt_authn, in one run.
#   make bench          full run (~10 min on 2 cores): docs/benchmarks.md, docs/bench/{results.json,ratios.svg}
#   make bench-quick    the same pipeline, small and short; results stay in bench/out/
#   make bench-tools    wrk (Debian), the Rust load tools and the no-op wasm filter
# Not part of `make test`. Extra arguments for bench/run.py: make bench BENCH_ARGS='--rounds 5'
# Included by the main Makefile (-include mk/*.mk) or used as `make -f Makefile -f mk/bench.mk bench`.

ifndef REVENPROX_BENCH_MK
REVENPROX_BENCH_MK := 1

PYTHON      ?= python3
BENCH_ARGS  ?=
BENCH_SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BENCH_APT   := DEBIAN_FRONTEND=noninteractive $(BENCH_SUDO) apt-get -o DPkg::Lock::Timeout=300

.PHONY: bench bench-quick bench-tools

bench: wasm envoy bench-tools
	$(PYTHON) bench/run.py $(BENCH_ARGS)

bench-quick: wasm envoy bench-tools
	$(PYTHON) bench/run.py --quick --no-docs $(BENCH_ARGS)

bench-tools:
	@missing=""; \
	for tool in wrk openssl valgrind; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		echo "bench: installing$$missing (Debian packages)"; \
		$(BENCH_APT) update -qq && $(BENCH_APT) install -y -qq$$missing \
			|| command -v wrk >/dev/null && command -v openssl >/dev/null \
			|| { echo "bench: wrk and openssl are required" >&2; exit 1; }; \
	fi
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	cargo build --release --quiet --manifest-path bench/Cargo.toml
	cargo build --release --quiet --target wasm32-wasip1 --manifest-path bench/noop-wasm/Cargo.toml

endif
