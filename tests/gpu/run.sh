#!/usr/bin/env bash
# On a GPU machine (CMake and the CUDA compiler, no Rust): builds ggml's CUDA backend module
# from the bundle's pinned ggml source, then runs the streaming tests, the demo, the pipeline
# and the benchmark on that device. Everything printed is also kept under $OUT.
#
#   tests/gpu/bundle.sh gpu-bundle          # here, with Rust
#   bash gpu-bundle/run.sh                  # there; BACKEND=cpu proves the recipe without a GPU
#
# Environment: BUNDLE (default: this script's directory), OUT (default /tmp/gpu-out),
# BACKEND cuda|cpu (default cuda), DEVICE (default CUDA0, or CPU), CUDA_ARCH (default native).
set -euo pipefail
bundle=$(cd "${BUNDLE:-$(dirname "$0")}" && pwd)
out=${OUT:-/tmp/gpu-out}
backend=${BACKEND:-cuda}
mkdir -p "$out"
log() { echo "[gpu] $*" | tee -a "$out/summary.txt"; }

build=$out/ggml-build
modules=$out/modules
rm -rf "$modules"
mkdir -p "$modules"
case "$backend" in
cuda)
    device=${DEVICE:-CUDA0}
    options=(-DGGML_CUDA=ON -DGGML_CPU=OFF -DGGML_NATIVE=OFF "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native}")
    module_target=ggml-cuda
    # The CPU backend modules built with the library serve staging and the CPU device.
    cp "$bundle"/modules/*.so "$modules/"
    ;;
cpu)
    # The same recipe with the CPU backend standing in for CUDA: the module used is the one
    # built here, not the ones the bundle carries.
    device=${DEVICE:-CPU}
    options=(-DGGML_CUDA=OFF -DGGML_CPU=ON -DGGML_NATIVE=OFF)
    module_target=ggml-cpu
    ;;
*) echo "BACKEND must be cuda or cpu" >&2; exit 2 ;;
esac

log "building ggml's $backend backend module"
started=$(date +%s)
cmake -S "$bundle/ggml" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_BACKEND_DL=ON -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF "${options[@]}" >"$out/cmake-configure.log" 2>&1 \
    || { tail -40 "$out/cmake-configure.log"; exit 1; }
cmake --build "$build" --target "$module_target" -j "$(nproc)" >"$out/cmake-build.log" 2>&1 \
    || { tail -60 "$out/cmake-build.log"; exit 1; }
find "$build" -name "lib$module_target*.so" -exec cp {} "$modules/" \;
log "module built in $(( $(date +%s) - started )) s: $(ls "$modules" | tr '\n' ' ')"

export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OFFLOAD_ENGINE_BACKEND_DIR=$modules
export OFFLOAD_ENGINE_TEST_DEVICE=$device
cli=$bundle/bin/offload-engine

run() {
    local name=$1; shift
    log "$name: $*"
    local status=0
    "$@" >"$out/$name.txt" 2>&1 || status=$?
    tail -25 "$out/$name.txt"
    log "$name: exit $status"
    return 0
}

run devices "$cli" devices
grep -q "^$device " "$out/devices.txt" \
    || { log "device $device was not found: the module did not load"; exit 1; }
run integration "$bundle/bin/integration" --test-threads 1
run demo "$cli" demo --device "$device"
run pipeline "$cli" pipeline --device "$device"
run bench "$cli" bench --device "$device" --json
log "done; outputs in $out"
grep -E ': exit [1-9]' "$out/summary.txt" && exit 1 || exit 0
