# Lints and fuzzing (issue #7). Included by the main Makefile (`-include mk/*.mk`): `make lint`,
# `make fuzz-smoke`, `make fuzz` (`make -f Makefile -f mk/fuzz.mk ...` works too).
#
#   make lint          cargo fmt --check (filter and fuzz crate); clippy on all native targets and on
#                      the wasm32 release build (the host edge only compiles there), warnings = errors
#   make fuzz-smoke    every fuzz target for FUZZ_SMOKE_SECONDS (default 20 s; 10 targets = 200 s plus
#                      the build); installs cargo-fuzz if missing; fails on any finding. For CI.
#   make fuzz          long runs: FUZZ_SECONDS per target (default 600), FUZZ_JOBS at once (default 1;
#                      the machine has 2 cores), FUZZ_TARGETS to choose (default all)
#   make fuzz-test     unit tests of the fuzzers' reference implementations
#
# Stable Rust only: the default sanitizer is none, which cargo-fuzz builds without any -Z flag.
# FUZZ_SANITIZER=address works too (fuzz/run.sh sets RUSTC_BOOTSTRAP=1 for it); see SECURITY.md.

ifndef REVENPROX_FUZZ_MK
REVENPROX_FUZZ_MK := 1

FUZZ_SECONDS       ?= 600
FUZZ_SMOKE_SECONDS ?= 20
FUZZ_JOBS          ?= 1
FUZZ_TARGETS       ?=
FUZZ_SANITIZER     ?= none

.PHONY: lint fuzz-smoke fuzz fuzz-test

lint:
	@rustup target list --installed | grep -qx 'wasm32-wasip1' || rustup target add wasm32-wasip1
	cargo fmt --check
	cargo fmt --manifest-path fuzz/Cargo.toml --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip1 -- -D warnings

fuzz-test:
	cargo test --manifest-path fuzz/Cargo.toml --lib

fuzz-smoke: fuzz-test
	FUZZ_JOBS=1 FUZZ_SANITIZER=$(FUZZ_SANITIZER) fuzz/run.sh $(FUZZ_SMOKE_SECONDS) $(FUZZ_TARGETS)

fuzz:
	FUZZ_JOBS=$(FUZZ_JOBS) FUZZ_SANITIZER=$(FUZZ_SANITIZER) fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

endif
