#!/usr/bin/env bash
# Runs the libFuzzer targets of fuzz/ for a fixed time each (driven by mk/fuzz.mk; see SECURITY.md).
#
#   fuzz/run.sh SECONDS [TARGET...]      (no TARGET: every target)
#
# Environment:
#   FUZZ_JOBS=1          targets run at once (each uses one core)
#   FUZZ_SANITIZER=none  none | address (address needs -Z flags: RUSTC_BOOTSTRAP=1 is set for it)
#   CARGO_FUZZ_VERSION   the cargo-fuzz installed when it is missing (default 0.13.2)
#
# Committed seeds in fuzz/corpus/<target>/ are only read; what libFuzzer finds goes to the working
# corpus fuzz/work/corpus/<target>/, logs to fuzz/work/logs/, crashes to fuzz/artifacts/<target>/.
# Exit status: non-zero when any target found a crash or failed to run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
jobs=${FUZZ_JOBS:-1}
sanitizer=${FUZZ_SANITIZER:-none}
version=${CARGO_FUZZ_VERSION:-0.13.2}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $version"
    cargo install cargo-fuzz --version "$version" --locked
fi
if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz: libfuzzer-sys compiles libFuzzer and needs a C++ compiler (Debian: apt-get install g++)" >&2
    exit 1
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

flags=(-s "$sanitizer")
if [ "$sanitizer" != none ]; then
    # cargo-fuzz passes -Zsanitizer=...: allowed on the stable toolchain only with this.
    export RUSTC_BOOTSTRAP=1
    flags+=(--target-dir "target/$sanitizer")
fi

echo "fuzz: $(cargo fuzz --version), $(rustc --version), sanitizer $sanitizer"
cargo fuzz build "${flags[@]}"

mkdir -p work/logs
run_one() {
    local t=$1 seconds=$2
    shift 2
    local dict=()
    [ -f "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
    mkdir -p "work/corpus/$t" "corpus/$t" "artifacts/$t"
    local log="work/logs/$t.log"
    local start=$SECONDS rc=0
    cargo fuzz run "$@" "$t" "work/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "${dict[@]}" >"$log" 2>&1 || rc=$?
    local execs
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz: $t ok: ${execs:-?} executions in $((SECONDS - start)) s"
    else
        echo "fuzz: $t FAILED (exit $rc) after ${execs:-?} executions; log $PWD/$log"
        grep -E -A3 "panicked at|^==[0-9]+==ERROR|SUMMARY" "$log" | head -20 || true
        grep -E "Test unit written to|artifact_prefix" "$log" | tail -2 || true
        return 1
    fi
}
export -f run_one

failed=0
if [ "$jobs" -le 1 ]; then
    for t in "${targets[@]}"; do
        run_one "$t" "$seconds" "${flags[@]}" || failed=1
    done
else
    printf '%s\n' "${targets[@]}" |
        xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {} "$seconds" "${flags[@]}" || failed=1
fi

if [ "$failed" -ne 0 ]; then
    echo "fuzz: a target found a problem (inputs in fuzz/artifacts/; reproduce with" \
        "cargo fuzz run -s $sanitizer TARGET fuzz/artifacts/TARGET/crash-...)" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no finding"
