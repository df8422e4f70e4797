#!/usr/bin/env python3
"""Plans a model at a range of device memory sizes and shows what streaming costs: bytes
moved over the link per step against VRAM, and where the plan switches from streaming to
fully resident. Plots with matplotlib when it is installed; prints a table either way.

    python3 examples/plan_sweep.py [MODEL.gguf] [--steps 20] [--passes-per-step 2] [--plot out.png]

Without a model file, a Flux-like model (19 double blocks of 340 MiB, 38 single blocks of
170 MiB, 1 GiB global) is described to the registry without any weights.
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
    parser.add_argument("--plot", help="write the plot to this PNG (needs matplotlib)")
    args = parser.parse_args()

    registry = oe.Registry.from_gguf(args.model) if args.model else described_flux()
    total = registry.total_bytes
    print(f"{registry.architecture}: {registry.layer_count} layers, {total / GIB:.2f} GiB")
    print(f"{'VRAM GiB':>9} {'mode':>12} {'resident':>9} {'GiB/step':>9} {'s/step':>8}")
    rows = []
    vram = 0.5
    while vram <= total / GIB * 1.3 + 1:
        try:
            p = oe.plan(registry, int(vram * GIB), steps=args.steps,
                        passes_per_step=args.passes_per_step, link=args.link)
            resident = sum(p["resident_layers"])
            rows.append((vram, p["bytes_per_step"] / GIB, p["predicted_step_seconds"]))
            print(f"{vram:9.1f} {p['mode']:>12} {resident:9d} {p['bytes_per_step'] / GIB:9.2f} "
                  f"{p['predicted_step_seconds']:8.3f}")
        except oe.OffloadError as error:
            print(f"{vram:9.1f} {'insufficient':>12}   ({error.message.split(';')[0]})")
        vram += 0.5

    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: table only")
            return 0
        xs, moved, seconds = zip(*rows)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(xs, moved, marker="o")
        ax.set_xlabel("free device memory (GiB)")
        ax.set_ylabel("bytes moved per step (GiB)")
        ax.set_title(f"{registry.architecture}: streaming traffic vs VRAM ({args.link})")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
