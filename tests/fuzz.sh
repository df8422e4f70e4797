#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ on stable Rust (no cargo-fuzz, no nightly) and runs each one
# for a bounded time on a scratch copy of its seed corpus. Exits non-zero when a target crashes,
# leaks past the RSS limit or times out; the reproducer is kept in fuzz/target/artifacts/.
# Targets: fuzz_gguf, fuzz_patterns, fuzz_plan, fuzz_abi (docs/FUZZING.md).
#
#   FUZZ_SECONDS=60 tests/fuzz.sh            # longer runs
#   tests/fuzz.sh fuzz_gguf                  # one target
#   $CARGO_TARGET_DIR/fuzz/<host>/release/fuzz_gguf $CARGO_TARGET_DIR/fuzz/artifacts/fuzz_gguf-crash-...   # replay
#
# Everything builds under the main target directory ($CARGO_TARGET_DIR, default target/), in
# fuzz/. fuzz_abi links the whole library, built in host-ggml mode against the static ggml the
# main build compiled (OFFLOAD_ENGINE_GGML_DIR names it; otherwise the newest one under the
# target directory, built first with `cargo build --lib` when there is none), so ggml is never
# compiled a second time for fuzzing.
#
# Coverage comes from LLVM's SanitizerCoverage pass, enabled with stable -C flags (what
# cargo-fuzz does, minus -Zsanitizer=address, which needs nightly). Without ASan, memory
# errors are caught by Rust's own checks: the code under fuzz_gguf, fuzz_patterns and fuzz_plan
# has no unsafe. fuzz_abi crosses unsafe FFI into ggml's C, where only a crash, an abort or the
# target's own checks (handles, tensor pointers, weights restored) reveal a memory error.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
fuzz_dir="$target_dir/fuzz"
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
needs_ggml=0
for t in "${targets[@]}"; do
    build_args+=(--bin "$t")
    # Only fuzz_abi needs the library (and ggml); the feature keeps it out of the others' builds.
    if [ "$t" = fuzz_abi ]; then build_args+=(--features abi); needs_ggml=1; fi
done

# The ggml the main build compiled: an install prefix with include/ and lib/libggml*.a.
find_ggml() {
    ls -td "$target_dir"/*/build/llama-cpp-sys-2-*/out 2>/dev/null | while read -r prefix; do
        if [ -f "$prefix/include/ggml-backend.h" ] && [ -f "$prefix/lib/libggml.a" ]; then
            echo "$prefix"
            break
        fi
    done
}
if [ "$needs_ggml" = 1 ]; then
    ggml_dir=${OFFLOAD_ENGINE_GGML_DIR:-$(find_ggml)}
    if [ -z "$ggml_dir" ]; then
        echo "fuzz: no ggml build under $target_dir yet; building the library first"
        "${cargo[@]}" build --lib --manifest-path "$root/Cargo.toml" --target-dir "$target_dir"
        ggml_dir=$(find_ggml)
    fi
    [ -n "$ggml_dir" ] || { echo "fuzz: cannot find the main build's ggml" >&2; exit 1; }
    echo "fuzz: fuzz_abi links the ggml in $ggml_dir"
    export OFFLOAD_ENGINE_GGML_DIR="$ggml_dir" OFFLOAD_ENGINE_GGML_LINK=static
fi
build_start=$SECONDS
"${cargo[@]}" build --release --manifest-path "$root/fuzz/Cargo.toml" \
    --target-dir "$fuzz_dir" --target "$host" "${build_args[@]}"
echo "fuzz: build took $((SECONDS - build_start))s"

work=$(mktemp -d "${TMPDIR:-/tmp}/offload-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
artifacts="$fuzz_dir/artifacts"
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
    "$fuzz_dir/$host/release/$t" "$corpus" "${dict_args[@]}" \
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
