#!/usr/bin/env bash
# Prepares, on a machine with Rust, what tests/gpu/run.sh needs on a GPU machine that has
# CMake and the CUDA compiler but no Rust toolchain and no registries:
#   bin/      the CLI and the integration tests, built with ggml's backends as loadable
#             modules (the `dynamic-backends` feature), debug info stripped
#   lib/      ggml's shared libraries those programs link
#   modules/  the backend modules built here (the CPU variants)
#   ggml/     the pinned ggml source, to build only the CUDA backend module there
# Usage: tests/gpu/bundle.sh [DIR]   (default gpu-bundle; git-ignored; carry it to the machine)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-gpu-bundle}
target=${CARGO_TARGET_DIR:-target/dynamic-backends}
export CARGO_TARGET_DIR=$target

cargo build --release --locked --features dynamic-backends --bin offload-engine
tests_json=$(cargo test --release --locked --features dynamic-backends --no-run \
    --test integration --message-format=json)
integration=$(printf '%s\n' "$tests_json" | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg["target"]["name"] == "integration":
        print(msg["executable"])')

ggml_out=$(ls -d "$target"/release/build/llama-cpp-sys-2-*/out | while read -r d; do
    [ -d "$d/backends" ] && echo "$d"; done | head -n 1)
[ -n "$ggml_out" ] || { echo "no ggml build with backend modules under $target" >&2; exit 1; }
source_dir=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$ggml_out/build/CMakeCache.txt")
[ -d "$source_dir/ggml" ] || { echo "ggml source not found at $source_dir/ggml" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/modules" "$out/ggml/src"
cp "$target/release/offload-engine" "$integration" "$out/bin/"
mv "$out/bin/$(basename "$integration")" "$out/bin/integration"
cp -P "$ggml_out"/lib/libggml*.so* "$out/lib/"
find "$ggml_out/backends" "$ggml_out/lib" "$ggml_out/bin" -maxdepth 1 -name 'libggml-*.so' \
    ! -name 'libggml-base.so' -exec cp {} "$out/modules/" \; 2>/dev/null || true
strip --strip-debug "$out"/bin/* "$out"/lib/*.so* "$out"/modules/*.so 2>/dev/null || true
# The ggml sources: the build system, the headers, the core and the CPU and CUDA backends.
find "$source_dir/ggml" -maxdepth 1 -type f -exec cp {} "$out/ggml/" \;
cp -r "$source_dir/ggml/cmake" "$source_dir/ggml/include" "$out/ggml/"
# The packaged source lacks the pkg-config template ggml's CMake configures (never installed
# here); an empty stand-in lets ggml build on its own.
[ -f "$out/ggml/ggml.pc.in" ] || printf 'Name: ggml\nDescription: ggml\nVersion: 0\n' >"$out/ggml/ggml.pc.in"
find "$source_dir/ggml/src" -maxdepth 1 -type f -exec cp {} "$out/ggml/src/" \;
cp -r "$source_dir/ggml/src/ggml-cpu" "$source_dir/ggml/src/ggml-cuda" "$out/ggml/src/"
cp tests/gpu/run.sh "$out/"
du -sh "$out" "$out"/*
