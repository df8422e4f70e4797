#!/usr/bin/env bash
# Patched sd-cli streaming through offload-engine against sd.cpp's own graph-cut path, same
# model, same budget, same run of this script:
#
#   bash integrations/stable-diffusion.cpp/bench.sh OUTDIR [MAX_VRAM_GIB] [STEPS]
#
# OUTDIR is build.sh's output directory (built when missing). The model is sd-model-gen's
# sd1-tiny (SD 1.x tiny UNet, CLIP-L, TAESD; generated weights). MAX_VRAM_GIB defaults to
# 0.36, about half of the UNet; STEPS to 8 (two UNet passes a step with CFG).
#
# On the CPU backend sd.cpp never takes its graph-cut path (it needs a params backend other
# than the compute backend). The patch's SD_CPU_GRAPH_CUT=1 lets it: the weights then live
# with a second CPU backend and each segment's buffer allocation, upload and free happen as
# on a GPU. That is the one change made to sd.cpp's own path here.
#
# Printed, from sd.cpp's own logs (-v) and the engine's summary line: sampling time, bytes
# sent to the compute backend per step, and weight and compute buffer allocations per step;
# then the ratios, engine over sd.cpp. The engine's image must be identical to the resident
# one; how far sd.cpp's own path's image is from it is printed (pixel differences need PIL).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 1 ] || { echo "usage: $0 OUTDIR [MAX_VRAM_GIB] [STEPS]" >&2; exit 2; }
out=$1
vram=${2:-0.36}
steps=${3:-8}

[ -x "$out/bin/sd-cli" ] || bash "$here/build.sh" "$out"
models=$out/models
if [ ! -f "$models/sd1-tiny.gguf" ]; then
    mkdir -p "$models"
    "$out/bin/sd-model-gen" sd1-tiny "$models"
fi
work=$out/bench
mkdir -p "$work"

run() {
    local name=$1
    shift
    "$out/bin/sd-cli" -m "$models/sd1-tiny.gguf" --taesd "$models/taesd.gguf" \
        -p "a lighthouse on a cliff" -n blurry -W 64 -H 64 --steps "$steps" --cfg-scale 7 \
        --seed 42 --sampling-method euler -t "$(nproc)" --disable-image-metadata -v \
        -o "$work/$name.png" "$@" >"$work/$name.log" 2>&1 || {
        tail -20 "$work/$name.log" >&2
        echo "$name failed (log: $work/$name.log)" >&2
        exit 1
    }
}

echo "sd1-tiny, 64x64, $steps steps with CFG, --max-vram $vram GiB, $(nproc) threads"
run resident
SD_CPU_GRAPH_CUT=1 run sdcpp --offload-to-cpu --max-vram "$vram"
run engine --stream-layers --offload-to-cpu --max-vram "$vram"

python3 - "$work" "$steps" <<'EOF'
import re, sys, pathlib
work, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])

def figures(name):
    log = (work / f"{name}.log").read_text(errors="replace")
    unet = lambda pattern: [m for m in re.finditer(pattern, log)]
    sampling = float(re.search(r"sampling completed, taking ([0-9.]+)s", log).group(1))
    uploads = unet(r"unet offload partial params \(\s*([0-9.]+) MB")
    compute = unet(r"unet compute buffer size")
    moved = sum(float(m.group(1)) for m in uploads) * 2**20
    summary = re.search(r"offload-engine: unet: (\d+) resident, (\d+) streamed layers; (\d+) passes; "
                        r"(\d+) bytes moved \((\d+) placed once, (\d+) streamed\); prefetch hits (\d+) of (\d+)", log)
    if summary:
        moved = int(summary.group(6))
    return {"sampling_s": sampling, "bytes_per_step": moved / steps,
            "weight_allocs_per_step": len(uploads) / steps,
            "compute_allocs_per_step": len(compute) / steps, "summary": summary}

sd, engine = figures("sdcpp"), figures("engine")
def difference(name):
    try:
        from PIL import Image
    except ImportError:
        return "(PIL not installed: no pixel figures)"
    a = Image.open(work / "resident.png").convert("RGB").tobytes()
    b = Image.open(work / f"{name}.png").convert("RGB").tobytes()
    diffs = [abs(x - y) for x, y in zip(a, b)]
    changed = sum(1 for d in diffs if d)
    return f"({changed} of {len(diffs)} channel values differ, by up to {max(diffs)} of 255)"

resident = (work / "resident.png").read_bytes()
for name, label in (("sdcpp", "sd.cpp's graph-cut path"), ("engine", "engine")):
    same = (work / f"{name}.png").read_bytes() == resident
    print(f"  {label}: image identical to the resident run: {'yes' if same else 'no ' + difference(name)}")
    if name == "engine" and not same:
        sys.exit(1)
s = engine["summary"]
if not s or int(s.group(2)) == 0:
    sys.exit("the engine streamed nothing: choose a smaller MAX_VRAM_GIB")
print(f"  engine: {s.group(1)} resident, {s.group(2)} streamed UNet layers, "
      f"prefetch hits {s.group(7)} of {s.group(8)} loads")
rows = [("sampling time (s)", "sampling_s", "{:.2f}"),
        ("MiB sent per step", "bytes_per_step", None),
        ("weight buffers allocated per step", "weight_allocs_per_step", "{:.1f}"),
        ("compute buffers allocated per step", "compute_allocs_per_step", "{:.1f}")]
print(f"  {'':36} {'sd.cpp':>9} {'engine':>9} {'ratio':>7}")
for label, key, fmt in rows:
    a, b = sd[key], engine[key]
    show = (lambda v: f"{v / 2**20:.1f}") if fmt is None else (lambda v, f=fmt: f.format(v))
    ratio = f"{b / a:.3f}" if a else "-"
    print(f"  {label:36} {show(a):>9} {show(b):>9} {ratio:>7}")
EOF
