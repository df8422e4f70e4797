#!/usr/bin/env bash
# The C and C++ ABI tests under valgrind memcheck (no errors, 0 bytes definitely lost) and
# under AddressSanitizer + UndefinedBehaviorSanitizer; then stable-diffusion.cpp with the
# drop-in (sd-cli and sd-jobs) under AddressSanitizer, streaming at several budgets and
# prefetch depths, each image equal to the resident run's. Run after `cargo test` has built
# the libraries and sd.cpp (CI does); prints one summary line per run.
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

# --- stable-diffusion.cpp under AddressSanitizer -------------------------------------------
# Streaming errors in a host are often reads of memory freed a moment before (a compute
# buffer, a slot), which crash only when the allocator has given the pages back; ASan
# reports each one on every run.
sd=target/sd-cpp
echo "building sd-cli and sd-jobs under AddressSanitizer (minutes)"
if ! bash integrations/stable-diffusion.cpp/build.sh --asan "$sd" >"$work/sd-build.log" 2>&1; then
    tail -40 "$work/sd-build.log"
    exit 1
fi
models=$sd/models
for model in sd1-tiny flux-tiny; do
    [ -f "$models/$model.gguf" ] || "$sd/bin/sd-model-gen" "$model" "$models" >"$work/gen-$model.log" 2>&1
done
# LeakSanitizer too: an engine, a registry or a file record left behind fails the run.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
mkdir -p "$work/sd"

# sd_asan NAME MODEL TAESD [ARGS...]: one sd-cli-asan run; the image is $work/sd/NAME.png.
# (SD_CLI=sd-cli: the same run uninstrumented.)
sd_asan() {
    local name=$1 model=$2 taesd=$3
    shift 3
    "$sd/bin/${SD_CLI:-sd-cli-asan}" -m "$models/$model.gguf" --taesd "$models/$taesd" \
        -p "a lighthouse on a cliff" -n blurry -W 64 -H 64 --steps 4 --cfg-scale 7 --seed 42 \
        --sampling-method euler -t 2 --disable-image-metadata -o "$work/sd/$name.png" "$@" \
        >"$work/sd/$name.log" 2>&1
}
# check NAME REFERENCE [sd_asan's other arguments]: the run is clean and its image is the
# reference run's, byte for byte.
check() {
    local name=$1 reference=$2
    shift 2
    if sd_asan "$name" "$@" && cmp -s "$work/sd/$name.png" "$work/sd/$reference.png"; then
        echo "AddressSanitizer: sd-cli $name: clean, image identical to $reference"
        passed=$((passed + 1))
    else
        echo "AddressSanitizer: sd-cli $name FAILED"
        [ -f "$work/sd/$reference.png" ] || tail -40 "$work/sd/$reference.log"
        tail -40 "$work/sd/$name.log"
        failed=$((failed + 1))
    fi
}
# budgets NAME MODEL TAESD RUNNER: two budgets in GiB from the sizes line the hook prints for
# RUNNER in an uninstrumented run (one step, all resident): the global tensors plus two slots
# of the largest layer and the global tensors plus half the layers (as tests/sd_cpp.rs).
budgets() {
    SD_CLI=sd-cli sd_asan "$1" "$2" "$3" --steps 1 $(stream 64 1) || { tail -20 "$work/sd/$1.log" >&2; return 1; }
    grep -m1 "offload-engine: $4: .* B, layers " "$work/sd/$1.log" |
        sed -E 's/.*global ([0-9]+) B, layers ([0-9]+) B \(largest ([0-9]+) B\), reserve ([0-9]+) B.*/\1 \2 \3 \4/' |
        awk '{ g = 2 ^ 30; printf "%.9f %.9f\n", ($1 + 2 * $3 + $4 + 2 ^ 20) / g, ($1 + $2 / 2 + $4) / g }'
}
stream() { echo --stream-layers --offload-to-cpu --max-vram "$1" --layer-prefetch-depth "$2"; }

# sd_jobs NAME [MAX_VRAM_GIB]: four sd-jobs-asan jobs (the models kept between them, a LoRA
# merged in the second and taken out in the third) into $work/sd/NAME/.
sd_jobs() {
    mkdir -p "$work/sd/$1"
    "$sd/bin/sd-jobs-asan" "$models/sd1-tiny.gguf" "$models/taesd.gguf" "$models/loras/sd1-tiny-lora.gguf" \
        "$work/sd/$1" 4 "${@:2}" >"$work/sd/$1.log" 2>&1
}
same_jobs() {
    local job
    for job in 0 1 2 3; do
        cmp -s "$work/sd/$1/job$job.rgb" "$work/sd/$2/job$job.rgb" || return 1
    done
}

if ! sd_asan sd1-resident sd1-tiny taesd.gguf || ! sd_asan flux-resident flux-tiny taef1.gguf; then
    echo "AddressSanitizer: sd-cli resident runs FAILED"
    tail -40 "$work/sd/sd1-resident.log" "$work/sd/flux-resident.log"
    exit 1
fi
read -r sd1_two sd1_half < <(budgets sd1-sizes sd1-tiny taesd.gguf unet)
read -r flux_two _ < <(budgets flux-sizes flux-tiny taef1.gguf flux)
if [ -z "${sd1_two:-}" ] || [ -z "${sd1_half:-}" ] || [ -z "${flux_two:-}" ]; then
    echo "sd-cli printed no sizes line: no budgets to stream at"
    exit 1
fi
check sd1-roomy sd1-resident sd1-tiny taesd.gguf $(stream 64 1)
for depth in 0 2; do
    check "sd1-two-slots-$depth" sd1-resident sd1-tiny taesd.gguf $(stream "$sd1_two" "$depth")
done
check sd1-half-1 sd1-resident sd1-tiny taesd.gguf $(stream "$sd1_half" 1)
check sd1-from-file-1 sd1-resident sd1-tiny taesd.gguf $(stream "$sd1_two" 1) --stream-from-file
check flux-two-slots-1 flux-resident flux-tiny taef1.gguf $(stream "$flux_two" 1)
# A LoRA applied in the graph (its weights are then a segment's external inputs), against
# the same run resident.
lora=(-p "a lighthouse on a cliff<lora:sd1-tiny-lora:0.5>" --lora-model-dir "$models/loras"
    --lora-apply-mode at_runtime)
sd_asan sd1-lora-resident sd1-tiny taesd.gguf "${lora[@]}" || true
check sd1-lora-two-slots-1 sd1-lora-resident sd1-tiny taesd.gguf "${lora[@]}" $(stream "$sd1_two" 1)
# A host that keeps its models: the text encoder's engine moved off the device and back
# between jobs, every engine rebuilt after each LoRA merge (sd.cpp's immediately mode).
if sd_jobs jobs-resident && sd_jobs jobs-half "$sd1_half" && same_jobs jobs-resident jobs-half; then
    echo "AddressSanitizer: sd-jobs jobs-half: clean, 4 images identical to jobs-resident"
    passed=$((passed + 1))
else
    echo "AddressSanitizer: sd-jobs jobs-half FAILED"; tail -40 "$work/sd/jobs-resident.log" "$work/sd/jobs-half.log"
    failed=$((failed + 1))
fi
echo "sanitizers: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
