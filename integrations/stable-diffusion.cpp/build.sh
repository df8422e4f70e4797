#!/usr/bin/env bash
# Builds stable-diffusion.cpp's sd-cli with offload-engine's drop-in, and the same sd-cli
# unpatched, for comparisons:
#
#   bash integrations/stable-diffusion.cpp/build.sh [--asan] OUTDIR
#
# 1. Fetches the source distribution of stable-diffusion-cpp-python 0.4.7 from PyPI (once,
#    sha256 checked) and takes its vendor/stable-diffusion.cpp tree.
# 2. Applies sd.patch (ours) to a copy of it.
# 3. Builds that tree's ggml as shared libraries (with sd.cpp's GGML_MAX_NAME=128).
# 4. Builds offload-engine in host-ggml mode against that ggml (one ggml per process).
# 5. Builds the patched sd-cli linked with it, the unpatched sd-cli, and sd-model-gen (a small
#    program of ours that writes models with sd.cpp's own tensor lists and generated weights).
#
# OUTDIR/bin then holds sd-cli, sd-cli-unpatched, sd-model-gen and sd-jobs. A second run reuses
# what is up to date. It takes a while on 2 cores (two sd.cpp builds); progress goes to stdout.
# With --asan it also builds the patched sd.cpp and its ggml a third time under
# AddressSanitizer, as sd-cli-asan and sd-jobs-asan (tests/sanitizers.sh runs them).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
asan=0
if [ "${1:-}" = --asan ]; then
    asan=1
    shift
fi
[ $# -eq 1 ] || { echo "usage: $0 [--asan] OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
jobs=${JOBS:-$(nproc)}

version=0.4.7
sdist=stable_diffusion_cpp_python-$version.tar.gz
sha256=998d1957260dd5ae4e18a8acc0c14b0a8757aaa9f96515197b6d5bbf46df9282

step() { echo "== sd.cpp build: $* ($(date +%H:%M:%S))"; }

# cmake --build with its "Built target" lines as progress; the whole log is kept, and shown
# when the build fails.
build_targets() {
    local dir=$1 log
    shift
    log=$dir/build.log
    if ! cmake --build "$dir" --target "$@" -j "$jobs" >"$log" 2>&1; then
        tail -60 "$log" >&2
        echo "build of $* failed (log: $log)" >&2
        exit 1
    fi
    grep -E 'Built target' "$log" | sed 's/^/   /' || true
}
started=$(date +%s)

step "source: $sdist"
mkdir -p "$out/dl"
if [ ! -f "$out/dl/$sdist" ]; then
    # pip reads the sdist's metadata with its build backend (scikit-build-core), which it
    # installs in an isolated environment for that; nothing is built.
    python3 -m pip download --no-deps --no-binary :all: \
        --disable-pip-version-check --progress-bar off \
        -d "$out/dl" "stable-diffusion-cpp-python==$version" >"$out/dl/pip.log" 2>&1 || {
        tail -20 "$out/dl/pip.log" >&2
        echo "pip download of stable-diffusion-cpp-python==$version failed (log: $out/dl/pip.log)" >&2
        exit 1
    }
fi
have=$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$out/dl/$sdist")
if [ "$have" != "$sha256" ]; then
    echo "$sdist: sha256 $have, expected $sha256" >&2
    exit 1
fi

pristine=$out/src/pristine
if [ ! -f "$pristine/CMakeLists.txt" ]; then
    step "unpacking vendor/stable-diffusion.cpp"
    rm -rf "$out/src" && mkdir -p "$out/src/unpack"
    tar -xzf "$out/dl/$sdist" -C "$out/src/unpack" "stable_diffusion_cpp_python-$version/vendor/stable-diffusion.cpp"
    mv "$out/src/unpack/stable_diffusion_cpp_python-$version/vendor/stable-diffusion.cpp" "$pristine"
    rm -rf "$out/src/unpack"
fi

# The patched tree is made again whenever the patch changes.
patched=$out/src/patched
patch_sum=$(sha256sum "$here/sd.patch" | cut -d' ' -f1)
if [ "$(cat "$patched/.offload-engine-patch" 2>/dev/null)" != "$patch_sum" ]; then
    step "applying sd.patch"
    rm -rf "$patched"
    cp -r "$pristine" "$patched"
    (cd "$patched" && git apply -p1 "$here/sd.patch")
    echo "$patch_sum" >"$patched/.offload-engine-patch"
fi

# RPATH rather than RUNPATH: the binaries find their own ggml and engine even where
# LD_LIBRARY_PATH names other builds of them (cargo test sets it to the target directory).
# cmake_args [COMPILER_AND_LINKER_FLAGS]: the configuration of every sd.cpp build here, one
# argument per line.
cmake_args() {
    local link="${1:+$1 }-Wl,--disable-new-dtags"
    printf '%s\n' -DCMAKE_BUILD_TYPE=Release -DSD_BUILD_SHARED_GGML_LIB=ON -DSD_WEBP=OFF -DSD_WEBM=OFF \
        "-DCMAKE_EXE_LINKER_FLAGS=$link" "-DCMAKE_SHARED_LINKER_FLAGS=$link"
    [ -z "${1:-}" ] || printf '%s\n' "-DCMAKE_C_FLAGS=$1" "-DCMAKE_CXX_FLAGS=$1"
}
engine=$out/engine/release/liboffload_engine.so

# configure_patched BUILD_DIR [FLAGS]: the patched tree with the engine. Configured once with
# it (its library is built before sd-cli links it), so the ggml built first is the one sd-cli
# uses, and a second run rebuilds nothing.
configure_patched() {
    local args
    mapfile -t args < <(cmake_args "${2:-}")
    cmake -S "$patched" -B "$1" "${args[@]}" -DSD_OFFLOAD_ENGINE=ON \
        -DSD_OFFLOAD_ENGINE_LIB="$engine" \
        -DSD_OFFLOAD_ENGINE_INCLUDE="$root/ffi;$here" >/dev/null
}
step "ggml (sd.cpp's tree, shared, GGML_MAX_NAME=128)"
build=$out/build/patched
configure_patched "$build"
build_targets "$build" ggml ggml-base ggml-cpu

# A ggml install prefix for host-ggml mode: its headers and its shared libraries.
prefix=$out/ggml
rm -rf "$prefix" && mkdir -p "$prefix/lib"
ln -s "$patched/ggml/include" "$prefix/include"
find "$build" -name 'libggml*.so*' -exec cp -P {} "$prefix/lib/" \;
[ -f "$prefix/lib/libggml.so" ] || { echo "no libggml.so under $build" >&2; exit 1; }

step "offload-engine (host-ggml mode against that ggml)"
if ! (cd "$root" && CARGO_TARGET_DIR="$out/engine" OFFLOAD_ENGINE_GGML_DIR="$prefix" \
    OFFLOAD_ENGINE_GGML_DEFINES="GGML_MAX_NAME=128" \
    cargo build --release --lib --no-default-features >"$out/engine.log" 2>&1); then
    tail -60 "$out/engine.log" >&2
    echo "offload-engine did not build (log: $out/engine.log)" >&2
    exit 1
fi
[ -f "$engine" ] || { echo "offload-engine did not build" >&2; exit 1; }

step "sd-cli with offload-engine"
build_targets "$build" sd-cli

# A program of ours linked against a build of the patched sd.cpp library, that build's ggml
# and the engine, rebuilt when its source or that library is newer:
# link_program BUILD_DIR GGML_LIB_DIR SOURCE BINARY [FLAGS...].
mkdir -p "$out/bin"
link_program() {
    local from=$1 ggml_lib=$2 source=$3 binary=$out/bin/$4 sdlib
    shift 4
    sdlib=$(find "$from" -name 'libstable-diffusion.a' | head -1)
    if [ ! -x "$binary" ] || [ "$source" -nt "$binary" ] || [ "$sdlib" -nt "$binary" ]; then
        c++ -std=c++17 -O2 -I"$patched/include" "$@" \
            "$source" "$sdlib" $(find "$from" -name 'libzip.a' | head -1) \
            -L"$ggml_lib" -lggml -lggml-base -lggml-cpu "$engine" -Wl,--disable-new-dtags -Wl,-rpath,"$ggml_lib:$out/engine/release" \
            -lpthread -ldl -o "$binary"
    fi
}

step "sd-model-gen (generated weights, sd.cpp's tensor lists)"
link_program "$build" "$prefix/lib" "$here/model_gen.cpp" sd-model-gen -DGGML_MAX_NAME=128 -DSD_USE_OFFLOAD_ENGINE \
    -I"$patched" -I"$patched/src" -I"$patched/thirdparty" -I"$patched/ggml/include" -I"$root/ffi" -I"$here"

step "sd-jobs (a host that keeps its models loaded between jobs)"
link_program "$build" "$prefix/lib" "$here/jobs.cpp" sd-jobs

step "sd-cli unpatched"
mapfile -t pristine_args < <(cmake_args)
cmake -S "$pristine" -B "$out/build/pristine" "${pristine_args[@]}" >/dev/null
build_targets "$out/build/pristine" sd-cli

ln -sf "$(find "$build" -name sd-cli -type f -perm -u+x | head -1)" "$out/bin/sd-cli"
ln -sf "$(find "$out/build/pristine" -name sd-cli -type f -perm -u+x | head -1)" "$out/bin/sd-cli-unpatched"
for b in sd-cli sd-cli-unpatched; do
    [ -x "$out/bin/$b" ] || { echo "$b was not built" >&2; exit 1; }
done

if [ "$asan" = 1 ]; then
    # The engine's library is the one above (Rust, built without the sanitizer); sd.cpp, its
    # ggml and our hook are instrumented, and ASan's allocator sees every allocation.
    step "sd-cli and sd-jobs under AddressSanitizer"
    asan_build=$out/build/patched-asan
    asan_flags="-fsanitize=address -fno-omit-frame-pointer -g"
    configure_patched "$asan_build" "$asan_flags"
    build_targets "$asan_build" sd-cli
    ln -sf "$(find "$asan_build" -name sd-cli -type f -perm -u+x | head -1)" "$out/bin/sd-cli-asan"
    asan_ggml=$(dirname "$(find "$asan_build" -name 'libggml.so' | head -1)")
    link_program "$asan_build" "$asan_ggml" "$here/jobs.cpp" sd-jobs-asan $asan_flags
    for b in sd-cli-asan sd-jobs-asan; do
        [ -x "$out/bin/$b" ] || { echo "$b was not built" >&2; exit 1; }
    done
fi
step "done in $(( $(date +%s) - started )) s: $out/bin"
