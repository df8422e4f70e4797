#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ on stable Rust (no cargo-fuzz, no nightly) and runs each one
# for a bounded time on a scratch copy of its seed corpus. Exits non-zero when a target crashes,
# leaks past the RSS limit or times out; the reproducer is kept in fuzz/target/artifacts/.
# Targets: fuzz_gguf, fuzz_patterns, fuzz_plan, fuzz_abi (docs/FUZZING.md).
#
#   FUZZ_SECONDS=60 tests/fuzz.sh            # longer runs
#   tests/fuzz.sh fuzz_gguf                  # one target
#   ./fuzz/target/<host>/release/fuzz_gguf fuzz/target/artifacts/fuzz_gguf-crash-...   # replay
#
# fuzz_abi links the whole library, so its first build compiles ggml into fuzz/target (once;
# about 6 minutes on 2 cores). The other three build in under 2 minutes without it.
#
# Coverage comes from LLVM's SanitizerCoverage pass, enabled with stable -C flags (what
# cargo-fuzz does, minus -Zsanitizer=address, which needs nightly). Without ASan, memory
# errors are caught by Rust's own checks: the code under fuzz_gguf, fuzz_patterns and fuzz_plan
# has no unsafe. fuzz_abi crosses unsafe FFI into ggml's C, where only a crash, an abort or the
# target's own checks (handles, tensor pointers, weights restored) reveal a memory error.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${FUZZ_SECONDS:-10}
toolchain=${FUZZ_TOOLCHAIN:-stable}
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=(fuzz_gguf fuzz_patterns fuzz_plan fuzz_abi); fi

cargo=(cargo)
rustc=(rustc)
if command -v rustup >/dev/null 2>&1; then
    cargo=(cargo "+$toolchain")
    rustc=(rustc "+$toolchain")
fi

# An explicit --target keeps RUSTFLAGS off build scripts, which cannot link the coverage hooks.
host=$("${rustc[@]}" -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"

echo "fuzz: building ${targets[*]} ($("${cargo[@]}" --version), target $host)"
build_args=()
for t in "${targets[@]}"; do
    build_args+=(--bin "$t")
    # Only fuzz_abi needs the library (and ggml); the feature keeps it out of the others' builds.
    if [ "$t" = fuzz_abi ]; then build_args+=(--features abi); fi
done
build_start=$SECONDS
"${cargo[@]}" build --release --manifest-path "$root/fuzz/Cargo.toml" \
    --target-dir "$root/fuzz/target" --target "$host" "${build_args[@]}"
echo "fuzz: build took $((SECONDS - build_start))s"

work=$(mktemp -d "${TMPDIR:-/tmp}/offload-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
artifacts="$root/fuzz/target/artifacts"
mkdir -p "$artifacts"

failed=0
summary=()
for t in "${targets[@]}"; do
    corpus="$work/$t"
    mkdir -p "$corpus"
    if [ -d "$root/fuzz/corpus/$t" ]; then cp -R "$root/fuzz/corpus/$t/." "$corpus/"; fi
    dict_args=()
    dict="$root/fuzz/${t#fuzz_}.dict"
    if [ -f "$dict" ]; then dict_args=(-dict="$dict"); fi
    log="$work/$t.log"
    echo "fuzz: running $t for ${seconds}s"
    set +e
    "$root/fuzz/target/$host/release/$t" "$corpus" "${dict_args[@]}" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="$artifacts/$t-" >"$log" 2>&1
    status=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ -z "$runs" ]; then runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1); fi
    summary+=("$t=${runs:-?}")
    if [ "$status" -eq 0 ]; then
        echo "fuzz: $t ok: ${runs:-?} executions in ${seconds}s, corpus $(find "$corpus" -type f | wc -l) inputs"
    else
        failed=1
        echo "fuzz: $t FAILED (exit $status) after ${runs:-?} executions; artifacts in $artifacts" >&2
        tail -n 60 "$log" >&2
    fi
done
echo "fuzz: executions in ${seconds}s each: ${summary[*]}"
exit "$failed"
