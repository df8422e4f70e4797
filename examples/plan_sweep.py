#!/usr/bin/env python3
"""Plans a model at a range of device memory sizes and shows what streaming costs: bytes
moved over the link per step against free VRAM, where the plan switches from streaming to
fully resident, and below what nothing fits. Plots with matplotlib when it is installed
(`pip install matplotlib`); prints the table either way.

    python3 examples/plan_sweep.py [MODEL.gguf] [--steps 20] [--passes-per-step 2]
                                   [--min-free 512MiB] [--points 24] [--plot out.png]

The sweep follows the model's size: from just below the smallest streaming footprint (the
global group and one slot of the largest layer, plus what is kept free) to past the fully
resident one. Without a model file, a Flux-like model (19 double blocks of 340 MiB, 38 single
blocks of 170 MiB, 1 GiB global) is described to the registry without any weights.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import offload_engine as oe  # noqa: E402

GIB = 1 << 30
F16 = 1  # ggml type id


def described_flux():
    registry = oe.Registry()
    prefix = "model.diffusion_model."
    # 340 MiB per double block, 170 MiB per single block, as f16 [3072, N] matrices.
    for i in range(19):
        registry.add_descriptor(f"{prefix}double_blocks.{i}.img_mlp.0.weight", F16, [3072, 29013])
    for i in range(38):
        registry.add_descriptor(f"{prefix}single_blocks.{i}.linear1.weight", F16, [3072, 14507])
    registry.add_descriptor(f"{prefix}img_in.weight", F16, [3072, 174763])
    return registry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a GGUF model file")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--passes-per-step", type=int, default=2)
    parser.add_argument("--link", default="pcie4-x16")
    parser.add_argument("--min-free", default="512MiB",
                        help="device memory kept free (a size, as the command line reads it)")
    parser.add_argument("--points", type=int, default=24, help="memory sizes to plan for")
    parser.add_argument("--plot", help="write the plot to this PNG (needs matplotlib)")
    args = parser.parse_args()

    registry = oe.Registry.from_gguf(args.model) if args.model else described_flux()
    total = registry.total_bytes
    keep_free = oe.parse_size(args.min_free)
    safety = 0.90  # the library's default fraction of free memory a plan may use
    largest = max(layer.bytes for layer in registry.layers)
    # From a little below the smallest streaming footprint to past the fully resident one.
    low = (registry.global_bytes + largest) / safety + keep_free
    high = total / safety + keep_free
    start, stop = 0.8 * low, 1.15 * high
    sizes = [start + (stop - start) * i / (args.points - 1) for i in range(args.points)]
    print(f"{registry.architecture}: {registry.layer_count} layers, {total / GIB:.2f} GiB; "
          f"{args.min_free} kept free")
    print(f"{'VRAM GiB':>9} {'mode':>12} {'resident':>9} {'GiB/step':>9} {'s/step':>8}")
    rows = []
    for vram in sizes:
        try:
            p = oe.plan(registry, int(vram), steps=args.steps, min_free_bytes=keep_free,
                        passes_per_step=args.passes_per_step, link=args.link)
            rows.append((vram / GIB, p["mode"], p["bytes_per_step"] / GIB, p["predicted_step_seconds"]))
            print(f"{vram / GIB:9.2f} {p['mode']:>12} {len(p['resident_layers']):9d} "
                  f"{p['bytes_per_step'] / GIB:9.2f} {p['predicted_step_seconds']:8.3f}")
        except oe.OffloadError as error:
            rows.append((vram / GIB, "insufficient", 0.0, 0.0))
            print(f"{vram / GIB:9.2f} {'insufficient':>12}   ({error.message.split(';')[0]})")

    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed (pip install matplotlib): table only, no plot")
            return 0
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        planned = [r for r in rows if r[1] != "insufficient"]
        refused = [r for r in rows if r[1] == "insufficient"]
        if planned:
            ax.plot([r[0] for r in planned], [r[2] for r in planned], marker="o", label="streaming / full")
        if refused:
            ax.scatter([r[0] for r in refused], [0] * len(refused), marker="x", color="tab:red",
                       label="insufficient: nothing fits", zorder=3)
            # Shade up to halfway to the first size that fits.
            last_refused = max(r[0] for r in refused)
            fits = [r[0] for r in planned if r[0] > last_refused]
            edge = (last_refused + min(fits)) / 2 if fits else stop / GIB
            ax.axvspan(start / GIB, edge, color="tab:red", alpha=0.08)
        full = [r[0] for r in rows if r[1] == "full"]
        if full:
            ax.axvline(min(full), linestyle="--", color="tab:green",
                       label=f"fully resident from {min(full):.2f} GiB")
        ax.set_xlabel(f"free device memory (GiB; {args.min_free} kept free)")
        ax.set_ylabel("streamed per step (GiB)")
        name = os.path.basename(args.model) if args.model else "Flux-like model"
        ax.set_title(f"{name}: streaming traffic vs VRAM ({args.link})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
