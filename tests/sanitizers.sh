#!/usr/bin/env bash
# The C and C++ ABI tests under valgrind memcheck (no errors, 0 bytes definitely lost) and
# under AddressSanitizer + UndefinedBehaviorSanitizer. Run after `cargo test` has built the
# libraries (CI does); prints one summary line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
profile_dir=target/debug
lib=$(ls -t "$profile_dir"/deps/liboffload_engine*.a 2>/dev/null | head -1 || true)
[ -n "$lib" ] || lib="$profile_dir/liboffload_engine.a"
[ -f "$lib" ] || { echo "build the library first (cargo build --lib)"; exit 1; }
ggml_include=$(ls -d "$profile_dir"/build/llama-cpp-sys-2-*/out/include 2>/dev/null | head -1)
[ -n "$ggml_include" ] || { echo "ggml headers not found under $profile_dir/build"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
libs=(-lstdc++ -lpthread -ldl -lm)
flags=(-g -O1 -pthread -Iffi -Icpp -isystem "$ggml_include" -DABI_TEST_WITH_GGML=1)
programs=(
    "cc -std=c99 tests/c/abi_test.c"
    "c++ -std=c++17 tests/c/abi_test.cpp"
    "c++ -std=c++17 tests/cpp/api_test.cpp"
)
failed=0
passed=0
for entry in "${programs[@]}"; do
    read -r compiler standard source <<<"$entry"
    name=$(basename "$source" | tr . _)
    "$compiler" "$standard" "${flags[@]}" "$source" "$lib" "${libs[@]}" -o "$work/$name"
    if valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
        "$work/$name" >"$work/$name.valgrind.log" 2>&1; then
        echo "valgrind memcheck: $source: no errors, 0 bytes definitely lost"
        passed=$((passed + 1))
    else
        echo "valgrind memcheck: $source FAILED"; tail -40 "$work/$name.valgrind.log"
        failed=$((failed + 1))
    fi
    "$compiler" "$standard" "${flags[@]}" -fsanitize=address,undefined -fno-omit-frame-pointer \
        "$source" "$lib" "${libs[@]}" -o "$work/$name.asan"
    if ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1 \
        "$work/$name.asan" >"$work/$name.asan.log" 2>&1; then
        echo "AddressSanitizer+UBSan: $source: clean"
        passed=$((passed + 1))
    else
        echo "AddressSanitizer+UBSan: $source FAILED"; tail -40 "$work/$name.asan.log"
        failed=$((failed + 1))
    fi
done
echo "sanitizers: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
